"""The grpo loss family, advantages (GRPO and GDPO), None rewards and the KL term, on the real
stories260K through the real method and TRL trainer, against values computed here by hand."""

import json
import math
import statistics

import pytest
import torch

G = 4
MAX_COMPLETION = 12
PROMPTS = ["Once upon a time, there was a", "The little dog", "Lily and Ben went to the", "One day, a bird"]
REWARDS = '''
def by_length(completions, **kwargs):
    return [float(len(text) % 5) for text in completions]


def parity_x100(completions, **kwargs):
    return [100.0 * (len(text) % 2) for text in completions]


def none_first(completions, **kwargs):
    """None for the first completion of each group (rewards are called once per group)."""
    return [None] + [float(len(text) % 7) for text in completions[1:]]
'''


@pytest.fixture
def build(tmp_path, stories_config, stories_trainer):
    """``build(grpo, adapter="")``: the grpo trainer of a config on stories260K (2 prompt groups of 4 per
    step), via the real method."""

    def make(grpo: str, adapter: str = ""):
        (tmp_path / "grpo_test_rewards.py").write_text(REWARDS)
        path = stories_config(
            tmp_path, PROMPTS, adapter=adapter, data="shuffle = false",
            train=f"micro_batch_size = {2 * G}\nsequence_len = 64\nlearning_rate = 1e-3",
            grpo=f'stop = ["."]\n{grpo}', num_generations=G, completion_length=MAX_COMPLETION,
        )  # fmt: skip
        return stories_trainer(path)

    return make


def rollout(trainer):
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(G)]
    return trainer._generate_and_score_completions(rows), trainer.last_rollout


def token_logps(model, output, temperature=1.0):
    """Per-sample completion log-probs, each sequence run alone and unpadded, padded back like TRL's."""
    prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
    completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
    result = torch.zeros(completion_ids.shape)
    with torch.no_grad():
        for i in range(len(completion_ids)):
            prompt = prompt_ids[i][prompt_mask[i].bool()].tolist()
            tokens = completion_ids[i][completion_mask[i].bool()].tolist()
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1] / temperature
            result[i, : len(tokens)] = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    return result


def group_normalized(values, size):
    """(v - group mean) / (group std + 1e-4) with None skipped; None (or a group of < 2 values) -> None."""
    out = []
    for start in range(0, len(values), size):
        group = values[start : start + size]
        present = [v for v in group if v is not None]
        if len(present) < 2:
            out += [None] * len(group)
            continue
        mean, std = statistics.fmean(present), statistics.stdev(present)
        out += [None if v is None else (v - mean) / (std + 1e-4) for v in group]
    return out


def expected_advantages(rewards, weights, aggregation):
    if aggregation == "sum_then_normalize":  # GRPO: weighted sum, then normalised within each group
        totals = [
            None
            if all(v is None for v in sample)
            else sum(w * v for w, v in zip(weights, sample, strict=True) if v is not None)
            for sample in rewards
        ]
        return [0.0 if a is None else a for a in group_normalized(totals, G)]
    # GDPO: each reward normalised within its group, weighted and summed, then normalised over the batch
    per_reward = [group_normalized([sample[k] for sample in rewards], G) for k in range(len(weights))]
    totals = []
    for i, sample in enumerate(rewards):
        if all(v is None for v in sample):
            totals.append(None)
        else:
            totals.append(
                sum(w * per_reward[k][i] for k, w in enumerate(weights) if per_reward[k][i] is not None)
            )
    present = [t for t in totals if t is not None]
    mean, std = statistics.fmean(present), statistics.stdev(present)
    return [0.0 if t is None else (t - mean) / (std + 1e-4) for t in totals]


@pytest.mark.parametrize(
    ("aggregation", "rewards", "weights"),
    [
        ("sum_then_normalize", ["grpo_test_rewards:by_length", "grpo_test_rewards:none_first"], [1.0, 0.5]),
        ("normalize_then_sum", ["grpo_test_rewards:by_length", "grpo_test_rewards:parity_x100"], [1.0, 2.0]),
        ("sum_then_normalize", ["grpo_test_rewards:none_first"], [1.0]),
    ],
    ids=["grpo-partial-none", "gdpo", "grpo-all-none"],
)
def test_advantages_follow_the_aggregation_and_leave_none_out(build, aggregation, rewards, weights):
    trainer = build(
        f'rewards = {json.dumps(rewards)}\nreward_weights = {weights}\nreward_aggregation = "{aggregation}"',
    )
    output, rollout_ = rollout(trainer)
    assert rollout_.groups == [(0, G), (G, 2 * G)]
    if rewards[-1].endswith("none_first"):
        assert [sample[-1] is None for sample in rollout_.rewards] == [True, False, False, False] * 2
    expected = expected_advantages(rollout_.rewards, weights, aggregation)
    assert any(abs(a) > 0.1 for a in expected)
    torch.testing.assert_close(output["advantages"], torch.tensor(expected), atol=1e-4, rtol=1e-4)
    if rewards == ["grpo_test_rewards:none_first"]:  # the unscored samples get no advantage
        assert output["advantages"][0] == 0 and output["advantages"][G] == 0


