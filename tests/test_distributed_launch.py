"""``ftcore run --nproc N``: the torchrun command, the [distributed] table, and real multi-process runs.

The runs use the real pretrained stories260K model: N processes with micro_batch_size b must
trace the loss curve of one process with N * b (same global batch, same data order), for DDP and
FSDP2 alike; on CPU through gloo, on 2 GPUs through NCCL (gpu-marked).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ftcore.config import validate_config
from ftcore.distributed import (
    check_nproc,
    distributed_arguments,
    launch_command,
    strip_nproc,
    torchrun_arguments,
)
from ftcore.errors import ConfigError
from ftcore.metrics import read_metrics
from ftcore.testing import asset, stories_model

CLI = [sys.executable, "-m", "ftcore.cli"]


def config(**distributed):
    raw = {"model": {"base": "org/model"}, "train": {"output_dir": "/tmp/unused"}, "distributed": distributed}
    return validate_config(raw, source="run.toml")[0]


def test_workers_get_the_command_without_nproc():
    argv = ["ftcore", "--debug", "run", "run.toml", "--nproc", "2", "--set", "train.max_steps=3", "--nproc=4"]
    assert strip_nproc(argv) == ["ftcore", "--debug", "run", "run.toml", "--set", "train.max_steps=3"]
    command = launch_command(config(), argv, 2)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:6] == ["--nproc-per-node", "2", "--standalone"]
    assert command[6:] == ["-m", "ftcore.cli", "--debug", "run", "run.toml", "--set", "train.max_steps=3"]


def test_multi_node_rendezvous_goes_to_torchrun():
    section = config(nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29600).distributed
    assert torchrun_arguments(section, 8) == [
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.5", "--master-port", "29600",
    ]  # fmt: skip


def test_distributed_table_errors():
    with pytest.raises(ConfigError, match="strategy") as error:
        config(strategy="fsdp")
    assert "fsdp2" in str(error.value)
    with pytest.raises(ConfigError, match='did you mean "nnodes"'):
        config(nnode=2)
    with pytest.raises(ConfigError, match="node_rank 2 is not below nnodes 2") as error:
        check_nproc(config(nnodes=2, node_rank=2), 2)
    assert error.value.key == "distributed.node_rank"


def test_strategies_become_trainer_arguments():
    assert distributed_arguments(config()) == {"ddp_find_unused_parameters": False}
    fsdp = distributed_arguments(config(strategy="fsdp2", reshard_after_forward=False))
    assert fsdp["fsdp"] is True
    assert fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["reshard_after_forward"] is False
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"


def write_run(tmp_path: Path, name: str, micro_batch_size: int, **train) -> Path:
    extra = "\n".join(f"{key} = {json.dumps(value)}" for key, value in train.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[model]
base = "{stories_model()}"
chat_template = "chatml"
dtype = "float32"

[[datasets]]
path = "{asset("data/instructions/instructions_2000.jsonl")}"
format = "alpaca"

[data]
cache_dir = "{tmp_path / "cache"}"

[train]
output_dir = "{tmp_path / name}"
sequence_len = 256
packing = true
micro_batch_size = {micro_batch_size}
max_steps = 5
logging_steps = 1
learning_rate = 1e-3
precision = "fp32"
{extra}
"""
    )
    return path


def ftcore_run(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*CLI, "run", str(path), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir) if "loss" in row]


def check_two_processes_match_one(tmp_path: Path, tolerance: float) -> subprocess.CompletedProcess:
    """Runs 1 process (micro-batch 2) and 2 processes (micro-batch 1) under DDP and FSDP2; returns the first."""
    one = ftcore_run(write_run(tmp_path, "one", micro_batch_size=2))
    ddp = ftcore_run(write_run(tmp_path, "ddp", micro_batch_size=1), "--nproc", "2")
    fsdp = ftcore_run(
        write_run(tmp_path, "fsdp", micro_batch_size=1, save_steps=3),
        "--nproc",
        "2",
        "--set",
        "distributed.strategy=fsdp2",
    )
    curves = {name: losses(tmp_path / name) for name in ("one", "ddp", "fsdp")}
    print(json.dumps(curves, indent=1))
    assert len(curves["one"]) == 5
    for name in ("ddp", "fsdp"):
        assert curves[name] == pytest.approx(curves["one"], rel=tolerance), name
    assert (
        ddp.stdout.count("step 5/5") == fsdp.stdout.count("step 5/5") == one.stdout.count("step 5/5") == 1
    )  # rank 0 only
    from safetensors.torch import load_file

    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("ddp", "fsdp")}
    assert weights["ddp"].keys() == weights["fsdp"].keys()  # FSDP2's final save is gathered, HF format
    for key, tensor in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][key], tensor, rtol=tolerance, atol=tolerance)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    state = json.loads((tmp_path / "fsdp" / "checkpoints" / "step-000003" / "ftcore_state.json").read_text())
    assert state["world_size"] == 2
    return one


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_cpu_processes_match_one_process_and_resume(tmp_path):
    check_two_processes_match_one(tmp_path, tolerance=1e-4)
    full = losses(tmp_path / "fsdp")
    (tmp_path / "fsdp" / "model.safetensors").unlink()
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-000005")
    resumed = ftcore_run(
        tmp_path / "fsdp.toml", "--resume", "--nproc", "2", "--set", "distributed.strategy=fsdp2"
    )
    assert "resuming from" in resumed.stdout and "step-000003" in resumed.stdout
    assert losses(tmp_path / "fsdp") == pytest.approx(full, rel=1e-4)
    assert (tmp_path / "fsdp" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_that_diverges_on_two_processes_exits_with_code_3(tmp_path):
    """torchrun exits 1 whatever its workers' codes; the launcher reports theirs."""
    path = write_run(tmp_path, "diverged", micro_batch_size=1)
    path.write_text('plugins = ["inhouse.run_control"]\n' + path.read_text())
    inhouse = str(Path(__file__).parent / "inhouse_plugins")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FTCORE_TEST_NAN_STEPS": "2-5",
        "PYTHONPATH": os.pathsep.join(filter(None, [inhouse, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run([*CLI, "run", str(path), "--nproc", "2"], capture_output=True, text=True, env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training diverged: non-finite gradients at step 2" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_and_fsdp2_on_two_gpus_match_one_gpu(tmp_path):
    one = check_two_processes_match_one(tmp_path, tolerance=2e-3)
    assert "this process trains on one" in one.stdout  # no DataParallel over the visible GPUs
