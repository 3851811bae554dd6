"""Test helpers for ftcore and its plugins (public API), also a pytest plugin.

Installing ftcore registers this module as a pytest plugin (entry point ``pytest11``, name
``ftcore``; ``pytest -p no:ftcore`` turns it off), so every test session has these fixtures:

- ``ftcore_assets``: the assets folder (``models/``, ``data/``), a ``Path``.
- ``ftcore_stories_model``: the real pretrained tiny Llama (stories260K), a ``Path`` to use as
  ``model.base``.
- ``ftcore_tiny_model_dir``: ``make(architecture="llama") -> Path``, a folder holding a tiny
  random-init model of a real architecture (llama, qwen3, qwen3_moe, mixtral) with the stories
  tokenizer, loadable as ``model.base``; made once per session and architecture.
- ``run_ftcore``: ``run_ftcore(config=None, *, plugins=(), steps=None, resume=False,
  overwrite=False) -> TrainedRun``, which trains in-process in the test's ``tmp_path`` (see ``train``).

The same helpers work without pytest: ``asset``, ``stories_model``, ``tiny_config``, ``tiny_model``,
``random_batch``, ``train`` and ``cached_venv`` (a server's own virtual environment, built once). The assets (the pretrained ``models/stories260K-hf`` and the
``data/`` subsets, listed with their sources and licences in ``ftcore/testdata/README.md``) ship
inside the ftcore package, so a clone or a plugin's own tests find them with nothing set.
``FTCORE_TEST_ASSETS`` points the locator at another folder with the same layout instead.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import pytest
except ImportError:  # the helpers work without pytest; only the fixtures need it
    pytest = None

ASSETS_ENV = "FTCORE_TEST_ASSETS"
PACKAGED_ASSETS = Path(__file__).resolve().parent / "testdata"


class MissingAssets(RuntimeError):
    pass


def assets_dir() -> Path:
    """The folder holding ``models/`` and ``data/``: ``FTCORE_TEST_ASSETS``, else the packaged one."""
    override = os.environ.get(ASSETS_ENV)
    candidate = Path(override) if override else PACKAGED_ASSETS
    if (candidate / "models").is_dir() and (candidate / "data").is_dir():
        return candidate.resolve()
    fix = f"Set {ASSETS_ENV} to a folder holding models/ and data/" if override else "Reinstall ftcore"
    raise MissingAssets(f"test assets not found (tried {candidate}). {fix}.")


def asset(relative: str) -> Path:
    """A path inside the assets folder, checked to exist: ``asset("data/gsm8k/train_first300.jsonl")``."""
    path = assets_dir() / relative
    if not path.exists():
        raise MissingAssets(f"test asset {relative!r} missing under {assets_dir()}")
    return path


def stories_model() -> Path:
    """The real pretrained tiny Llama (TinyStories 260K, 512-token vocab, 512 context)."""
    return asset("models/stories260K-hf")


TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
"""The shape of the tiny test models (any architecture's config accepts these keys)."""

KERNEL_TEST_SHAPE = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)
"""A small model shape for GPU kernel tests (liger, cce): big enough for real tiles."""


def tiny_config(architecture: str = "llama", **overrides):
    """A tiny random-init config of a real architecture: llama, qwen3, qwen3_moe, mixtral."""
    from transformers import AutoConfig

    extra = {
        "llama": {},
        "qwen3": {},
        "qwen3_moe": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    }[architecture]
    return AutoConfig.for_model(architecture, **{**TINY_SHAPE, **extra, **overrides})