def test_every_loss_type_matches_the_clipped_objective_by_hand(build):
    trainer = build(
        'rewards = ["grpo_test_rewards:by_length"]\nnum_iterations = 2\nepsilon = 0.05\nepsilon_high = 0.08\n'
        "temperature = 0.9",
    )
    assert (trainer.loss_type, trainer.epsilon_low, trainer.epsilon_high, trainer.temperature) == (
        "dapo",
        0.05,
        0.08,
        0.9,
    )
    output, _ = rollout(trainer)
    model = trainer.model
    old = token_logps(model, output, 0.9)
    torch.testing.assert_close(output["old_per_token_logps"], old, atol=1e-4, rtol=1e-4)  # num_iterations > 1
    with torch.no_grad():  # the policy moves: ratios leave 1, some get clipped
        model.model.norm.weight.add_(
            0.5 * torch.randn(model.model.norm.weight.shape, generator=torch.Generator().manual_seed(0))
        )
    new = token_logps(model, output, 0.9)
    mask = output["completion_mask"].float()
    advantages = output["advantages"][:, None]
    ratio = torch.exp(new - old)
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - 0.05, 1 + 0.08) * advantages)
    lengths = mask.sum(-1)
    expected = {
        "grpo": ((per_token * mask).sum(-1) / lengths).mean(),
        "bnpo": (per_token * mask).sum() / mask.sum(),
        "dr_grpo": (per_token * mask).sum() / (len(mask) * MAX_COMPLETION),
        "dapo": (per_token * mask).sum() / output["num_items_in_batch"],
    }
    assert len(set(lengths.tolist())) > 1  # stop strings make lengths differ: the aggregations differ
    low = ((ratio < 1 - 0.05) & (advantages < 0)).float()
    high = ((ratio > 1 + 0.08) & (advantages > 0)).float()
    assert (low + high).sum() > 0
    for loss_type, value in expected.items():
        trainer.loss_type = loss_type
        loss = trainer.compute_loss(model, output)
        torch.testing.assert_close(loss, value, atol=1e-5, rtol=1e-4, msg=loss_type)
        metrics = trainer._metrics["train"]
        assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(
            ((low * mask).sum() / mask.sum()).item(), abs=1e-6
        )
        assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(
            ((high * mask).sum() / mask.sum()).item(), abs=1e-6
        )


def kl_by_hand(ref, new, mask):
    per_token = torch.exp(ref - new) - (ref - new) - 1
    return per_token, ((per_token * mask).sum() / mask.sum()).item()


def test_kl_to_a_frozen_copy_under_full_fine_tuning(build):
    trainer = build('rewards = ["grpo_test_rewards:by_length"]\nbeta = 0.2\nloss_type = "bnpo"')
    model = trainer.model
    assert trainer.ref_model is not None and trainer.ref_model is not model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    output, _ = rollout(trainer)
    ref = token_logps(model, output)
    torch.testing.assert_close(output["ref_per_token_logps"], ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    new = token_logps(model, output)
    mask = output["completion_mask"].float()
    per_token_kl, mean_kl = kl_by_hand(ref, new, mask)
    loss = trainer.compute_loss(model, output)
    advantages = output["advantages"][:, None]
    expected = ((-advantages + 0.2 * per_token_kl) * mask).sum() / mask.sum()  # ratio 1 (one iteration)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert mean_kl > 0.01 and trainer._metrics["train"]["kl"][-1] == pytest.approx(mean_kl, rel=1e-4)


def test_kl_to_the_adapter_disabled_base_under_lora(build):
    trainer = build(
        'rewards = ["grpo_test_rewards:by_length"]\nbeta = 0.1',
        adapter='[adapter]\nkind = "lora"\nr = 4',
    )
    model = trainer.model
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # no "ref" adapter copy
    output, _ = rollout(trainer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    new = token_logps(model, output)
    with model.disable_adapter():
        base = token_logps(model, output)
    torch.testing.assert_close(output["ref_per_token_logps"], base, atol=1e-4, rtol=1e-4)
    _, mean_kl = kl_by_hand(base, new, output["completion_mask"].float())
    trainer.compute_loss(model, output)
    assert mean_kl > 0.001 and trainer._metrics["train"]["kl"][-1] == pytest.approx(mean_kl, rel=1e-3)
    assert math.isfinite(trainer._metrics["train"]["entropy"][-1])
