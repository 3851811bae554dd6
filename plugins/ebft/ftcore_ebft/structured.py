"""Structured mode: grpo samples completions of prompts with a ``ground_truth``; the reward is the
feature match of each completion against the reference (grpo's public extension point:
``GRPOMethod.rewards`` and ``GRPOMethod.producer``). Rows with ``remaining_turns`` (``ebft_chat``
with ``multi_turn``) roll out turn by turn: each later assistant turn is generated after the
conversation so far and the row's next user (or tool) messages, which are context (mask 0)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

from ftcore.errors import DataError
from ftcore_grpo.data import template_kwargs, tokenize_prompt
from ftcore_grpo.generation import Completion
from ftcore_grpo.method import GRPOMethod
from ftcore_grpo.rollout import ROW_KEYS, Rollout, RolloutProducer, prompt_groups, rollout_seed
from ftcore_grpo.scoring import Reward

from ftcore_ebft.features import FeatureNetwork
from ftcore_ebft.reward import conversation_rewards


def later_turns(remaining: list[dict]) -> list[tuple[list[dict], dict]]:
    """(the user / tool messages before it, the reference) of each assistant turn in ``remaining_turns``."""
    turns, context = [], []
    for message in remaining:
        if message["role"] == "assistant":
            turns.append((context, message))
            context = []
        else:
            context.append(message)
    return turns


def context_ids(
    tokenizer, history: list[dict], messages: list[dict], kwargs: dict, split_special_tokens: bool = True
) -> list[int]:
    """The tokens the chat template adds after ``history`` (ending in an assistant turn): ``messages`` and
    the next assistant turn's generation prompt; special tokens spelled out in them are plain text with
    ``split_special_tokens`` (``data.split_special_tokens``), as in the prompt."""
    from ftcore.data import encode

    def render(conversation, generation_prompt):
        return encode(
            tokenizer, conversation, split_special_tokens=split_special_tokens,
            add_generation_prompt=generation_prompt, template_kwargs=kwargs,
        )  # fmt: skip

    before, after = render(history, False), render(history + messages, True)
    if after[: len(before)] != before:
        raise DataError(
            "multi-turn rollouts need a chat template that renders a conversation as a prefix of its "
            "continuation; this one changes earlier turns when a turn is added"
        )
    return after[len(before) :]


def turn_spans(mask: list[int], offset: int) -> list[tuple[int, int]]:
    """(start, end) of each run of trained tokens (mask 1) of a completion placed at ``offset``."""
    spans = []
    for i, bit in enumerate(mask):
        if bit and (not spans or spans[-1][1] != offset + i):
            spans.append((offset + i, offset + i + 1))
        elif bit:
            spans[-1] = (spans[-1][0], offset + i + 1)
    return spans


class FeatureReward:
    """The ebft reward (grpo's reward contract): the features of prompt + completion against those of
    prompt + ``ground_truth`` (plus EOS), one call per prompt group. Multi-turn (``remaining_turns``
    and ``completion_masks``): per-turn features, averaged over each conversation's turns; the
    reference conversation is the prompt, the reference turns and the user turns between them."""

    def __init__(self, run, network: FeatureNetwork):
        self.network, self.tokenizer, self.ebft = network, run.tokenizer, run.config.ebft
        self.template = template_kwargs(run.config)
        self.split_special_tokens = run.config.data.split_special_tokens
        self.max_len = run.config.train.sequence_len
        self.terms: list[tuple[float, float, float, float]] = []
        """(alignment, diversity, cfm_loss, reward) of each group scored since ``take_terms``."""

    def reference_ids(self, ground_truth: str) -> list[int]:
        ids = list(
            self.tokenizer(
                ground_truth, add_special_tokens=False, split_special_tokens=self.split_special_tokens
            )["input_ids"]
        )
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None else ids

    def reference(
        self, prompt, prompt_ids, ground_truth, remaining
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The reference conversation's tokens and the (start, end) of each reference assistant turn."""
        sequence = prompt_ids + self.reference_ids(ground_truth)
        spans = [(len(prompt_ids), len(sequence))]
        history = [*prompt, {"role": "assistant", "content": ground_truth}] if remaining else []
        for context, turn in later_turns(remaining):
            sequence += context_ids(
                self.tokenizer, history, context, self.template, self.split_special_tokens
            )
            spans.append((len(sequence), len(sequence) + len(self.reference_ids(turn["content"]))))
            sequence += self.reference_ids(turn["content"])
            history += [*context, turn]
        return sequence, spans

    def __call__(
        self,
        completions,
        *,
        prompts,
        completion_ids,
        ground_truth,
        remaining_turns=None,
        completion_masks=None,
        **kwargs,
    ) -> list[float]:
        prompt = tokenize_prompt(  # as grpo tokenized it for generation; a group shares its prompt
            self.tokenizer, prompts[0], self.template, self.split_special_tokens
        )
        masks = completion_masks or [None] * len(completion_ids)
        sequences = [prompt + list(ids) for ids in completion_ids]
        spans = [
            turn_spans(m or [1] * len(ids), len(prompt)) for ids, m in zip(completion_ids, masks, strict=True)
        ]
        reference, reference_spans = self.reference(
            prompts[0], prompt, ground_truth[0], remaining_turns[0] if remaining_turns else []
        )
        sequences.append(reference)
        spans.append(reference_spans)
        sequences = [seq[: self.max_len] for seq in sequences]  # turns past sequence_len are left out
        spans = [[(a, min(b, self.max_len)) for a, b in pairs if a < self.max_len] for pairs in spans]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        features = self.network.features(sequences, spans, self.ebft.embed_method, pad)
        terms = conversation_rewards(
            features[:-1],
            features[-1],
            self.ebft.alignment_coef,
            self.ebft.diversity_coef,
            use_whitening=self.ebft.use_whitening,
        )
        self.terms.append(
            (
                terms.alignment.mean().item(),
                terms.diversity.mean().item(),
                terms.cfm_loss,
                terms.rewards.mean().item(),
            )
        )
        return terms.rewards.tolist()

    def take_terms(self) -> dict[str, float]:
        """Means of the terms since the last call, as ``ebft/...`` metrics."""
        terms, self.terms = self.terms, []
        if not terms:
            return {}
        names = ("alignment", "diversity", "cfm_loss", "reward")
        return {f"ebft/{name}": sum(t[k] for t in terms) / len(terms) for k, name in enumerate(names)}


@dataclass
class Episode:
    """One sample of a multi-turn rollout: the conversation so far and its completion tokens."""

    prompt_ids: list[int]
    history: list[dict]
    turns: list[tuple[list[dict], dict]]
    room: int
    """Completion tokens that fit after the prompt in ``train.sequence_len``."""
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    finish: str = "stop"
    version: int | None = None
    """The policy version of the first turn."""

    def add(self, ids: list[int], trained: int, logprobs: list[float] | None) -> None:
        """Append tokens (cut at ``room``: the episode ends as truncated)."""
        keep = ids[: self.room - len(self.ids)]
        if len(keep) < len(ids):
            self.finish = "length"
        self.ids += keep
        self.mask += [trained] * len(keep)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs += logprobs[: len(keep)]
        else:
            self.logprobs = None

    def add_turn(self, completion: Completion) -> None:
        if self.version is None:
            self.version = completion.policy_version
        self.add(completion.token_ids, 1, completion.logprobs)
        self.history.append({"role": "assistant", "content": completion.text})
        if completion.finish_reason == "length":
            self.finish = "length"

    def add_context(self, messages: list[dict], tokenizer, kwargs: dict, split_special_tokens: bool) -> None:
        """The user / tool ``messages`` before the next turn, as the chat template renders them (not trained)."""
        ids = context_ids(tokenizer, self.history, messages, kwargs, split_special_tokens)
        self.add(ids, 0, [0.0] * len(ids))
        self.history += messages
        if len(self.ids) == self.room:  # no room left for the next turn
            self.finish = "length"

    def wants(self, turn: int) -> bool:
        """Whether later turn ``turn`` (0 = the second assistant turn) is still to be generated."""
        return self.finish == "stop" and turn < len(self.turns)

    def completion(self, tokenizer) -> Completion:
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        return Completion(self.ids, text, self.logprobs, self.finish, self.version, mask=self.mask)


class EBFTProducer(RolloutProducer):
    """grpo's producer with ``adaptive_max_tokens``, multi-turn rollouts and the ebft metrics."""

    def __init__(self, generator, scorer, sampling, *, seed, rank, run, reward: FeatureReward):
        super().__init__(generator, scorer, sampling, seed=seed, rank=rank)
        self.run, self.reward, self.base = run, reward, sampling

    def max_tokens(self, rows) -> int:
        """``gt_length_multiplier`` x the longest reference turn of the batch, within ``max_completion_length``."""
        ebft = self.run.config.ebft
        if not ebft.adaptive_max_tokens:
            return self.base.max_tokens
        texts = [row["ground_truth"] for row in rows]
        texts += [
            turn["content"] for row in rows for _, turn in later_turns(row.get("remaining_turns") or [])
        ]
        longest = max(len(self.reward.reference_ids(text)) for text in texts)
        return max(1, min(self.base.max_tokens, math.ceil(longest * ebft.gt_length_multiplier)))

    def produce(self, rows, index):
        limit = self.max_tokens(rows)
        self.sampling = replace(self.base, max_tokens=limit)
        if "remaining_turns" in rows[0]:
            rollout = self.produce_turns(rows, index)
        else:
            rollout = super().produce(rows, index)
        self.run.log_metrics({**self.reward.take_terms(), "ebft/max_tokens": limit})
        return rollout

    def produce_turns(self, rows, index) -> Rollout:
        """Generate the first assistant turn of each sample (n per prompt group), then each later turn
        after the sample's conversation so far and the row's next user messages; score the whole."""
        if isinstance(rows[0]["prompt"], str):
            raise DataError("multi-turn rows (remaining_turns) need chat prompts: a list of messages")
        tokenizer, kwargs = self.reward.tokenizer, self.reward.template
        groups = prompt_groups(rows)
        sampling = replace(self.sampling, seed=rollout_seed(self.seed, index, self.rank))
        started = time.perf_counter()
        sizes = {end - start for start, end in groups}
        if len(sizes) == 1:  # whole groups: one request of n per prompt
            nested = self.generator.generate(
                [rows[s]["prompt_ids"] for s, _ in groups], sizes.pop(), sampling
            )
        else:
            nested = self.generator.generate([row["prompt_ids"] for row in rows], 1, sampling)
        room = self.run.config.train.sequence_len
        episodes = [
            Episode(row["prompt_ids"], list(row["prompt"]), later_turns(row["remaining_turns"]), room - len(row["prompt_ids"]))
            for row in rows
        ]  # fmt: skip
        for episode, completion in zip(episodes, [c for group in nested for c in group], strict=True):
            episode.add_turn(completion)
        for turn in range(max(len(e.turns) for e in episodes)):
            for episode in (e for e in episodes if e.wants(turn)):
                episode.add_context(
                    episode.turns[turn][0], tokenizer, kwargs, self.reward.split_special_tokens
                )
            live = [e for e in episodes if e.wants(turn)]  # those with room left after the context
            if live:
                generated = self.generator.generate(
                    [e.prompt_ids + e.ids for e in live], 1, replace(sampling, seed=sampling.seed + turn + 1)
                )
                for episode, (completion,) in zip(live, generated, strict=True):
                    episode.add_turn(completion)
        completions = [e.completion(tokenizer) for e in episodes]
        generation_seconds = time.perf_counter() - started
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ROW_KEYS}
        columns |= {
            "prompts": [row["prompt"] for row in rows],
            "completion_ids": [c.token_ids for c in completions],
            "completion_masks": [c.mask for c in completions],
        }
        scores = self.scorer.score(
            [c.text for c in completions],
            groups,
            columns,
            {"max_completion_length": self.sampling.max_tokens},
        )
        return Rollout(
            index=index, rows=rows, completions=completions, rewards=scores.values, failures=scores.failures,
            groups=groups, generation_seconds=generation_seconds, scoring_seconds=scores.seconds,
        )  # fmt: skip


class StructuredEBFT(GRPOMethod):
    """grpo with the ebft reward source and producer."""

    def rewards(self, run) -> list[Reward]:
        ebft = run.config.ebft
        network = FeatureNetwork(run.model, ebft.feature_layers, ebft.feature_device)
        self.reward = FeatureReward(run, network)
        return [Reward("ebft", self.reward)]

    def producer(self, run, generator, scorer, sampling) -> RolloutProducer:
        rank = int(os.environ.get("RANK", "0"))
        return EBFTProducer(
            generator, scorer, sampling, seed=run.config.train.seed, rank=rank, run=run, reward=self.reward
        )