def tiny_model(architecture: str = "llama", seed: int = 0, **overrides):
    """A tiny random-init ``*ForCausalLM`` in float32, eval mode off (ready to train)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(architecture, **overrides), dtype=torch.float32)


def random_batch(vocab_size: int, *, packed: bool, device: str = "cpu", seed: int = 0) -> dict:
    """Two 256-token rows of random ids with the first 32 labels ignored.

    ``packed`` adds ``position_ids`` for three sequences a row (100, 80 and 76 tokens) and ignores
    the label of each sequence's first token, as ftcore's packing does.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2, 256), generator=generator)
    labels = input_ids.clone()
    labels[:, :32] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(100), torch.arange(80), torch.arange(76)]).repeat(
            2, 1
        )
        labels[:, [100, 180]] = -100
    return {key: value.to(device) for key, value in batch.items()}


DEFAULT_DATASET = {
    "path": "data/instructions/instructions_2000.jsonl",
    "format": "prompt_completion",
    "fields": {"prompt": "instruction", "completion": "output"},
    "split": "train[:64]",
}
"""The dataset ``train`` uses when a config has none: 64 instruction rows as prompt/completion."""


@dataclass
class TrainedRun:
    """What ``train`` (the ``run_ftcore`` fixture) returns."""

    result: Any
    """The ``ftcore.methods.RunResult`` (``global_step``, ``model``, ``stash``, ...)."""
    metrics: list[dict]
    """The rows of metrics.jsonl."""
    output_dir: Path
    config: Any
    """The validated config that ran."""

    @property
    def stash(self) -> dict[str, Any]:
        """The run's ``Run.stash`` at the end (plugin state)."""
        return self.result.stash


