"""Built-in rewards, the reward registry, and scoring in this process and in worker processes."""

import time

import pytest
from ftcore.plugins import Plugins
from ftcore_grpo.rewards import boxed_accuracy, gsm8k_accuracy, length_penalty, regex_format
from ftcore_grpo.scoring import Reward, RewardScorer

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


def test_builtin_rewards():
    assert gsm8k_accuracy(
        ["48 + 24 = 72 clips.", "The answer is 24.", "#### 72.0", "no number", "It is $1,234"],
        [GSM8K_ANSWER, GSM8K_ANSWER, GSM8K_ANSWER, GSM8K_ANSWER, "#### 1234"],
    ) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert gsm8k_accuracy(["3 + 4 = 7", "7"], ["7", "8"]) == [1.0, 0.0]  # bare answers (the quickstart's)
    assert boxed_accuracy(
        [
            "so \\boxed{72}.",
            "\\boxed{\\dfrac{1}{2}}",
            "\\boxed{x^{2}} then \\boxed{\\{1, 2\\}}",
            "72",
            "\\boxed{1,234}",
        ],
        [GSM8K_ANSWER, "\\boxed{\\frac{1}{2}}", "\\{1,2\\}", "72", "1234"],
    ) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert regex_format(["<think>a\nb</think> <answer>4</answer>", "<answer>4</answer>"]) == [1.0, 0.0]
    assert regex_format(["Answer: 4", "4"], pattern=r"Answer: \d+") == [1.0, 0.0]
    assert length_penalty(["", "", "", ""], completion_ids=[[0] * 10, [0] * 13, [0] * 14, [0] * 20], max_completion_length=16) == [
        0.0, -0.25, -0.5, -1.0,
    ]  # fmt: skip


def test_builtins_are_in_the_reward_registry():
    registry = Plugins(["grpo"]).registry("reward")
    assert {"gsm8k_accuracy", "boxed_accuracy", "regex_format", "length_penalty"} <= set(registry.names())
    assert registry.get("gsm8k_accuracy") is gsm8k_accuracy


def scored(completions, **kwargs):
    return [float(len(text)) for text in completions]


def explodes(completions, **kwargs):
    raise ZeroDivisionError("boom")


def test_a_raising_reward_scores_none_in_process_and_is_counted():
    scorer = RewardScorer([Reward("length", scored), Reward("broken", explodes)])
    scores = scorer.score(["ab", "abc", "a", "abcd"], [(0, 2), (2, 4)], {"answer": ["x", "x", "y", "y"]})
    assert scores.values == [[2.0, None], [3.0, None], [1.0, None], [4.0, None]]
    assert scores.failures == {"length": 0, "broken": 4}


WORKER_REWARDS = '''
import os
import signal
import time


def flaky(completions, mode, **kwargs):
    """Scores the group, raises, hangs or kills its process, as the rows' mode column says."""
    if mode[0] == "raise":
        raise RuntimeError("reward bug")
    if mode[0] == "hang":
        time.sleep(3600)
    if mode[0] == "exit":
        os._exit(3)
    return [float(len(text)) for text in completions]


def with_alarm(completions, **kwargs):
    """Uses signal.alarm, which only works in a process's main thread."""
    signal.alarm(30)
    signal.alarm(0)
    return [1.0 for _ in completions]
'''


def test_worker_processes_survive_a_hanging_a_raising_and_an_exiting_reward(tmp_path, monkeypatch):
    (tmp_path / "grpo_worker_rewards.py").write_text(WORKER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import grpo_worker_rewards as module

    scorer = RewardScorer(
        [Reward("flaky", module.flaky), Reward("alarm", module.with_alarm)], workers=2, timeout=3.0
    )
    try:
        modes = ["ok", "ok", "raise", "raise", "hang", "hang", "exit", "exit", "ok", "ok"]
        texts = ["a", "bb", "c", "d", "e", "f", "g", "h", "iii", "j"]
        groups = [(i, i + 2) for i in range(0, 10, 2)]
        started = time.perf_counter()
        scores = scorer.score(texts, groups, {"mode": modes})
        assert time.perf_counter() - started < 60
        flaky = [sample[0] for sample in scores.values]
        assert flaky == [1.0, 2.0, None, None, None, None, None, None, 3.0, 1.0]
        assert [sample[1] for sample in scores.values] == [1.0] * 10  # signal.alarm works in a worker
        assert scores.failures == {"flaky": 6, "alarm": 0}
        again = scorer.score(["xy", "z"], [(0, 2)], {"mode": ["ok", "ok"]})  # replaced workers keep scoring
        assert again.values == [[2.0, 1.0], [1.0, 1.0]] and again.failures == {"flaky": 0, "alarm": 0}
    finally:
        scorer.close()


def test_a_reward_returning_the_wrong_count_is_an_error():
    scorer = RewardScorer([Reward("short", lambda completions, **kwargs: [1.0])])
    with pytest.raises(ValueError, match="reward 'short' returned 1 scores for 2 completions"):
        scorer.score(["a", "b"], [(0, 2)], {})
