"""A Gym server that answers but fails every sample stops the run after a few rollouts in a row."""

from ftcore_nemo_gym.producer import FailureStreaks, Outcome


def rollout(agent_failed: bool, other_failed: bool = False) -> list[Outcome]:
    error = "Gym agent a (http://127.0.0.1:1/run) answered 500"
    return [
        Outcome("a", "a", error=error if agent_failed else None, reward=None if agent_failed else 1.0),
        Outcome("a", "a", error=error if agent_failed else None, reward=None if agent_failed else 0.0),
        Outcome("b", "b", error="bad" if other_failed else None, reward=None if other_failed else 1.0),
    ]


def test_a_server_failing_every_sample_for_limit_rollouts_in_a_row_stops_the_run():
    streaks = FailureStreaks(3)
    assert streaks.observe(rollout(True)) is None
    assert streaks.observe(rollout(True)) is None
    reason = streaks.observe(rollout(True))
    assert reason and "every sample of Gym server a failed in 3 rollouts in a row" in reason
    assert "answered 500" in reason and "nemo_gym.stop_after_failed_rollouts" in reason


def test_one_answered_sample_resets_the_streak_and_zero_never_stops():
    streaks = FailureStreaks(2)
    assert streaks.observe(rollout(True)) is None
    partly = rollout(True)
    partly[0] = Outcome("a", "a", reward=0.0)
    assert streaks.observe(partly) is None  # one sample of a was scored
    assert streaks.observe(rollout(True)) is None
    assert streaks.observe(rollout(False, other_failed=True)) is None  # b's first failed rollout
    never = FailureStreaks(0)
    assert all(never.observe(rollout(True, True)) is None for _ in range(10))
