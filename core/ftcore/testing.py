"""Helpers for tests: the one test-asset locator and tiny real-architecture models.

The assets (the pretrained ``models/stories260K-hf`` and the ``data/`` subsets, listed with their
sources and licences in ``ftcore/testdata/README.md``) ship inside the ftcore package, so a clone or
a plugin's own tests find them with nothing set. ``FTCORE_TEST_ASSETS`` points the locator at
another folder with the same layout instead.
"""

from __future__ import annotations

import os
from pathlib import Path

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
