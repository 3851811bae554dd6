"""Async prefetch, importance-sampling correction, zero-advantage skipping and streaming scoring:
unit tests against values computed by hand, and runs on the real stories260K (hf backend)."""

import dataclasses
import json
import math

import pytest
import torch
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training
from ftcore_grpo.importance import importance_weights, metrics
from ftcore_grpo.prefetch import RolloutPlan
from trl.trainer.utils import RepeatSampler

# -- importance sampling, by hand

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, 0.0]])
GENERATOR = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, float("nan"), -9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# log rho per token: [0.5, -1.0, 0.0], [-0.1, nan -> 0, padding -> 0]


def test_token_level_truncates_at_the_cap():
    c = importance_weights(TRAINER, GENERATOR, MASK, level="token", mode="truncate", cap=1.5)
    expected = [[1.5, math.exp(-1.0), 1.0], [math.exp(-0.1), 1.0, 0.0]]  # e^0.5 = 1.65 > 1.5; padding 0
    torch.testing.assert_close(c.weights, torch.tensor(expected))
    assert c.capped.tolist() == [True, False, False, False, False]  # the 5 completion tokens


def test_token_level_masks_above_the_cap():
    c = importance_weights(TRAINER, GENERATOR, MASK, level="token", mode="mask", cap=1.5)
    expected = [[0.0, math.exp(-1.0), 1.0], [math.exp(-0.1), 1.0, 0.0]]
    torch.testing.assert_close(c.weights, torch.tensor(expected))


@pytest.mark.parametrize(("mode", "first"), [("truncate", 0.9), ("mask", 0.0)])
def test_sequence_level_uses_the_product_of_the_token_ratios(mode, first):
    # sequence 0: log rho = 0.5 - 1 + 0 = -0.5 (0.607, under the cap); sequence 1: -0.1 (0.905 > 0.9)
    c = importance_weights(TRAINER, GENERATOR, MASK, level="sequence", mode=mode, cap=0.9)
    torch.testing.assert_close(c.weights, torch.tensor([[math.exp(-0.5)], [first]]))
    assert c.weights.shape == (2, 1) and c.capped.tolist() == [False, True]


def test_metrics_of_a_batch():
    c = importance_weights(TRAINER, GENERATOR, MASK, level="token", mode="truncate", cap=1.5)
    m = metrics(c)
    ratios = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(-0.1), 1.0]
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(math.exp(-1.0))
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(math.exp(0.5))
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(sum(ratios) / 5)
    assert m["sampling/importance_sampling_capped_fraction"] == pytest.approx(0.2)
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx((0.5 + 1.0 + 0 + 0.1 + 0) / 5)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(1.0)


# -- the prompt plan of async prefetch


def test_the_plan_replays_the_trainers_sampler_across_epochs():
    data = [{"prompt_ids": [i]} for i in range(5)]
    options = dict(mini_repeat_count=2, batch_size=2, repeat_count=3, shuffle=True, seed=7)
    plan = RolloutPlan(data, RepeatSampler(data, **options), batch_size=4)
    loader = RepeatSampler(data, **options)  # what the trainer's loader iterates, epoch after epoch
    flat = list(loader) + list(loader) + list(loader)
    batches = [flat[i : i + 4] for i in range(0, len(flat), 4)][::3]  # each batch repeated 3 times
    assert len(batches) == 6  # 2 full batches of 2 prompts per epoch (the 5th prompt is left out)
    for index, batch in enumerate(batches):
        assert [row["prompt_ids"] for row in plan.rows(index)] == [[i] for i in batch]
    assert plan.rows(2)[0] == data[batches[2][0]]


# -- runs on stories260K

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "fox"]
REWARDS = """
def by_length(completions, **kwargs):
    return [float(len(text) % 3) for text in completions]


def always_one(completions, **kwargs):
    return [1.0 for _ in completions]
"""


@pytest.fixture
def write_config(stories_config):
    """``write(tmp_path, steps=, grpo=, rewards=)``: the async tests' config on stories260K."""

    def write(tmp_path, *, steps=3, grpo="", rewards='["grpo_async_rewards:by_length"]'):
        (tmp_path / "grpo_async_rewards.py").write_text(REWARDS)
        return stories_config(
            tmp_path,
            [f"Once upon a time, there was a {a} who" for a in ANIMALS],
            train=f"micro_batch_size = 4\ngradient_accumulation_steps = 2\nsequence_len = 48\nmax_steps = {steps}\n"
            "save_steps = 2\nlogging_steps = 1\nlearning_rate = 5e-3\nseed = 1",
            grpo=f'rewards = {rewards}\nimportance_sampling = "token"\nlog_completions_steps = 1\n{grpo}',
        )

    return write


