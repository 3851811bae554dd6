"""Structured mode: grpo samples completions of prompts with a ``ground_truth``; the reward is the
feature match of each completion against the reference (grpo's public extension point:
``GRPOMethod.rewards`` and ``GRPOMethod.producer``)."""

from __future__ import annotations

import math
import os
from dataclasses import replace

from ftcore_grpo.data import template_kwargs, tokenize_prompt
from ftcore_grpo.method import GRPOMethod
from ftcore_grpo.rollout import RolloutProducer
from ftcore_grpo.scoring import Reward

from ftcore_ebft.features import FeatureNetwork
from ftcore_ebft.reward import group_rewards


class FeatureReward:
    """The ebft reward (grpo's reward contract): the features of prompt + completion against those of
    prompt + ``ground_truth`` (plus EOS), one call per prompt group."""

    def __init__(self, run, network: FeatureNetwork):
        self.network, self.tokenizer, self.ebft = network, run.tokenizer, run.config.ebft
        self.template = template_kwargs(run.config)
        self.max_len = run.config.train.sequence_len
        self.terms: list[tuple[float, float, float, float]] = []
        """(alignment, diversity, cfm_loss, reward) of each group scored since ``take_terms``."""

    def reference_ids(self, ground_truth: str) -> list[int]:
        ids = list(self.tokenizer(ground_truth, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None else ids

    def __call__(self, completions, *, prompts, completion_ids, ground_truth, **kwargs) -> list[float]:
        prompt = tokenize_prompt(self.tokenizer, prompts[0], self.template)  # a group shares its prompt
        sequences = [prompt + list(ids) for ids in completion_ids]
        sequences.append(prompt + self.reference_ids(ground_truth[0]))
        sequences = [seq[: self.max_len] for seq in sequences]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        features = self.network.features(
            sequences, [len(prompt)] * len(sequences), self.ebft.embed_method, pad
        )
        terms = group_rewards(
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


class EBFTProducer(RolloutProducer):
    """grpo's producer with ``adaptive_max_tokens`` and the ebft metrics of each rollout."""

    def __init__(self, generator, scorer, sampling, *, seed, rank, run, reward: FeatureReward):
        super().__init__(generator, scorer, sampling, seed=seed, rank=rank)
        self.run, self.reward, self.base = run, reward, sampling

    def max_tokens(self, rows) -> int:
        """``gt_length_multiplier`` x the longest reference of the batch, within ``max_completion_length``."""
        ebft = self.run.config.ebft
        if not ebft.adaptive_max_tokens:
            return self.base.max_tokens
        longest = max(len(self.reward.reference_ids(row["ground_truth"])) for row in rows)
        return max(1, min(self.base.max_tokens, math.ceil(longest * ebft.gt_length_multiplier)))

    def produce(self, rows, index):
        limit = self.max_tokens(rows)
        self.sampling = replace(self.base, max_tokens=limit)
        rollout = super().produce(rows, index)
        self.run.log_metrics({**self.reward.take_terms(), "ebft/max_tokens": limit})
        return rollout


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
