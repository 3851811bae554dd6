"""The packed policy forward (``[grpo] packed_forward``, ``ftcore_grpo.packed``) against TRL's padded
one, on the real stories260K through the real method and TRL trainer: per-token log-probs, entropies
and gradients, training losses under LoRA and under full fine-tuning with a KL term, and which
log-prob kernels run (Triton under ``TRITON_INTERPRET=1``, the torch reference otherwise)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training
from ftcore.speed import VARLEN, register_varlen_attention, varlen_attention_forward
from ftcore_grpo import logprobs
from ftcore_grpo.packed import pack_rows
from transformers import AttentionInterface

G = 4
PROMPTS = [
    "Once upon a time, there was a little girl named Lily who liked to play in the big park with her dog",
    "The dog",
    "Lily and Ben went to the big park",
    "One day",
]
REWARDS = """
def by_length(completions, **kwargs):
    return [float(len(text) % 5) for text in completions]
"""
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON = INTERPRETED or torch.cuda.is_available()
"""Where ``ftcore_grpo.logprobs`` runs its Triton kernels."""


@pytest.fixture
def write_config(stories_config):
    """``write_config(folder, grpo="", adapter="", train="", dtype="float32")``: grpo on stories260K over
    ``PROMPTS`` (prompts of 3 to 25 tokens; "." ends completions early)."""

    def write(
        folder: Path, *, grpo: str = "", adapter: str = "", train: str = "", dtype: str = "float32"
    ) -> Path:
        (folder / "grpo_packed_rewards.py").write_text(REWARDS)
        return stories_config(
            folder, PROMPTS, adapter=adapter, dtype=dtype, data="shuffle = false",
            train=f"micro_batch_size = {2 * G}\nsequence_len = 64\nlearning_rate = 1e-3\nseed = 1\n{train}",
            grpo=f'stop = ["."]\nrewards = ["grpo_packed_rewards:by_length"]\n{grpo}', num_generations=G,
            completion_length=12,
        )  # fmt: skip

    return write


@pytest.fixture
def build(tmp_path, write_config, stories_trainer):
    """``build(grpo="", dtype="float32")``: the trainer and one scored rollout of 4 prompts x 2."""

    def make(grpo: str = "", dtype: str = "float32"):
        trainer = stories_trainer(write_config(tmp_path, grpo=grpo, dtype=dtype))
        rows = [trainer.train_dataset[i] for i in (0, 1, 2, 3) for _ in range(G // 2)]
        return trainer, trainer._generate_and_score_completions(rows)

    return make


def forward(trainer, output, *, packed: bool, batch_size=None):
    """``_get_per_token_logps_and_entropies`` of the policy as TRL's loss calls it, packed or padded."""
    trainer.grpo.packed_forward = packed
    return trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
        torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
        output["completion_ids"].shape[1],
        batch_size=batch_size,
        compute_entropy=True,
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_log_probs_entropies_and_gradients_equal_the_padded_ones(build, tmp_path, temperature):
    trainer, output = build(f"temperature = {temperature}")
    prompt_mask, mask = output["prompt_mask"], output["completion_mask"].bool()
    prompt_lengths, completion_lengths = prompt_mask.sum(1), mask.sum(1)
    assert len(set(prompt_lengths.tolist())) > 1 and len(set(completion_lengths.tolist())) > 1  # padded
    lengths = (prompt_lengths + completion_lengths).tolist()
    assert len(pack_rows(lengths)) < len(lengths)  # some packed rows hold several rows
    weight = trainer.model.model.layers[0].self_attn.q_proj.weight
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    results = {}
    for packed, batch_size in ((False, None), (True, None), (True, 3)):
        logps, entropies, _ = forward(trainer, output, packed=packed, batch_size=batch_size)
        (grad,) = torch.autograd.grad((logps * weights * mask).sum(), weight)
        results[packed, batch_size] = logps, entropies, grad
    padded = results[False, None]
    for key in ((True, None), (True, 3)):
        logps, entropies, grad = results[key]
        assert logps.shape == padded[0].shape and entropies.shape == padded[1].shape
        torch.testing.assert_close(logps[mask], padded[0][mask], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(entropies[mask], padded[1][mask], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad, padded[2], atol=1e-4, rtol=1e-3)
        assert not logps[~mask].any()
    assert padded[2].abs().max() > 1e-3


def test_varlen_attention_gets_the_rows_boundaries(build, tmp_path):
    """Under ftcore's varlen attention (flash varlen on a GPU; here SDPA per document) the packed forward
    passes the rows' boundaries (``cu_seq_lens``): the padded forward's log-probs under sdpa."""
    trainer, output = build()
    mask = output["completion_mask"].bool()
    padded = forward(trainer, output, packed=False)[0].detach()
    boundaries = []

    def recorded(module, query, key, value, attention_mask, **kwargs):
        boundaries.append(kwargs.get("cu_seq_lens_q"))
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    config = trainer.model.config
    config._attn_implementation = register_varlen_attention()
    AttentionInterface.register(VARLEN, recorded)
    try:
        logps = forward(trainer, output, packed=True)[0].detach()
    finally:
        config._attn_implementation = "sdpa"
        register_varlen_attention()
    assert boundaries and all(b is not None for b in boundaries)
    torch.testing.assert_close(logps[mask], padded[mask], atol=1e-4, rtol=1e-4)


def test_pack_rows_fills_bins_of_the_longest_row_first_fit_decreasing():
    assert pack_rows([5, 2, 3, 5, 1]) == [[0], [3], [2, 1], [4]]
    assert pack_rows([4, 4]) == [[0], [1]]


def test_bf16_packed_log_probs_are_within_rounding_of_the_padded_ones(build, tmp_path):
    """bf16 weights, temperature 0.7: the two forwards differ by bf16 rounding only (measured on this
    batch: padded and packed are 0.012 and 0.017 from a float32 forward of the same weights, on average)."""
    trainer, output = build("temperature = 0.7", dtype="bfloat16")
    assert trainer.model.dtype == torch.bfloat16
    mask = output["completion_mask"].bool()
    padded, packed = (forward(trainer, output, packed=p)[0].detach() for p in (False, True))
    assert packed.dtype == torch.float32
    gap = (packed - padded)[mask].abs()
    assert gap.mean() < 0.03 and gap.max() < 0.25


def test_a_micro_batch_without_completion_tokens_gives_zeros_and_a_gradient(build, tmp_path):
    trainer, output = build()
    output["completion_mask"] = torch.zeros_like(output["completion_mask"])  # e.g. all truncated and masked
    logps, entropies, _ = forward(trainer, output, packed=True)
    assert not logps.any() and not entropies.any()
    logps.sum().backward()


def losses(
    write_config, folder: Path, *, packed: bool, grpo: str = "", adapter: str = ""
) -> list[tuple[float, float]]:
    """(loss, grad_norm) of each of 3 training steps."""
    folder.mkdir()
    path = write_config(
        folder,
        grpo=f"packed_forward = {str(packed).lower()}\n{grpo}",
        adapter=adapter,
        train="max_steps = 3\nlogging_steps = 1\ngradient_accumulation_steps = 1",
    )
    config, plugins = load_config(path)
    result = run_training(config, plugins)
    return [(row["loss"], row["grad_norm"]) for row in read_metrics(result.output_dir) if "loss" in row]


@pytest.mark.parametrize(
    ("grpo", "adapter"),
    [("", '[adapter]\nkind = "lora"\nr = 4'), ("beta = 0.1\nnum_iterations = 2", "")],
    ids=["lora", "full-beta-iterations"],
)
def test_training_losses_equal_the_padded_path(write_config, tmp_path, grpo, adapter):
    padded = losses(write_config, tmp_path / "padded", packed=False, grpo=grpo, adapter=adapter)
    packed = losses(write_config, tmp_path / "packed", packed=True, grpo=grpo, adapter=adapter)
    assert len(padded) == 3 and any(abs(loss) > 1e-2 for loss, _ in padded)
    for (loss, grad_norm), (expected_loss, expected_norm) in zip(packed, padded, strict=True):
        assert loss == pytest.approx(expected_loss, abs=1e-5, rel=1e-4)
        assert grad_norm == pytest.approx(expected_norm, rel=1e-4)


def test_the_packed_forward_runs_the_triton_kernels_when_interpreted(build, tmp_path, monkeypatch):
    """Triton's autograd functions under ``TRITON_INTERPRET=1`` (a subprocess: it must be set before
    triton loads), the torch references otherwise; counted by wrappers that call the real ones."""
    if not TRITON:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--import-mode=importlib",
             __file__, "-k", "test_the_packed_forward_runs_the_triton_kernels_when_interpreted"],
            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0 and " passed" in result.stdout, (
            result.stdout[-6000:] + result.stderr[-3000:]
        )
    calls = {}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        logprobs._SelectiveLogSoftmax, "apply", counted("triton", logprobs._SelectiveLogSoftmax.apply)
    )
    monkeypatch.setattr(logprobs._Entropy, "apply", counted("triton_entropy", logprobs._Entropy.apply))
    for name in ("selective_log_softmax_reference", "entropy_from_logits_reference"):
        monkeypatch.setattr(logprobs, name, counted(name, getattr(logprobs, name)))
    trainer, output = build()
    calls.clear()
    logps, _, _ = forward(trainer, output, packed=True)
    forward_calls = dict(calls)
    logps.sum().backward()  # the LM head's chunk is recomputed: the log-prob function runs again
    if TRITON:
        assert (forward_calls, calls) == (
            {"triton": 1, "triton_entropy": 1},
            {"triton": 2, "triton_entropy": 1},
        )
    else:
        assert forward_calls == {"selective_log_softmax_reference": 1, "entropy_from_logits_reference": 1}
        assert calls["selective_log_softmax_reference"] == 2
    assert trainer.model.model.layers[0].mlp.up_proj.weight.grad.abs().max() > 0
