"""Multi-GPU training: ``ftcore run --nproc N CONFIG`` relaunches itself under torchrun.

Each of the N processes runs the ordinary ``ftcore run CONFIG`` path; the HF Trainer (through
accelerate) sees torchrun's environment and trains data-parallel: DDP, or FSDP2 with
``[distributed] strategy = "fsdp2"``. The sampler gives every rank its own batches of one
shared shuffled order, so N processes with ``micro_batch_size = b`` train the same global batch
as one process with ``N * b``. Only rank 0 prints, writes metrics and renames checkpoints.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the workers must not relaunch)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_arguments(section, nproc: int) -> list[str]:
    """torchrun's options: one node standalone (a free port), or a static multi-node rendezvous."""
    args = ["--nproc-per-node", str(nproc)]
    if section.nnodes == 1:
        return [*args, "--standalone"]
    return [
        *args,
        "--nnodes", str(section.nnodes),
        "--node-rank", str(section.node_rank),
        "--master-addr", section.master_addr,
        "--master-port", str(section.master_port),
    ]  # fmt: skip


def launch_command(config, argv: list[str], nproc: int) -> list[str]:
    """The torchrun command that runs ``argv`` (``ftcore ... run CONFIG ...``) on ``nproc`` processes."""
    worker = strip_nproc(list(argv[1:]))
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_arguments(config.distributed, nproc),
        "-m",
        "ftcore.cli",
        *worker,
    ]


def check_nproc(config, nproc: int) -> None:
    """N processes need N GPUs on this node (CPU-only machines run N gloo processes, for tests)."""
    import torch

    section = config.distributed
    if section.node_rank >= section.nnodes:
        raise ConfigError(
            f"node_rank {section.node_rank} is not below nnodes {section.nnodes}; nodes are numbered 0..{section.nnodes - 1}",
            file=config.source,
            key="distributed.node_rank",
        )
    if os.environ.get("LOCAL_RANK") is not None:
        raise ConfigError(
            "--nproc inside a torchrun worker: run ftcore run CONFIG without --nproc under torchrun"
        )
    gpus = torch.cuda.device_count()
    if gpus and nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc} asks for more processes than this machine has GPUs ({gpus}); use --nproc {gpus}"
        )


EXIT_CODES_ENV = "FTCORE_EXIT_CODES"
"""A folder the launcher makes: a worker that stops on a user error or divergence writes its exit code there."""


def launch(config, config_path, argv: list[str], nproc: int) -> int:
    """Run this ``ftcore run`` command on ``nproc`` processes through torchrun; returns the exit code:
    the workers' own (2 for a user error, 3 for a diverged run, the larger if they differ), else torchrun's."""
    import tempfile

    check_nproc(config, nproc)
    command = launch_command(config, argv, nproc)
    with tempfile.TemporaryDirectory(prefix="ftcore-exit-") as codes:
        env = {**os.environ, "FTCORE_LAUNCHED": "1", EXIT_CODES_ENV: codes}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        print(
            f"ftcore: launching {nproc} processes on node {config.distributed.node_rank} for {config_path}",
            flush=True,
        )
        code = subprocess.call(command, env=env)
        recorded = [int(path.read_text()) for path in Path(codes).iterdir()]
    return max(recorded) if code and recorded else code


def record_exit_code(code: int) -> None:
    """In a worker started by ``launch``: leave this process's exit code for the launcher."""
    folder = os.environ.get(EXIT_CODES_ENV)
    if folder and Path(folder).is_dir():
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


def end_process_group() -> None:
    """In a worker whose run finished: wait for every rank (rank 0 may still be writing the final model),
    then close the process group, so no rank exits with the group's threads still running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def quiet_replica() -> None:
    """In a worker of rank > 0: no stdout and no Python warnings (errors still reach stderr)."""
    if int(os.environ.get("RANK", "0")) > 0:
        import warnings

        sys.stdout = open(os.devnull, "w")  # for the life of the process
        warnings.simplefilter("ignore")


def distributed_arguments(config) -> dict[str, Any]:
    """TrainingArguments for ``[distributed]``: DDP settings, or FSDP2 with a gathered HF-format final save."""
    section = config.distributed
    if section.strategy == "ddp":
        return {"ddp_find_unused_parameters": section.find_unused_parameters}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules (decoder layers)
            "reshard_after_forward": section.reshard_after_forward,
            "state_dict_type": "FULL_STATE_DICT",  # checkpoints and the final model gathered, HF format
        },
    }
