"""Per-token log-probs and entropies of completions from a packed forward: no compute on padding.

The rows of a micro-batch, each its prompt and completion tokens without padding, are packed
first-fit into rows as long as the longest one (``pack_rows``), with ``position_ids`` restarting
at 0 per row; transformers' attention keeps the rows apart (a block-diagonal mask under sdpa and
eager; under flash attention and ftcore's ``varlen`` the rows' boundaries are passed, as for packed
SFT batches). Only the hidden states that predict completion tokens go through the LM head,
``HEAD_CHUNK`` tokens at a time (recomputed in the backward pass, so one chunk of logits lives at a
time), and ``ftcore_grpo.logprobs`` turns logits / temperature into log-probs and entropies,
scattered back to TRL's ``[batch, completion_len]`` layout.
"""

from __future__ import annotations

from functools import partial

import torch
from ftcore.speed import VARLEN, packed_attention_kwargs
from torch.utils.checkpoint import checkpoint

from ftcore_grpo.logprobs import entropy_from_logits, selective_log_softmax

HEAD_CHUNK = 1024
"""Completion tokens per LM-head call."""
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")  # fmt: skip
"""Config attributes of models whose logits are more than the LM head's output (left to TRL's head)."""


def _base(model):
    """The transformers model, looking through peft."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> bool:
    """Whether the logits of ``model`` are its LM head's output (no softcapping or scaling)."""
    config = _base(model).config.get_text_config()
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
    lengths = mask.sum(1).tolist()
    width, bins = max(lengths), pack_rows(lengths)
    starts = [0] * len(lengths)  # where each row starts in the flattened [bins, width] batch
    for b, rows in enumerate(bins):
        offset = b * width
        for row in rows:
            starts[row], offset = offset, offset + lengths[row]
    positions = mask.cumsum(1) - 1
    dest = (torch.tensor(starts, device=mask.device)[:, None] + positions)[mask]  # each token's flat place
    ids = input_ids.new_zeros(len(bins) * width).index_put_((dest,), input_ids[mask])
    flat_positions = torch.zeros_like(ids).index_put_((dest,), positions[mask])  # a bin's tail: rows of one
    ids, flat_positions = ids.view(len(bins), width), flat_positions.view(len(bins), width)
    backbone, head = _base(unwrapped).base_model, _base(unwrapped).get_output_embeddings()
    attention = getattr(backbone.config, "_attn_implementation", None) or ""
    boundaries = (
        packed_attention_kwargs(flat_positions.cpu())
        if attention == VARLEN or attention.startswith("flash_attention")
        else {}
    )
    captured = []
    handle = backbone.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state)
    )
    try:  # logits of one position only: the LM head runs below, on completion positions
        model(input_ids=ids, position_ids=flat_positions, logits_to_keep=1, use_cache=False, **boundaries)
    finally:
        handle.remove()
    targets = dest[scored[mask]]
    hidden = captured[0].reshape(-1, captured[0].shape[-1])[
        targets - 1
    ]  # the state before a token predicts it
    labels = ids.view(-1)[targets]
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


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped first-fit decreasing into bins as long as the longest row: attention then
    costs at most what the padded batch's does, also under a block-diagonal mask (sdpa, eager)."""
    width, bins, room = max(lengths), [], []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((b for b, free in enumerate(room) if lengths[row] <= free), None)
        if fits is None:
            bins.append([row])
            room.append(width - lengths[row])
        else:
            bins[fits].append(row)
            room[fits] -= lengths[row]
    return bins


def _score(head, hidden, labels, temperature, compute_entropy):
    """Log-probs of ``labels`` (and entropies, without gradient) of ``head(hidden) / temperature``."""
    logits = head(hidden)
    if temperature != 1.0:
        logits = logits.float() / temperature
    logps = selective_log_softmax(logits, labels)  # first: a recomputation stops once it has its inputs
    return logps, (entropy_from_logits(logits.detach()) if compute_entropy else None)
