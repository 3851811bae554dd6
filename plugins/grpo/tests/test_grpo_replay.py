"""The replay buffer and the re-roll queue against outcomes worked out by hand, their checkpoint
round trip, and a run on stories260K that replays, re-rolls and resumes with its buffer."""

import io
import json

import pytest
import torch
from ftcore.checkpoint import step_dir
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training
from ftcore_grpo.generation import Completion
from ftcore_grpo.replay import Replay
from ftcore_grpo.rollout import Rollout, prompt_groups


def rollout(batch: str, scores: list[list[float | None]]) -> Rollout:
    """Groups of 2 samples; prompt ``{batch}{group}``; one reward per sample."""
    rows, completions, rewards = [], [], []
    for g, group in enumerate(scores):
        for i, score in enumerate(group):
            rows.append({"prompt": f"{batch}{g}", "prompt_ids": [ord(batch), g]})
            completions.append(Completion([g, i], f"{batch}{g}.{i}", [-1.0, -2.0], "stop", 0))
            rewards.append([score])
    return Rollout(0, rows, completions, rewards, {"r": 0}, prompt_groups(rows), 0.0, 0.0)


def test_zero_signal_groups_are_replaced_by_the_newest_varied_groups_once():
    replay = Replay(buffer_size=2)
    first, replayed = replay.apply(rollout("a", [[1, 0], [0, 0], [1, 1], [2, 5]]), [1.0], 2)
    assert replayed == [False] * 8 and first.rows[0]["prompt"] == "a0"  # nothing buffered yet
    assert [g["rows"][0]["prompt"] for g in replay.buffer] == ["a0", "a3"]  # the varied ones
    second, replayed = replay.apply(rollout("b", [[3, 3], [0.5, 0.5], [1, None], [4, 2]]), [2.0], 2)
    # b0, b1, b2 give no signal (b2: one score present); the newest buffered group goes first
    assert replayed == [True, True, True, True, False, False, False, False]
    assert [row["prompt"] for row in second.rows] == ["a3", "a3", "a0", "a0", "b2", "b2", "b3", "b3"]
    assert [c.text for c in second.completions[:2]] == ["a3.0", "a3.1"]
    assert second.rewards[:4] == [[2], [5], [1], [0]]
    assert second.groups == first.groups
    assert [g["rows"][0]["prompt"] for g in replay.buffer] == ["b3"]  # each group replayed once


def test_the_buffer_keeps_the_newest_groups_and_weights_decide_the_signal():
    replay = Replay(buffer_size=1)
    replay.apply(rollout("a", [[1, 0], [0, 2]]), [1.0], 2)
    assert [g["rows"][0]["prompt"] for g in replay.buffer] == ["a1"]
    replay.apply(rollout("b", [[1, 0]]), [0.0], 2)  # weight 0: every total is 0, no signal, replaced
    assert not replay.buffer


def test_failed_prompts_are_re_rolled_once_training_is_far_enough():
    replay = Replay(buffer_size=0, reroll_start_fraction=0.5, reroll_max_groups=2)
    replay.apply(rollout("a", [[0, 0], [1, 0], [0, None], [0, 0]]), [1.0], 2)  # a0, a2, a3 scored 0
    assert [row["prompt"] for row in replay.rerolls] == ["a0", "a2", "a3"]
    rows = rollout("b", [[1, 1]] * 3).rows
    assert replay.reroll(rows, progress=0.4, size=2) == rows  # not yet
    rerolled = replay.reroll(rows, progress=0.5, size=2)
    assert [row["prompt"] for row in rerolled] == ["b0", "b0", "a0", "a0", "a2", "a2"]  # the last 2 groups
    assert [row["prompt"] for row in replay.reroll(rows, progress=0.9, size=2)] == [
        "b0",
        "b0",
        "b1",
        "b1",
        "a3",
        "a3",
    ]
    assert not replay.rerolls and replay.reroll(rows, progress=1.0, size=2) == rows


