"""The generation interface of the grpo trainer, and its ``hf`` backend.

The trainer only talks to a ``Generator``; ``hf`` (below) and ``vllm`` (``ftcore_grpo.vllm``)
implement it. The contract, which both backends keep:

- ``generate(prompt_ids, n, sampling)`` returns, for each prompt in order, ``n`` ``Completion``
  objects. Prompts arrive as token ids, already rendered by the chat template (with the
  generation prompt); a backend never re-tokenizes them.
- ``Completion.token_ids`` are exactly the sampled tokens, prompt excluded, up to and including
  the token that ended the completion: the EOS token (``finish_reason = "stop"``), the token that
  completed a ``stop`` string (``"stop"``), or the ``max_tokens``-th token (``"length"``). No
  padding. ``text`` is their decoding without special tokens, cut before a matched stop string.
- ``Completion.logprobs`` (one per token id, or None if the backend cannot give them): the
  log-probability of each sampled token under the policy's logits divided by ``temperature``
  (before repetition penalty and top-k/top-p/min-p filtering): the same quantity the trainer
  computes, so the two can be compared and used for importance sampling.
- ``Completion.policy_version`` is the ``version`` of the last ``sync_weights`` before the
  request was made (0 before any sync): the optimizer step of the weights that sampled it.
- ``sync_weights(model, version)`` is called by the training thread before the first rollout
  (``version`` = the current optimizer step: 0, or the step a run resumes at; a backend that
  already serves those weights may skip it) and then every ``[grpo] sync_interval`` optimizer
  steps, with the trainer's unwrapped model (a peft model under LoRA: sync the adapter; else the
  full weights). It returns once later ``generate`` calls use the new weights. ``close()``
  releases what the backend holds (idempotent); the trainer calls it when training ends.
- With ``async_prefetch`` the trainer calls ``generate`` from one background producer thread while
  ``sync_weights`` runs on the training thread; backends must tolerate that. The hf backend then
  samples from its own copy of the policy (``BackgroundHFGenerator``), which a lock keeps from
  being updated mid-generation.

``build_generator(config, model, tokenizer, output_dir, device=None)`` picks the backend of
``[grpo] generation`` (``device``: the policy's training device); for ``"vllm"`` it calls
``ftcore_grpo.vllm.VLLMGenerator(config=..., model=..., tokenizer=..., output_dir=...)``.
``SamplingParams.top_k = 0`` and ``min_p = 0.0`` mean "off".
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger("ftcore.grpo")


@dataclass
class SamplingParams:
    """How to sample; one set per ``generate`` call."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: Literal["stop", "length"]
    policy_version: int
    mask: list[int] | None = None
    """Per token id, 1 = trained, 0 = context (e.g. a tool's output inside a multi-turn episode);
    None = every token is trained. Set by rollout producers, not by the generation backends."""


