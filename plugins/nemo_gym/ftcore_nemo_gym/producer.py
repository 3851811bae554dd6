"""grpo rollouts from NeMo Gym.

``VerifyProducer`` (single-turn): grpo's generator samples the completions; each sample gets its own
cookie session on the row's resource server: ``/seed_session`` with the task, then ``/verify`` with
the task (its ``responses_create_params``: system message and tools kept) and the completion as a
Responses object. A reply that is not 200 with a numeric ``reward`` (or says ``mask_sample``) gives
``None`` and counts in ``nemo_gym/verify_errors``. When every request of a rollout to a server got
no answer, the server is down: the run saves a checkpoint and stops with an error naming it.

``EpisodeProducer`` (multi-turn): each sample is one episode of the row's agent (``POST /run``); the
trained sequence is rebuilt from the token ids in its transcript (``transcript_tokens``), tool
outputs masked out; the reward is the agent's. Failures count in ``nemo_gym/run_errors``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ftcore_grpo.rollout import Rollout, RolloutProducer, prompt_groups, rollout_seed

from ftcore_nemo_gym.client import GymError, ServerDown, Session, discover

log = logging.getLogger("ftcore.nemo_gym")


class Deployment:
    """The Gym servers of a run and how a task row is routed: agent -> its resource server."""

    def __init__(self, url: str, section):
        self.section = section
        self.servers = discover(url, timeout=section.verify_timeout)
        self.agents = {n: s for n, s in self.servers.items() if s.kind == "responses_api_agents"}
        if not self.agents:
            raise GymError(f"the Gym deployment at {url} has no agent (responses_api_agents) server")

    def agent(self, name: str):
        name = name or self.section.agent or (next(iter(self.agents)) if len(self.agents) == 1 else "")
        if name not in self.agents:
            raise GymError(
                f"no Gym agent {name!r} at {self.section.url or 'the started deployment'}; its agents: "
                f"{sorted(self.agents)} (set agent_ref in the rows, the dataset's options.agent or [nemo_gym] agent)"
            )
        return self.agents[name]

    def resources_server(self, agent):
        ref = agent.config.get("resources_server") or {}
        server = self.servers.get(ref.get("name", ""))
        if server is None:
            raise GymError(f"Gym agent {agent.name} ({agent.url}) names no running resources server: {ref}")
        return server


def response_object(text: str, tools: list) -> dict:
    """The Responses object of one assistant message (every field ``/verify`` validates)."""
    message = {
        "type": "message", "id": "msg", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }  # fmt: skip
    return {
        "id": "resp", "created_at": 0, "model": "policy", "object": "response", "output": [message],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": tools,
    }  # fmt: skip


def reward_of(reply) -> float | None:
    """The reward of a ``/verify`` or ``/run`` reply, None if missing, not a number or masked."""
    if not isinstance(reply, dict) or reply.get("mask_sample"):
        return None
    value = reply.get("reward")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class Outcome:
    """One sample's result: its environment (agent) and server, reward (None on error), the error,
    whether the server did not answer at all, model calls and tool calls."""

    env: str
    server: str
    reward: float | None = None
    error: str | None = None
    down: bool = False
    turns: int = 1
    tool_calls: int = 0


class FailureStreaks:
    """Rollouts in a row in which every sample a server handled failed, per server."""

    def __init__(self, limit: int):
        self.limit, self.streaks = limit, defaultdict(int)

    def observe(self, outcomes: list[Outcome]) -> str | None:
        """The reason to stop once a server's streak reaches ``limit`` (0 = never), else None."""
        servers = defaultdict(list)
        for outcome in outcomes:
            servers[outcome.server].append(outcome)
        for server, group in servers.items():
            failed = all(o.error is not None for o in group)
            self.streaks[server] = self.streaks[server] + 1 if failed else 0
            if self.limit and self.streaks[server] >= self.limit:
                return (
                    f"every sample of Gym server {server} failed in {self.limit} rollouts in a row (the last error: "
                    f"{group[0].error}; nemo_gym.stop_after_failed_rollouts)"
                )
        return None