DIFFERENCE = "sampling/sampling_logp_difference/max"


def train(path, *overrides):
    config, plugins = load_config(path, list(overrides))
    result = run_training(config, plugins)
    return result, [row for row in read_metrics(result.output_dir) if "loss" in row]


def completion_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "completions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_async_without_staleness_equals_the_synchronous_run(tmp_path, write_config):
    """prefetch_depth = 0: the background thread and the generating copy, but no batch ahead."""
    path = write_config(tmp_path)
    _, sync = train(path, "train.output_dir=sync")
    result, prefetched = train(
        path, "train.output_dir=async", "grpo.async_prefetch=true", "grpo.prefetch_depth=0"
    )
    assert [row["loss"] for row in prefetched] == pytest.approx([row["loss"] for row in sync], abs=1e-6)
    assert [row["reward"] for row in prefetched] == [row["reward"] for row in sync]
    assert all(row["policy/version_lag_max"] == 0 for row in prefetched)
    assert [r["completion"] for r in completion_rows(result.output_dir)] == [
        r["completion"] for r in completion_rows(tmp_path / "sync")
    ]


@pytest.mark.slow
def test_prefetched_batches_lag_and_are_corrected_with_the_generators_logprobs(tmp_path, write_config):
    path = write_config(tmp_path, steps=4, grpo="async_prefetch = true\nprefetch_depth = 1")
    result, rows = train(path)
    # rollout 0 waits for weights 0; rollout r >= 1 was generated while step r - 1 trained
    assert [row["policy/version_lag_max"] for row in rows] == [0, 1, 1, 1]
    versions = {}
    for row in completion_rows(result.output_dir):
        versions.setdefault(row["step"], set()).add(row["policy_version"])
    assert versions == {1: {0}, 2: {0}, 3: {1}, 4: {2}}
    # lag 0: the generator's log-probs are the trainer's (up to kernels); lag 1: they differ
    assert rows[0][DIFFERENCE] < 1e-4
    assert rows[0]["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    # a step whose groups all scored alike trains nothing and logs no correction: at least one lagged step does
    lagged = [row[DIFFERENCE] for row in rows[1:] if DIFFERENCE in row]
    assert lagged and max(lagged) > 1e-3
    assert all(row["skipped_zero_adv_batches"] >= 0 for row in rows)


@pytest.mark.gpu
def test_prefetch_generates_on_a_second_gpu(tmp_path, write_config):
    """hf_device = "cuda:1": the generating copy lives (and decodes) on the second GPU while the
    policy trains on the first; the batches lag and carry their versions as on one device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    grpo = 'async_prefetch = true\nprefetch_depth = 1\nhf_device = "cuda:1"'
    # fp32 on both sides: under bf16 autocast the trainer's log-probs differ from the copy's by ~0.06
    result, rows = train(write_config(tmp_path, steps=4, grpo=grpo), 'train.precision="fp32"')
    assert torch.cuda.max_memory_allocated(1) > 0  # the copy and its KV cache were on cuda:1
    assert [row["policy/version_lag_max"] for row in rows] == [0, 1, 1, 1]
    versions = {row["step"]: row["policy_version"] for row in completion_rows(result.output_dir)}
    assert versions == {1: 0, 2: 0, 3: 1, 4: 2}
    assert rows[0][DIFFERENCE] < 1e-3  # lag 0: same weights on both GPUs


@pytest.mark.slow
def test_prefetch_with_sync_interval_lags_up_to_the_interval(tmp_path, write_config):
    grpo = "async_prefetch = true\nprefetch_depth = 1\nsync_interval = 2\nimportance_sampling_mode = 'mask'"
    _, rows = train(write_config(tmp_path, steps=5, grpo=grpo))
    # syncs at steps 0, 2, 4; rollout r (trained at step r) is generated at step r - 1 with the last sync
    assert [row["policy/version_lag_max"] for row in rows] == [0, 1, 2, 1, 2]


@pytest.mark.slow
def test_all_zero_advantage_micro_batches_are_skipped_and_counted(tmp_path, write_config):
    """A constant reward: every advantage is 0, both micro-batches of every step skip."""
    path = write_config(tmp_path, steps=2, rewards='["grpo_async_rewards:always_one"]')
    result, rows = train(path)
    assert [row["skipped_zero_adv_batches"] for row in rows] == [2, 2]
    assert all(row["grad_norm"] == 0 for row in rows) and "entropy" not in rows[0]
    _, kept = train(path, "train.output_dir=kept", "grpo.skip_zero_advantage_batches=false")
    assert "skipped_zero_adv_batches" not in kept[0] and "entropy" in kept[0]


# -- the correction inside the trainer, by hand


@pytest.fixture
def build_trainer(stories_trainer):
    """``build_trainer(path)``: the grpo trainer of the config at ``path`` (2 prompt groups of 4 per step)."""
    return lambda path: stories_trainer(
        path, ["train.micro_batch_size=8", "train.gradient_accumulation_steps=1"]
    )


def completion_logps(model, output):
    """Each completion's token log-probs, the sequence run alone and unpadded (padding: 0)."""
    result = torch.zeros(output["completion_ids"].shape)
    with torch.no_grad():
        for i in range(len(result)):
            prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
            tokens = output["completion_ids"][i][output["completion_mask"][i].bool()].tolist()
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
            result[i, : len(tokens)] = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    return result


def move_the_policy_after_each_rollout(trainer) -> None:
    """After sampling, change the policy by an optimizer step's worth (seeded): as with a stale generator."""
    produce = trainer.producer.produce

    def produce_then_train(rows, index):
        rollout = produce(rows, index)
        torch.manual_seed(0)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        return rollout

    trainer.producer.produce = produce_then_train


def test_stale_completions_are_weighted_and_masked_in_the_loss(tmp_path, write_config, build_trainer):
    """The policy moves after sampling (as with a stale generator): advantages are weighted by
    min(p_trainer / p_generator, C) per token, and off-policy sequence masking drops the
    negative-advantage sequences whose mean log-prob gap exceeds the threshold."""
    cap, threshold = 1.05, 0.02
    trainer = build_trainer(
        write_config(
            tmp_path, grpo=f"importance_sampling_cap = {cap}\noff_policy_mask_threshold = {threshold}"
        )
    )
    move_the_policy_after_each_rollout(trainer)
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(4)]
    output = trainer._generate_and_score_completions(rows)
    rollout = trainer.last_rollout
    mask = output["completion_mask"].float()
    generator = torch.zeros_like(mask)
    for i, completion in enumerate(rollout.completions):
        generator[i, : len(completion.logprobs)] = torch.tensor(completion.logprobs)
    trainer_logps = completion_logps(trainer.model, output)
    rewards = torch.tensor([sample[0] for sample in rollout.rewards]).view(2, 4)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    weights = torch.exp(trainer_logps - generator).clamp(max=cap) * mask
    assert (weights * mask).max() == pytest.approx(cap) and (weights[mask.bool()] < cap).any()
    assert "old_per_token_logps" not in output  # no extra forward: the loss forward's log-probs serve
    loss = trainer.compute_loss(trainer.model, output)
    torch.testing.assert_close(output["advantages"], advantages[:, None] * weights, atol=1e-4, rtol=1e-4)

    gap = ((generator - trainer_logps) * mask).sum(1) / mask.sum(1)
    keep = (advantages >= 0) | (gap <= threshold)
    assert not keep.all() and keep.any()  # the case is exercised
    expected = -(keep[:, None] * advantages[:, None] * weights).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ratios = torch.exp(trainer_logps - generator)[mask.bool()]
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(ratios.max().item(), rel=1e-4)
    assert metrics["sampling/importance_sampling_capped_fraction"] == pytest.approx(
        (ratios > cap).float().mean().item()
    )