class Generator(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, in prompt order."""

    def sync_weights(self, model: Any, version: int) -> None:
        """Make later ``generate`` calls use ``model``'s weights, recorded as ``version``."""

    def close(self) -> None:
        """Release the backend's resources."""


def build_generator(config, model, tokenizer, output_dir: Path, device=None) -> Generator:
    """The backend that ``[grpo] generation`` names."""
    grpo = config.grpo
    if grpo.generation == "vllm":
        from ftcore_grpo.vllm import VLLMGenerator

        return VLLMGenerator(config=config, model=model, tokenizer=tokenizer, output_dir=output_dir)
    options = dict(batch_size=grpo.hf_batch_size, decode="cuda_graph" if grpo.hf_cuda_graph else "generate")
    if grpo.async_prefetch:
        return BackgroundHFGenerator(model, tokenizer, device=grpo.hf_device or device, **options)
    return HFGenerator(model, tokenizer, **options)


class HFGenerator:
    """Samples from the policy itself: weights are always current.

    Logprobs are recorded while sampling (one vocabulary row per sequence held at a time), and
    the sampling filters are applied by ftcore so that those logprobs are of the unfiltered,
    temperature-scaled distribution. ``batch_size`` bounds the sequences per call. ``decode``:
    ``"generate"`` runs transformers' ``model.generate``; ``"static"`` ftcore's loop over a static KV
    cache (``ftcore_grpo.decode``); ``"cuda_graph"`` (on a CUDA GPU, sdpa or eager attention; else
    ``"generate"``) that loop with each decode step a CUDA graph replay. Stop strings end a
    completion in every mode; the loop notices them only afterwards (it generates on to EOS or
    ``max_tokens``, then cuts).
    """

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, decode: str = "generate"):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.decode = decode
        self._graph_worked = False  # the CUDA-graphed loop has worked once: later failures are real errors
        self.version = 0
        eos = tokenizer.eos_token_id
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {eos} | set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_token_ids = sorted(i for i in ids if i is not None)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def sync_weights(self, model, version: int) -> None:
        self.model, self.version = model, version

    def close(self) -> None:
        pass

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        if self.decode == "cuda_graph" and not self._graphable():
            self.decode = "generate"
        try:
            return self._generate(prompt_ids, n, sampling)
        except Exception as exc:
            if self.decode != "cuda_graph" or self._graph_worked:
                raise
            log.warning("grpo: the CUDA-graphed decode failed (%s: %s); using transformers' generate from now on "
                        "(set grpo.hf_cuda_graph = false to skip the attempt)", type(exc).__name__, exc)  # fmt: skip
            self.decode = "generate"
            return self._generate(prompt_ids, n, sampling)

    def _graphable(self) -> bool:
        """On a CUDA GPU (checked per call: the trainer moves the policy after making the backend)
        with an attention implementation the decode loop can capture."""
        from ftcore_grpo.decode import supports_cuda_graph

        return next(self.model.parameters()).device.type == "cuda" and supports_cuda_graph(self.model)

    def _generate(self, prompt_ids, n, sampling):
        import torch

        rows = [ids for ids in prompt_ids for _ in range(n)]
        step = self.batch_size or len(rows)
        device = next(self.model.parameters()).device
        # transformers' generate samples from torch's global generator (seeded inside fork_rng); the
        # decode loop from its own, so it never touches the global state that other threads use
        seeded_globally = sampling.seed is not None and self.decode == "generate"
        generator = None
        if sampling.seed is not None and not seeded_globally:
            generator = torch.Generator(device).manual_seed(sampling.seed)  # the same draws
        flat: list[Completion] = []
        with torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], enabled=seeded_globally
        ):
            if seeded_globally:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), step):
                flat += self._generate_rows(rows[start : start + step], sampling, generator)
        self._graph_worked |= self.decode == "cuda_graph"
        return [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def _generate_rows(
        self, rows: list[list[int]], sampling: SamplingParams, generator=None
    ) -> list[Completion]:
        import torch

        model = self.model
        device = next(model.parameters()).device
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):  # left padding
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        recorder = _SamplingProcessor(sampling)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.decode == "generate":
                    new = self._transformers_generate(input_ids, attention_mask, recorder, sampling)
                else:
                    new = self._static_decode(input_ids, attention_mask, recorder, sampling, generator)
        finally:
            model.train(was_training)
        logprobs = recorder.finish(new)
        return [self._completion(new[i].tolist(), logprobs[i], sampling) for i in range(len(rows))]

    def _transformers_generate(self, input_ids, attention_mask, recorder, sampling: SamplingParams):
        from transformers import GenerationConfig, LogitsProcessorList

        options = dict(  # explicit, so nothing is inherited from the model's own generation_config
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1, num_return_sequences=1
        )  # fmt: skip
        if sampling.temperature > 0:
            options |= dict(
                temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0
            )
            if getattr(self.model.generation_config, "min_p", None) is not None:
                options["min_p"] = 0.0
        generation_config = GenerationConfig(
            do_sample=sampling.temperature > 0,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            stop_strings=list(sampling.stop) or None,
            **options,
        )
        sequences = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([recorder]),
            tokenizer=self.tokenizer if sampling.stop else None,
        )
        return sequences[:, input_ids.shape[1] :]

    def _static_decode(self, input_ids, attention_mask, recorder, sampling: SamplingParams, generator=None):
        import torch

        from ftcore_grpo.decode import static_decode

        def choose(sequences, logits):
            scores = recorder(sequences, logits.float())  # as generate: float32 scores
            if sampling.temperature <= 0:
                return scores.argmax(-1)
            return torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=generator)[:, 0]

        return static_decode(
            self.model, input_ids, attention_mask, max_new_tokens=sampling.max_tokens, choose=choose,
            eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id, cuda_graph=self.decode == "cuda_graph",
        )  # fmt: skip

    def _completion(self, ids: list[int], logprobs: list[float], sampling: SamplingParams) -> Completion:
        end, reason = len(ids), "length"
        for index, token in enumerate(ids):
            if token in self.eos_token_ids:
                end, reason = index + 1, "stop"
                break
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        if sampling.stop:
            end, reason, text = self._cut_at_stop(ids, end, reason, text, sampling.stop)
        return Completion(ids[:end], text, logprobs[:end], reason, self.version)

    def _cut_at_stop(self, ids, end, reason, text, stop):
        """The first token whose decoding completes a stop string ends the completion there."""
        if not any(s in text for s in stop):
            return end, reason, text
        for index in range(end):
            prefix = self.tokenizer.decode(ids[: index + 1], skip_special_tokens=True)
            found = [prefix.index(s) for s in stop if s in prefix]
            if found:
                return index + 1, "stop", prefix[: min(found)]
        return end, reason, text


