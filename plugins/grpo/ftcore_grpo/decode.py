"""The hf backend's fast decode loop: a static KV cache, and each decode step one CUDA graph replay.

transformers' ``generate`` runs every decode step as an eager forward: at a policy's batch of 64
sequences the GPU mostly waits for Python. ``static_decode`` keeps every tensor of the step at a
fixed address (the cache, the token, its position, a 4-D attention mask over the whole cache), so
the step can be captured once per call as a CUDA graph and replayed for each token. The prompt
(prefill) runs as a normal forward; sampling runs eagerly between replays (``choose``). Nothing is
compiled, so there is nothing to recompile when the prompt length changes, and the graph and the
cache are released when the call returns. With ``cuda_graph = False`` the same loop runs each step
as a normal forward (on any device: how the CPU tests check it against ``generate``).
"""

from __future__ import annotations

from collections.abc import Callable

GRAPH_ATTENTION = ("sdpa", "eager")
"""Attention implementations whose decode step takes the loop's 4-D mask without a host sync."""


def static_decode(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    choose: Callable,
    eos_token_ids: list[int],
    pad_token_id: int,
    cuda_graph: bool,
    check_every: int = 16,
):
    """The ``[batch, max_new_tokens]`` tokens sampled after the left-padded ``input_ids``.

    The cache counts the tokens it holds on the device (transformers' ``StaticCache``), so a replay
    writes the next slot without being told which.

    ``choose(sequences, logits)`` picks the next token of every row from the last position's logits
    (``sequences``: the tokens so far, prompt included). A row that produced an EOS token continues
    with ``pad_token_id``; the loop ends early once every row has (checked every ``check_every``
    tokens, the only host syncs).
    """
    import torch
    from transformers import StaticCache

    if input_ids.device.type == "cuda" and input_ids.device != torch.device(
        "cuda", torch.cuda.current_device()
    ):
        with torch.cuda.device(input_ids.device):  # capture and replay on the model's GPU (e.g. a background
            return static_decode(  # thread's current device is cuda:0, its copy of the policy on cuda:1)
                model, input_ids, attention_mask, max_new_tokens=max_new_tokens, choose=choose,
                eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, cuda_graph=cuda_graph, check_every=check_every,
            )  # fmt: skip
    batch, width = input_ids.shape
    length, device = width + max_new_tokens, input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=length)
    positions = attention_mask.long().cumsum(-1) - 1
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions.clamp(min=0), cache=cache,
        use_cache=True, logits_to_keep=1,
    ).logits[:, -1]  # fmt: skip
    sequences = torch.full((batch, length), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :width] = input_ids
    eos = torch.tensor(eos_token_ids, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    # the decode step's inputs, at fixed addresses
    token = torch.zeros((batch, 1), dtype=torch.long, device=device)
    next_position = positions[:, -1:] + 1
    position = next_position.clone()
    mask = _decode_mask(attention_mask, length, model)

    def step():
        return model(
            input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).logits[:, -1]

    graph = graph_logits = None
    end = length
    for index in range(width, length):
        chosen = choose(sequences[:, :index], logits)
        sequences[:, index] = torch.where(unfinished, chosen, pad_token_id)
        unfinished &= ~torch.isin(sequences[:, index], eos)
        done = index + 1 - width
        if index + 1 == length or (done % check_every == 0 and not unfinished.any()):
            end = index + 1
            break
        token.copy_(sequences[:, index : index + 1])
        torch.add(next_position, done - 1, out=position)
        _attend(mask, index)
        if not cuda_graph:
            logits = step()
        elif graph is not None:
            graph.replay()
            logits = graph_logits
        else:  # the first decode step runs for real (warming up), then the graph is captured
            logits = _warm_up(step, device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                graph_logits = step()
    tokens = sequences[:, width:end]
    if end < length:  # stopped early: the rest is padding
        tokens = torch.cat([tokens, tokens.new_full((batch, length - end), pad_token_id)], dim=1)
    return tokens


def _decode_mask(attention_mask, length: int, model):
    """``[batch, 1, 1, length]``: the prompt's real tokens visible, the rest not yet (bool for sdpa,
    additive for eager attention)."""
    import torch

    batch, width = attention_mask.shape
    visible = torch.zeros((batch, 1, 1, length), dtype=torch.bool, device=attention_mask.device)
    visible[:, 0, 0, :width] = attention_mask.bool()
    if _attention(model) == "sdpa":
        return visible
    dtype = next(model.parameters()).dtype
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min
    )


def _attend(mask, index: int) -> None:
    """Make cache slot ``index`` (the token being fed) visible."""
    import torch

    mask[..., index] = mask.dtype == torch.bool  # True for a visibility mask, 0 for an additive one


def _attention(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def supports_cuda_graph(model) -> bool:
    """Whether ``static_decode`` can capture this model's decode step."""
    return _attention(model) in GRAPH_ATTENTION


def _warm_up(step, device):
    """One real step on a side stream (lazy allocations, library handles), as graph capture needs."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        logits = step()
    torch.cuda.current_stream(device).wait_stream(stream)
    return logits