def test_streaming_scores_chunks_of_groups_as_they_are_generated(tmp_path, write_config, build_trainer):
    from ftcore_grpo.rollout import RolloutProducer, rollout_seed

    trainer = build_trainer(write_config(tmp_path))
    base = trainer.producer
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(4)]
    whole = base.produce(rows, 5)

    def producer(streaming_groups):
        return RolloutProducer(
            base.generator, base.scorer, base.sampling, seed=base.seed, streaming_groups=streaming_groups
        )

    one_chunk = producer(2).produce(rows, 5)
    assert [c.token_ids for c in one_chunk.completions] == [c.token_ids for c in whole.completions]
    streamed = producer(1).produce(rows, 5)
    assert streamed.groups == [(0, 4), (4, 8)] and len(streamed.completions) == 8
    # chunk c is sampled alone, with the rollout's seed + c
    seed = rollout_seed(base.seed, 5)
    for chunk in (0, 1):
        sampling = dataclasses.replace(base.sampling, seed=seed + chunk)
        alone = base.generator.generate([rows[4 * chunk]["prompt_ids"]], 4, sampling)[0]
        got = streamed.completions[4 * chunk : 4 * chunk + 4]
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert [r[0] for r in streamed.rewards] == [float(len(c.text) % 3) for c in streamed.completions]
    assert streamed.failures == {"grpo_async_rewards:by_length": 0}