class GymProducer(RolloutProducer):
    """Shared by both modes: routing, concurrency, metrics and the down-server rule."""

    def __init__(self, generator, scorer, sampling, *, seed, rank, deployment, run):
        super().__init__(generator, scorer, sampling, seed=seed, rank=rank)
        self.deployment, self.run, self.section = deployment, run, deployment.section
        self.pool = ThreadPoolExecutor(self.section.max_concurrency, thread_name_prefix="nemo-gym")
        self.first_error_logged = False
        self.failures = FailureStreaks(self.section.stop_after_failed_rollouts)
        self.named_version = None  # multi-turn: the policy version served under policy_name
        self.launcher = None  # the auto_start ng_run, stopped by close()

    def record(self, outcomes: list[Outcome], index: int, errors_name: str) -> None:
        """Per-environment metrics to the next logged row; a server that never answered stops the run."""
        if index < 0:  # evaluation rollouts: the trainer logs their rewards
            return
        by_env = defaultdict(list)
        for outcome in outcomes:
            by_env[outcome.env].append(outcome)
        metrics = {errors_name: float(sum(o.error is not None for o in outcomes))}
        for env, group in by_env.items():
            rewards = [o.reward for o in group if o.reward is not None]
            prefix = f"nemo_gym/{env}"
            metrics[f"{prefix}/reward_mean"] = sum(rewards) / len(rewards) if rewards else math.nan
            metrics[f"{prefix}/success_rate"] = sum(r >= 1.0 for r in rewards) / len(group)
            metrics[f"{prefix}/turns"] = sum(o.turns for o in group) / len(group)
            metrics[f"{prefix}/tool_calls"] = sum(o.tool_calls for o in group) / len(group)
            metrics[f"{prefix}/errors"] = float(sum(o.error is not None for o in group))
        self.run.log_metrics(metrics)
        failed = [o for o in outcomes if o.error is not None]
        if failed and not self.first_error_logged:
            self.first_error_logged = True
            log.warning("nemo_gym: %d of %d samples got no reward; the first: %s", len(failed), len(outcomes),
                        failed[0].error)  # fmt: skip
        servers = defaultdict(list)
        for outcome in outcomes:
            servers[outcome.server].append(outcome)
        down = next((group[0].error for group in servers.values() if all(o.down for o in group)), None)
        reason = down or self.failures.observe(outcomes)
        if reason:
            self.run.stash.setdefault("nemo_gym", {})["down"] = (
                f"{reason}. The run saved a checkpoint and stopped: restart or fix the Gym deployment, then "
                "continue with ftcore run CONFIG --resume"
            )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        try:
            super().close()
        finally:
            if self.launcher is not None:
                self.launcher.stop()


class VerifyProducer(GymProducer):
    """Single-turn: grpo generates, the row's resource server scores with ``/verify``."""

    def produce(self, rows, index) -> Rollout:
        groups = prompt_groups(rows)
        sizes = {end - start for start, end in groups}
        sampling = replace(self.sampling, seed=rollout_seed(self.seed, index, self.rank))
        started = time.perf_counter()
        if len(sizes) == 1:
            nested = self.generator.generate(
                [rows[s]["prompt_ids"] for s, _ in groups], sizes.pop(), sampling
            )
        else:
            nested = self.generator.generate([row["prompt_ids"] for row in rows], 1, sampling)
        completions = [c for per_prompt in nested for c in per_prompt]
        generation_seconds = time.perf_counter() - started
        started = time.perf_counter()
        outcomes = list(self.pool.map(self.verify_row, rows, [c.text for c in completions]))
        self.record(outcomes, index, "nemo_gym/verify_errors")
        return Rollout(
            index=index, rows=rows, completions=completions, rewards=[[o.reward] for o in outcomes],
            failures={"nemo_gym": sum(o.error is not None for o in outcomes)}, groups=groups,
            generation_seconds=generation_seconds, scoring_seconds=time.perf_counter() - started,
        )  # fmt: skip

    def verify_row(self, row, text: str) -> Outcome:
        return self.verify(json.loads(row["nemo_gym_task"]), row["nemo_gym_agent"], text)

    def verify(self, task: dict, agent_name: str, text: str) -> Outcome:
        """Score one completion in its own session: ``/seed_session``, then ``/verify``."""
        agent = self.deployment.agent(agent_name)
        server = self.deployment.resources_server(agent)
        session = Session(self.section.retries)
        timeout = self.section.verify_timeout
        params = task["responses_create_params"]
        try:
            session.post(server, "/seed_session", task, timeout)
            body = {**task, "response": response_object(text, params.get("tools") or [])}
            reply = session.post(server, "/verify", body, timeout)
        except GymError as exc:
            return Outcome(agent.name, server.name, error=str(exc), down=isinstance(exc, ServerDown))
        reward = reward_of(reply)
        if reward is None:
            detail = reply.get("failure_reason") if isinstance(reply, dict) else None
            error = f"Gym server {server.name} ({server.url}/verify) sent no usable reward ({detail or 'no reward'})"
            return Outcome(agent.name, server.name, error=error)
        return Outcome(agent.name, server.name, reward=reward)


