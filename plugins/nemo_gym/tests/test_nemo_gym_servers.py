"""The client, routing and /verify scoring against real Gym servers (started once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ftcore.methods import Run
from ftcore_nemo_gym.client import BadReply, Server, ServerDown, Session
from ftcore_nemo_gym.config import NemoGymSection
from ftcore_nemo_gym.producer import Deployment, VerifyProducer

pytestmark = pytest.mark.slow


def producer(url: str, **section) -> VerifyProducer:
    deployment = Deployment(url, NemoGymSection(url=url, **section))
    run = Run(config=None, plugins=None, output_dir=Path("."))
    return VerifyProducer(None, None, None, seed=0, rank=0, deployment=deployment, run=run)


def test_discovery_finds_every_server_of_the_deployment(gym):
    kinds = {name: server.kind for name, server in gym.servers.items()}
    assert kinds["string_match"] == "resources_servers"
    assert kinds["example_session_state_mgmt_resources_server"] == "resources_servers"
    assert kinds["example_single_tool_call_simple_agent"] == "responses_api_agents"
    assert kinds["policy_model"] == "responses_api_models"
    assert all(server.url.startswith("http://127.0.0.1:") for server in gym.servers.values())


def test_verify_scores_completions_routed_by_agent(gym, gym_data):
    gym_producer = producer(gym.url)
    task = json.loads((gym_data / "string_match_example.jsonl").read_text().splitlines()[0])
    right = gym_producer.verify(task, "string_match_simple_agent", "It is \\boxed{Paris}.")
    wrong = gym_producer.verify(task, "string_match_simple_agent", "It is \\boxed{Rome}.")
    assert (right.reward, right.error, wrong.reward, wrong.error) == (1.0, None, 0.0, None)
    assert right.env == "string_match_simple_agent" and right.server == "string_match"
    with pytest.raises(Exception, match="no Gym agent 'nope'.*string_match_simple_agent"):
        gym_producer.verify(task, "nope", "x")


def test_a_verify_that_fails_gives_none_and_names_the_server(gym, gym_data):
    gym_producer = producer(gym.url)
    task = json.loads((gym_data / "string_match_example.jsonl").read_text().splitlines()[0])
    del task["expected_answer"]  # string_match requires it: 422
    outcome = gym_producer.verify(task, "string_match_simple_agent", "\\boxed{Paris}")
    assert outcome.reward is None and not outcome.down
    assert (
        "string_match" in outcome.error
        and "422" in outcome.error
        and gym.servers["string_match"].url in outcome.error
    )


def test_session_state_lives_in_one_rollout_and_not_across(gym):
    counter = gym.servers["example_session_state_mgmt_resources_server"]
    first, second = Session(), Session()
    first.post(counter, "/seed_session", {"initial_count": 3}, 10)
    second.post(counter, "/seed_session", {"initial_count": 6}, 10)
    first.post(counter, "/increment_counter", {"count": 2}, 10)
    assert first.post(counter, "/get_counter_value", {}, 10)["count"] == 5
    assert second.post(counter, "/get_counter_value", {}, 10)["count"] == 6
    assert Session().post(counter, "/get_counter_value", {}, 10)["count"] == 0  # a new rollout starts afresh
    # through the producer: /seed_session and /verify share the rollout's session
    gym_producer = producer(gym.url)
    task = {"responses_create_params": {"input": "count"}, "initial_count": 4, "expected_count": 4}
    agent = "example_session_state_mgmt_simple_agent"
    assert gym_producer.verify(task, agent, "done").reward == 1.0
    assert gym_producer.verify({**task, "initial_count": 5}, agent, "done").reward == 0.0


def test_a_server_that_does_not_answer_is_down(gym):
    gone = Server("gone", "resources_servers", "http://127.0.0.1:9", {})
    with pytest.raises(ServerDown, match=r"Gym server gone \(http://127.0.0.1:9/verify\) does not answer"):
        Session(retries=1).post(gone, "/verify", {}, 2)
    with pytest.raises(BadReply, match="answered 404"):
        Session().post(gym.servers["string_match"], "/no_such_tool", {}, 10)