def train(
    config: dict[str, Any] | None,
    workdir: str | Path,
    *,
    plugins: list[str] | tuple[str, ...] = (),
    steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainedRun:
    """Train in-process, as ``ftcore run`` does, and return the result, the metrics rows and output_dir.

    ``config`` is a config as a dict (as read from TOML; relative paths resolve from ``workdir``);
    what it leaves out is filled in: ``model.base`` = the stories260K model in float32, the
    ``DEFAULT_DATASET``, ``train.output_dir`` = ``workdir/out``, ``data.cache_dir`` =
    ``workdir/cache``, ``train.sequence_len`` = 128 and ``train.logging_steps`` = 1. ``plugins`` are
    added to ``plugins`` (installed names or dotted module paths); ``steps`` sets
    ``train.max_steps`` (default: the config's, else 2). ``resume`` and ``overwrite`` are ``ftcore
    run``'s flags: call again with ``resume=True`` to continue the same output_dir.
    """
    from ftcore.config import validate_config
    from ftcore.metrics import read_metrics
    from ftcore.pipeline import run_training

    workdir = Path(workdir)
    raw = copy.deepcopy(config or {})
    raw["plugins"] = list(dict.fromkeys([*raw.get("plugins", []), *plugins]))
    model = raw.setdefault("model", {})
    if "base" not in model:
        model.update(base=str(stories_model()), dtype=model.get("dtype", "float32"))
    if "datasets" not in raw:
        raw["datasets"] = [{**DEFAULT_DATASET, "path": str(asset(DEFAULT_DATASET["path"]))}]
    settings = raw.setdefault("train", {})
    settings.setdefault("output_dir", str(workdir / "out"))
    settings.setdefault("sequence_len", 128)
    settings.setdefault("logging_steps", 1)
    settings["max_steps"] = steps or settings.get("max_steps", 2)
    raw.setdefault("data", {}).setdefault("cache_dir", str(workdir / "cache"))
    validated, enabled = validate_config(raw, base_dir=workdir)
    result = run_training(validated, enabled, resume=resume, overwrite=overwrite)
    return TrainedRun(result, read_metrics(result.output_dir), result.output_dir, validated)


def save_tiny_model(architecture: str, folder: str | Path) -> Path:
    """Save a tiny random-init model of ``architecture`` with the stories tokenizer into ``folder``."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    tiny_model(architecture).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_model()).save_pretrained(folder)
    return folder


TEST_ENVS = Path(os.environ.get("FTCORE_TEST_ENVS", "~/.cache/ftcore/test-envs")).expanduser()
"""Where ``cached_venv`` builds its environments (``FTCORE_TEST_ENVS`` moves them)."""
COMPLETE_MARKER = ".ftcore-complete"
PIP_ARGS = ("--disable-pip-version-check", "--timeout", "30", "--retries", "2")


class VenvBuildError(RuntimeError):
    pass


def cached_venv(
    name: str, install, *, timeout: float = 1800, hint: str = "", root: Path | None = None
) -> Path:
    """The python of the virtual environment ``TEST_ENVS/name``, built once: for a server that pins
    its own torch or transformers (vLLM, NeMo Gym) and runs as its own process, as users deploy it.

    ``install(pip, env_dir)`` fills the new environment; ``pip(*args)`` runs its pip (a failure raises).
    The build runs under a file lock (parallel test runs build it once), its output goes to
    ``name.build.log`` beside it, and the environment counts as built only once ``install`` returned;
    an interrupted build starts again. A failed build raises ``VenvBuildError`` with the log's end and
    ``hint`` (say how to point the tests at an existing environment instead). ``root`` replaces
    ``TEST_ENVS``.
    """
    import fcntl
    import json
    import shutil
    import subprocess
    import sys
    import time

    env_dir = (root or TEST_ENVS) / name
    python = env_dir / "bin" / "python"
    if (env_dir / COMPLETE_MARKER).exists():
        return python
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(env_dir.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if (env_dir / COMPLETE_MARKER).exists():
            return python
        log_path = env_dir.parent / f"{name}.build.log"
        started = time.time()
        with open(log_path, "w") as log:

            def pip(*args: str) -> None:
                command = [str(python), "-m", "pip", *args, *PIP_ARGS]
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
                left = max(60.0, started + timeout - time.time())
                result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=left)
                if result.returncode:
                    raise VenvBuildError(f"`pip {' '.join(args)}` failed with exit code {result.returncode}")

            try:
                shutil.rmtree(env_dir, ignore_errors=True)  # an interrupted build
                subprocess.run(
                    [sys.executable, "-m", "venv", str(env_dir)], check=True, stdout=log, stderr=log
                )
                install(pip, env_dir)
            except (OSError, subprocess.SubprocessError, VenvBuildError, StopIteration) as exc:
                log.flush()
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise VenvBuildError(
                    f"could not build the test environment {env_dir} ({exc!r}). {hint} Log {log_path}:\n{tail}"
                ) from None
        (env_dir / COMPLETE_MARKER).write_text(json.dumps({"seconds": round(time.time() - started)}))
        return python


def _fixture(*args, **kwargs):
    """``pytest.fixture`` where pytest is installed; without it the functions stay plain."""
    return pytest.fixture(*args, **kwargs) if pytest else lambda function: function


@_fixture(scope="session")
def ftcore_assets() -> Path:
    """The assets folder (``models/``, ``data/``)."""
    return assets_dir()


@_fixture(scope="session")
def ftcore_stories_model() -> Path:
    """The real pretrained tiny Llama (stories260K): a folder to use as ``model.base``."""
    return stories_model()


@_fixture(scope="session")
def ftcore_tiny_model_dir(tmp_path_factory):
    """``make(architecture="llama") -> Path``: a tiny random-init model folder (with the stories tokenizer)."""
    folders: dict[str, Path] = {}

    def make(architecture: str = "llama") -> Path:
        if architecture not in folders:
            folders[architecture] = save_tiny_model(architecture, tmp_path_factory.mktemp(architecture))
        return folders[architecture]

    return make


@_fixture
def run_ftcore(tmp_path):
    """``run_ftcore(config=None, *, plugins=(), steps=None, resume=False, overwrite=False) -> TrainedRun``:
    ``train`` in the test's ``tmp_path``."""

    def run(config: dict[str, Any] | None = None, **options) -> TrainedRun:
        return train(config, tmp_path, **options)

    return run