def transcript_tokens(output: list, max_turns: int) -> tuple[list[int], list[int], list[int], list[float]]:
    """(prompt ids, completion ids, mask, logprobs) of an episode from the token ids Gym's
    ``vllm_model`` attaches to the last output item of each model call: the first call's prompt is
    the prompt; a later call's prompt beyond the sequence so far (tool outputs, the chat template's
    turn markers) is context (mask 0, logprob 0); each call's generation is trained (mask 1). The
    first ``max_turns`` calls are kept."""
    calls = [item for item in output if isinstance(item, dict) and "generation_token_ids" in item]
    if not calls:
        raise GymError(
            "the episode has no token ids: set return_token_id_information: true in Gym's vllm_model"
        )
    prompt = list(calls[0]["prompt_token_ids"])
    sequence, ids, mask, logprobs = list(prompt), [], [], []
    for call in calls[:max_turns]:
        given = list(call["prompt_token_ids"])
        if given[: len(sequence)] != sequence:
            raise GymError(
                "a model call's prompt does not extend the episode so far (a non-prefix tokenization)"
            )
        context, generated = given[len(sequence) :], list(call["generation_token_ids"])
        ids += context + generated
        mask += [0] * len(context) + [1] * len(generated)
        logprobs += [0.0] * len(context) + [float(lp) for lp in call["generation_log_probs"]]
        sequence = given + generated
    return prompt, ids, mask, logprobs


def fit_episode(prompt: list[int], ids: list[int], mask: list[int], logprobs: list[float], sequence_len: int):
    """The episode's completion cut to what fits after its prompt in ``sequence_len`` tokens, with its
    finish reason: ``"length"`` when cut (``[grpo] mask_truncated_completions`` then leaves it out)."""
    room = max(sequence_len - len(prompt), 1)
    if len(ids) <= room:
        return ids, mask, logprobs, "stop"
    return ids[:room], mask[:room], logprobs[:room], "length"


def final_text(output: list) -> str:
    """The text of the episode's assistant messages."""
    return "".join(
        part.get("text", "")
        for item in output
        if isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "assistant"
        for part in (item.get("content") or [])
        if isinstance(part, dict)
    )


class EpisodeProducer(GymProducer):
    """Multi-turn: each sample is one episode of the row's agent (``POST /run``); the policy answers
    through Gym's ``vllm_model`` from the vLLM server grpo syncs, under the name ``policy_name``."""

    def produce(self, rows, index) -> Rollout:
        from ftcore_grpo.generation import Completion

        self.sync_policy_name()
        started = time.perf_counter()
        episodes = list(self.pool.map(self.episode, rows))
        seconds = time.perf_counter() - started
        self.record([outcome for outcome, _ in episodes], index, "nemo_gym/run_errors")
        eos = self.generator.tokenizer.eos_token_id
        completions, new_rows = [], []
        for row, (_, tokens) in zip(rows, episodes, strict=True):
            if tokens is None:  # a failed episode: one untrained EOS token after the row's own prompt
                tokens = (row["prompt_ids"], [eos], [0], [0.0], "")
            prompt, ids, mask, logprobs, text = tokens
            ids, mask, logprobs, reason = fit_episode(
                prompt, ids, mask, logprobs, self.run.config.train.sequence_len
            )
            new_rows.append({**row, "prompt_ids": prompt})
            completions.append(Completion(ids, text, logprobs, reason, self.generator.version, mask=mask))
        return Rollout(
            index=index, rows=new_rows, completions=completions, rewards=[[o.reward] for o, _ in episodes],
            failures={"nemo_gym": sum(o.error is not None for o, _ in episodes)}, groups=prompt_groups(new_rows),
            generation_seconds=seconds, scoring_seconds=0.0,
        )  # fmt: skip

    def sync_policy_name(self) -> None:
        """Serve the generator's latest LoRA adapter under ``policy_name`` too (what Gym's vllm_model asks for)."""
        generator = self.generator
        if getattr(generator, "lora", False) and generator.version != self.named_version:
            path = generator.sync_dir / f"v{generator.version:08d}"
            generator.client.load_lora_adapter(self.section.policy_name, path)
            self.named_version = generator.version

    def episode(self, row):
        task = json.loads(row["nemo_gym_task"])
        agent = self.deployment.agent(row["nemo_gym_agent"])
        params = {
            **task["responses_create_params"],
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_output_tokens": self.sampling.max_tokens,
        }
        try:
            reply = Session(self.section.retries).post(
                agent, "/run", {**task, "responses_create_params": params}, self.section.run_timeout
            )
            output = reply["response"]["output"] if isinstance(reply, dict) else None
            if not isinstance(output, list):
                raise GymError(f"Gym agent {agent.name} ({agent.url}/run) sent no response.output")
            prompt, ids, mask, logprobs = transcript_tokens(output, self.section.max_turns)
        except GymError as exc:
            return Outcome(agent.name, agent.name, error=str(exc), down=isinstance(exc, ServerDown)), None
        reward = reward_of(reply)
        turns = sum(1 for item in output if isinstance(item, dict) and "generation_token_ids" in item)
        calls = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "function_call")
        error = (
            None if reward is not None else f"Gym agent {agent.name} ({agent.url}/run) sent no usable reward"
        )
        outcome = Outcome(agent.name, agent.name, reward=reward, error=error, turns=min(turns, self.section.max_turns),
                          tool_calls=calls)  # fmt: skip
        return outcome, (prompt, ids, mask, logprobs, final_text(output))