def test_the_re_roll_queue_keeps_only_what_the_batches_left_can_take():
    replay = Replay(buffer_size=0, reroll_start_fraction=0.5, reroll_max_groups=2)
    replay.apply(rollout("a", [[0, 0]] * 7), [1.0], 2)  # 7 failed prompts queued, a0 the oldest
    replay.bound_rerolls(4)  # 2 x 4 = 8 fit: all kept
    assert len(replay.rerolls) == 7
    replay.bound_rerolls(2)  # 2 x 2 = 4 fit: the oldest three dropped
    rows = rollout("b", [[1, 1]] * 3).rows
    assert [row["prompt"] for row in replay.reroll(rows, progress=0.6, size=2)] == [
        "b0", "b0", "a3", "a3", "a4", "a4",
    ]  # fmt: skip
    assert [row["prompt"] for row in replay.rerolls] == ["a5", "a6"]


def test_state_round_trips_through_a_weights_only_checkpoint():
    replay = Replay(buffer_size=3, reroll_start_fraction=0.0)
    replay.apply(rollout("a", [[1, 0], [0, 0]]), [1.0], 2)
    buffer = io.BytesIO()
    torch.save(replay.state_dict(), buffer)
    buffer.seek(0)
    restored = Replay(buffer_size=3, reroll_start_fraction=0.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state_dict() == replay.state_dict()
    again, replayed = restored.apply(rollout("b", [[1, 1]]), [1.0], 2)
    assert replayed == [True, True] and again.completions[0] == rollout("a", [[1, 0]]).completions[0]
    assert [row["prompt"] for row in restored.reroll(rollout("c", [[1, 1]]).rows, 0.0, 2)] == ["a1", "a1"]


REWARDS = """
def cats_fail(completions, prompts, **kwargs):
    return [0.0 if "cat" in p else float(len(t) % 3) for t, p in zip(completions, prompts)]
"""


@pytest.mark.slow
def test_a_run_replays_re_rolls_and_resumes_with_its_buffer(tmp_path, stories_config):
    (tmp_path / "grpo_replay_rewards.py").write_text(REWARDS)
    animals = ["cat", "dog", "cat", "fox", "cat", "owl", "cat", "eel"]
    path = stories_config(
        tmp_path,
        [f"Once upon a time, there was a {a} who" for a in animals],
        data="shuffle = false",
        train="micro_batch_size = 8\nsequence_len = 48\nmax_steps = 4\nsave_steps = 2\nlogging_steps = 1\n"
        "learning_rate = 5e-3",
        grpo='rewards = ["grpo_replay_rewards:cats_fail"]\nreplay_buffer_size = 4\nreroll_start_fraction = 0.5\n'
        "log_completions_steps = 1",
    )
    config, plugins = load_config(path)
    result = run_training(config, plugins)
    metrics = [row for row in read_metrics(result.output_dir) if "loss" in row]
    assert sum(row["replayed_groups"] for row in metrics) >= 1  # a cat group was replaced
    # cat prompts score 0: queued in steps 1-2, generated again from step 3 (half of 4 steps done)
    assert [row["rerolled_groups"] for row in metrics] == [0, 0, 1, 1]
    state = torch.load(step_dir(result.output_dir, 2) / "plugin_state.pt", weights_only=True)["grpo"][
        "replay"
    ]
    assert state["buffer"] and all("cat" not in g["rows"][0]["prompt"] for g in state["buffer"])
    assert all("cat" in row["prompt"] for row in state["rerolls"])
    prompts = [json.loads(line)["prompt"] for line in (result.output_dir / "completions.jsonl").open()]
    assert prompts  # the run logged its samples

    # --resume from step 2 restores the buffer: the trainer starts from the checkpoint's state
    from ftcore.methods import Run
    from ftcore.model import load_model_and_tokenizer
    from ftcore_grpo import plugin
    from ftcore_grpo.method import GRPOMethod

    model, tokenizer = load_model_and_tokenizer(config, plugins)
    run = Run(config=config, plugins=plugins, model=model, tokenizer=tokenizer, output_dir=tmp_path / "again")
    saved = torch.load(step_dir(result.output_dir, 2) / "plugin_state.pt", weights_only=True)["grpo"]
    plugin.restore_checkpoint_state(saved, run)
    trainer = GRPOMethod().build_trainer(run)
    assert trainer.replay.state_dict() == state