@pytest.mark.slow
def test_evaluation_waits_for_the_prefetching_thread(tmp_path, write_config):
    """Evaluation shares the generator and the reward workers: queued batches are dropped first."""
    grpo = "async_prefetch = true\nprefetch_depth = 2\nreward_workers = 1"
    path = write_config(tmp_path, steps=4, grpo=grpo)
    result, rows = train(path, "data.val_fraction=0.25", "train.eval_steps=2")
    evaluations = [row for row in read_metrics(result.output_dir) if "eval_reward" in row]
    assert [row["step"] for row in evaluations] == [0, 2, 4] and len(rows) == 4
    assert all(row["policy/version_lag_max"] <= 2 for row in rows)


@pytest.mark.slow
def test_two_processes_rank_0_generates_and_broadcasts(tmp_path, write_config):
    """``ftcore run --nproc 2`` on the CPU (gloo): one group per process, prefetched by rank 0."""
    import os
    import subprocess
    import sys

    path = write_config(tmp_path, grpo="async_prefetch = true\nprefetch_depth = 1")
    command = [sys.executable, "-m", "ftcore.cli", "run", str(path), "--nproc", "2",
               "--set", "train.micro_batch_size=2"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [row for row in read_metrics(tmp_path / "out") if "loss" in row]
    assert [row["policy/version_lag_max"] for row in rows] == [0, 1, 1]
    assert rows[0]["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    samples = completion_rows(tmp_path / "out")
    assert [row["rollout"] for row in samples] == [0] * 4 + [1] * 4 + [2] * 4  # rank 0's group


def test_the_kl_term_can_take_the_same_correction(tmp_path, write_config, build_trainer):
    """beta > 0 with importance_sampling_kl: each token's KL to the reference is weighted by its
    (capped) importance weight, so the loss is -sum(A w) / N + beta * sum(w KL) / N (dapo)."""
    beta, cap = 0.5, 10.0
    trainer = build_trainer(
        write_config(
            tmp_path, grpo=f"beta = {beta}\nimportance_sampling_cap = {cap}\nimportance_sampling_kl = true"
        )
    )
    move_the_policy_after_each_rollout(trainer)
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(4)]
    output = trainer._generate_and_score_completions(rows)
    mask = output["completion_mask"].float()
    generator = torch.zeros_like(mask)
    for i, completion in enumerate(trainer.last_rollout.completions):
        generator[i, : len(completion.logprobs)] = torch.tensor(completion.logprobs)
    policy = completion_logps(trainer.model, output)
    reference = completion_logps(trainer.ref_model, output)
    weights = torch.exp(policy - generator).clamp(max=cap) * mask
    gap = reference - policy
    kl = (torch.exp(gap) - gap - 1) * mask
    assert kl.sum() > 1e-3 and (weights[mask.bool()] - 1).abs().max() > 0.05  # both matter
    loss = trainer.compute_loss(trainer.model, output)
    advantages = output["advantages"]  # weighted by the loss (checked above)
    expected = (-(advantages * mask).sum() + beta * (weights * kl).sum()) / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    uncorrected = (-(advantages * mask).sum() + beta * kl.sum()) / mask.sum()
    assert abs(uncorrected.item() - expected.item()) > 1e-3
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx((kl.sum() / mask.sum()).item(), rel=1e-3)
