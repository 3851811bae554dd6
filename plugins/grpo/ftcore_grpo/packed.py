"""Per-token log-probs and entropies of completions from a packed forward: no compute on padding.

The rows of a micro-batch, each its prompt and completion tokens without padding, are concatenated
into one sequence whose ``position_ids`` restart at 0 per row; transformers' attention keeps the rows
apart (a block-diagonal mask under sdpa and eager, document boundaries under flash attention and
ftcore's ``varlen``). Only the hidden states that predict completion tokens go through the LM head,
``HEAD_CHUNK`` tokens at a time (recomputed in the backward pass, so one chunk of logits lives at a
time), and ``ftcore_grpo.logprobs`` turns logits / temperature into log-probs and entropies, scattered
back to TRL's ``[batch, completion_len]`` layout.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from ftcore_grpo.logprobs import entropy_from_logits, selective_log_softmax

HEAD_CHUNK = 1024
"""Completion tokens per LM-head call."""
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")  # fmt: skip
"""Config attributes of models whose logits are more than the LM head's output (left to TRL's head)."""


def parts(model):
    """``(backbone, lm_head)`` of a causal LM, looking through peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def supported(model) -> bool:
    """Whether the logits of ``model`` are its LM head's output (no softcapping or scaling)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def logps_and_entropies(model, unwrapped, input_ids, attention_mask, logits_to_keep: int, *,
                        temperature: float = 1.0, batch_size: int | None = None, compute_entropy: bool = False):  # fmt: skip
    """Log-probs (and entropies, or None) of the last ``logits_to_keep`` columns of ``input_ids``,
    ``[batch, logits_to_keep]`` float32 (0 where ``attention_mask`` is 0), ``batch_size`` rows a forward.

    ``model`` is called (a DDP wrapper keeps its gradient hooks); ``unwrapped`` is the same model
    unwrapped, whose backbone and head are read."""
    step = batch_size or len(input_ids)
    logps, entropies = [], []
    for i in range(0, len(input_ids), step):
        rows = slice(i, i + step)
        logp, entropy = _packed_rows(
            model,
            unwrapped,
            input_ids[rows],
            attention_mask[rows],
            logits_to_keep,
            temperature,
            compute_entropy,
        )
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None)


def _packed_rows(model, unwrapped, input_ids, attention_mask, logits_to_keep, temperature, compute_entropy):
    mask = attention_mask.bool()
    scored = mask.clone()
    scored[:, : mask.shape[1] - logits_to_keep] = False  # completion tokens
    ids = input_ids[mask]
    positions = (mask.cumsum(1) - 1)[mask]
    backbone, head = parts(unwrapped)
    captured = []
    handle = backbone.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state)
    )
    try:  # logits of one position only: the LM head runs below, on completion positions
        model(input_ids=ids[None], position_ids=positions[None], logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    targets = scored[mask].nonzero()[:, 0]
    hidden, labels = captured[0][0, targets - 1], ids[targets]  # the state before a token predicts it
    logps, entropies = [], []
    score = partial(checkpoint, _score, use_reentrant=False) if hidden.requires_grad else _score
    for start in range(0, len(targets), HEAD_CHUNK):
        chunk = slice(start, start + HEAD_CHUNK)
        logp, entropy = score(head, hidden[chunk], labels[chunk], temperature, compute_entropy)
        logps.append(logp)
        entropies.append(entropy)
    kept = scored[:, -logits_to_keep:]
    if not logps:  # no completion token: zeros still connected to the model (backward needs a graph)
        zeros = torch.zeros(kept.shape, device=kept.device) + captured[0].sum() * 0.0
        return zeros, (zeros.detach() if compute_entropy else None)

    def scatter(values):
        return torch.zeros(kept.shape, device=kept.device).masked_scatter(kept, torch.cat(values))

    return scatter(logps), (scatter(entropies) if compute_entropy else None)


def _score(head, hidden, labels, temperature, compute_entropy):
    """Log-probs of ``labels`` (and entropies, without gradient) of ``head(hidden) / temperature``."""
    logits = head(hidden)
    if temperature != 1.0:
        logits = logits.float() / temperature
    logps = selective_log_softmax(logits, labels)  # first: a recomputation stops once it has its inputs
    return logps, (entropy_from_logits(logits.detach()) if compute_entropy else None)