class BackgroundHFGenerator(HFGenerator):
    """The hf backend of async prefetch: samples from its own frozen copy of the policy (on
    ``device``, e.g. a second GPU), so that a background thread generates while the policy trains.

    ``sync_weights`` copies the trainable weights (the adapter under LoRA) into the copy. A lock
    makes a sync wait for a generation in progress, so each completion comes from one version.
    Make it before the trainer patches the model (TRL's fused LM head).
    """

    def __init__(self, model, tokenizer, *, device=None, **kwargs):
        replica = copy.deepcopy(model).requires_grad_(False).eval()
        if device is not None:
            replica.to(device)
        super().__init__(replica, tokenizer, **kwargs)
        self._lock = threading.Lock()

    def generate(self, prompt_ids, n, sampling):
        with self._lock:
            return super().generate(prompt_ids, n, sampling)

    def sync_weights(self, model, version: int) -> None:
        import torch

        sources = {name: param for name, param in model.named_parameters() if param.requires_grad}
        with self._lock, torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in sources:
                    param.copy_(sources.pop(name))
            self.version = version
        if sources:
            raise RuntimeError(
                f"grpo: the generating copy of the policy has no parameter {next(iter(sources))!r}"
            )


class _SamplingProcessor:
    """The last logits processor of ``generate``: records logprobs, then applies ftcore's filters.

    ``generate`` runs with no warpers of its own, so the scores arriving here are the model's
    logits. Each call first gathers the previous step's logprob row at the token just sampled.
    """

    def __init__(self, sampling: SamplingParams):
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.temperature = sampling.temperature or 1.0
        self.filters = []
        if sampling.repetition_penalty != 1.0:
            self.filters.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if sampling.temperature not in (0, 1.0):
            self.filters.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            self.filters.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.filters.append(TopPLogitsWarper(sampling.top_p))
        if sampling.min_p > 0:
            self.filters.append(MinPLogitsWarper(sampling.min_p))
        self.previous = None
        self.logprobs: list[Any] = []

    def __call__(self, input_ids, scores):
        import torch

        self._gather(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        for step in self.filters:
            scores = step(input_ids, scores)
        return scores

    def _gather(self, tokens):
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, tokens[:, None].to(self.previous.device))[:, 0])

    def finish(self, new_tokens) -> list[list[float]]:
        """Per-row logprobs of ``new_tokens`` (the generated part of the sequences)."""
        import torch

        if new_tokens.shape[1] > len(self.logprobs):
            self._gather(new_tokens[:, len(self.logprobs)])
        self.previous = None
        if not self.logprobs:
            return [[] for _ in range(new_tokens.shape[0])]
        return torch.stack(self.logprobs, dim=1).tolist()
