"""The fast path: attention for packed rows, the ``model.attention = "auto"`` choice, regional compile.

Packed rows hold several documents; each must attend only within itself. ``varlen`` runs torch's
variable-length flash attention (``torch.nn.attention.varlen``, no flash-attn package needed) over
the documents' boundaries (``cu_seq_lens_q`` / ``max_length_q``, computed on the host by the
collator with ``packed_attention_kwargs``), so no mask is built and no FLOP is spent across
documents. The names follow transformers' flash-attention kwargs, which models forward to their
attention function untouched.
"""

from __future__ import annotations

import importlib.util
import inspect
import weakref
from typing import Any

from ftcore.errors import ConfigError

VARLEN = "ftcore_varlen"
"""The name under which the varlen attention is registered in transformers' AttentionInterface."""

_VARLEN_PARAMETERS: frozenset[str] = frozenset()


def packed_attention_kwargs(position_ids) -> dict[str, Any]:
    """Document boundaries of a packed batch, for the collator (host side: no device sync later).

    A document starts at each row start and wherever ``position_ids`` do not continue by one.
    Returns ``cu_seq_lens_q/k`` (int32 cumulative lengths over the flattened batch) and
    ``max_length_q/k`` (the longest document, a Python int).
    """
    import numpy as np
    import torch

    flat = position_ids.reshape(-1).cpu().numpy()
    starts = np.ones(flat.shape, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[:: position_ids.shape[-1]] = True
    boundaries = np.append(np.flatnonzero(starts), flat.size).astype(np.int32)
    longest = int(np.diff(boundaries).max())
    boundaries = torch.from_numpy(boundaries).to(position_ids.device)
    return {
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def varlen_available() -> bool:
    """torch ships variable-length flash attention (2.10+) and a CUDA GPU of sm80 or newer is here."""
    import torch

    return (
        importlib.util.find_spec("torch.nn.attention.varlen") is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 0)
    )


_last_derived: tuple[Any, Any] = (lambda: None, None)


def _boundaries(query, kwargs) -> tuple[Any, int]:
    """``(cu_seq_lens, max_length)`` from the collator's kwargs, else from ``position_ids`` (one sync
    per forward, cached across layers), else one document per row."""
    global _last_derived
    import torch

    if kwargs.get("cu_seq_lens_q") is not None:
        cu_seq_lens = kwargs["cu_seq_lens_q"].to(query.device, torch.int32, non_blocking=True)
        return cu_seq_lens, kwargs["max_length_q"]
    position_ids = kwargs.get("position_ids")
    batch, length = query.shape[0], query.shape[2]
    if position_ids is None:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device), length
    reference, derived = _last_derived
    if reference() is not position_ids:
        host = packed_attention_kwargs(position_ids.expand(batch, -1).cpu())
        derived = host["cu_seq_lens_q"].to(query.device), host["max_length_q"]
        _last_derived = (weakref.ref(position_ids), derived)
    return derived


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """A transformers attention function: ``query`` is (batch, heads, seq, dim); returns (batch, seq, heads, dim)."""
    import torch

    if attention_mask is not None or key.shape[2] != query.shape[2]:
        # a mask built elsewhere, or decoding with a KV cache: not packed training, plain SDPA is right
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    unsupported = [
        name
        for name, used in (
            ("logit softcapping", softcap is not None),
            ("attention sinks", kwargs.get("s_aux") is not None),
            ("attention dropout", dropout > 0 and module.training),
        )
        if used
    ]
    if unsupported:
        raise ConfigError(
            f"attention 'varlen' does not support {', '.join(unsupported)} ({type(module).__name__}); "
            'set model.attention = "flex_attention" or "sdpa"',
            key="model.attention",
        )
    batch, heads, length, dim = query.shape
    cu_seq_lens, max_length = _boundaries(query, kwargs)
    causal = module.is_causal if is_causal is None else is_causal
    window = (-1, 0 if causal else -1)
    if sliding_window is not None:
        window = (sliding_window - 1, window[1])

    def tokens_first(tensor):  # (batch, heads, seq, dim) -> (batch * seq, heads, dim); a view when batch == 1
        return tensor.transpose(1, 2).reshape(batch * length, tensor.shape[1], dim)

    q, k, v = tokens_first(query), tokens_first(key), tokens_first(value)
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(
                f"attention 'varlen' needs bfloat16 or float16 activations, got {q.dtype}; set train.precision "
                'or model.dtype to bf16, or model.attention = "sdpa"',
                key="model.attention",
            )
        out = _flash_varlen(q, k, v, cu_seq_lens, max_length, scaling, window)
    else:
        out = _reference_varlen(q, k, v, cu_seq_lens, scaling, window)
    return out.view(batch, length, heads, dim), None


def _flash_varlen(q, k, v, cu_seq_lens, max_length, scale, window):
    from torch.nn.attention.varlen import varlen_attn

    parameters = _VARLEN_PARAMETERS
    extra: dict[str, Any] = {}
    if "scale" in parameters:
        extra["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise ConfigError(
            'this torch\'s varlen attention has no scale argument; upgrade torch or set model.attention = "sdpa"',
            key="model.attention",
        )
    if "enable_gqa" in parameters:
        extra["enable_gqa"] = q.shape[1] != k.shape[1]
    if "window_size" in parameters:
        extra["window_size"] = window
    elif window[0] != -1:
        raise ConfigError(
            "this torch's varlen attention has no sliding windows; upgrade torch or set model.attention = "
            '"flex_attention"',
            key="model.attention",
        )
    else:
        extra["is_causal"] = window[1] == 0
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **extra)


def _reference_varlen(q, k, v, cu_seq_lens, scale, window):
    """The same contract on devices without flash attention: SDPA document by document."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    out = torch.empty_like(q)
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        mask = None
        if window[0] != -1 or window[1] == 0:
            position = torch.arange(end - start, device=q.device)
            offset = position[:, None] - position[None, :]
            mask = (offset >= 0) if window[1] == 0 else torch.ones_like(offset, dtype=torch.bool)
            if window[0] != -1:
                mask &= offset <= window[0]
        result = scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=qs.shape[0] != ks.shape[0]
        )
        out[start:end] = result.transpose(0, 1)
    return out


def register_varlen_attention() -> str:
    """Register ``varlen`` in transformers' AttentionInterface (no mask function: none is built)."""
    global _VARLEN_PARAMETERS
    from transformers import AttentionInterface

    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        from torch.nn.attention.varlen import varlen_attn

        # its keywords changed between torch releases (is_causal, then window_size, scale, enable_gqa)
        _VARLEN_PARAMETERS = frozenset(inspect.signature(varlen_attn).parameters)
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def auto_attention(config, model_config=None) -> str:
    """What ``model.attention = "auto"`` means on this machine for this run.

    Packed rows trained in bf16/fp16 on a CUDA GPU: flash-attn's varlen kernels when the package
    is installed, else torch's own (``varlen``), else flex attention with a document mask (also
    for models needing logit softcapping or attention sinks); anything else: sdpa.
    """
    import torch

    if not (config.train.packing and torch.cuda.is_available() and trains_in_half_precision(config)):
        return "sdpa"
    needs_flex = model_config is not None and (
        getattr(model_config, "attn_logit_softcapping", None) is not None
        or getattr(model_config, "model_type", "") == "gpt_oss"
    )
    if needs_flex:
        return "flex_attention"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if varlen_available():
        return register_varlen_attention()
    return "flex_attention"


def trains_in_half_precision(config) -> bool:
    """Whether attention sees bf16/fp16 activations on a GPU (autocast, or half-precision weights)."""
    if config.train.precision != "fp32":
        return True  # bf16/fp16, or auto: bf16 on GPUs new enough for flash attention
    return config.model.dtype in ("auto", "bfloat16", "float16")


def resolve_attention(config, model_config=None) -> str:
    """The ``attn_implementation`` for ``model.attention`` (``auto`` and ``varlen`` resolved)."""
    requested = config.model.attention
    if requested == "auto":
        return auto_attention(config, model_config)
    if requested == "varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            raise ConfigError(
                'attention "varlen" needs torch 2.10 or newer (torch.nn.attention.varlen); upgrade torch or '
                'choose "flex_attention"',
                file=config.source,
                key="model.attention",
            )
        return register_varlen_attention()
    return requested


def decoder_layers(model) -> list:
    """The repeated blocks of ``model`` (``_no_split_modules`` classes), looking through peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in base.modules() if type(module).__name__ in names]


def compile_decoder_layers(model) -> int:
    """Regional compilation: ``torch.compile`` each decoder layer (one compiled graph serves all of them).

    Faster to start than compiling the whole model and free of its graph breaks. Compiled with dynamic
    shapes from the first batch (``dynamic=True``), so batches of other lengths and packed rows with
    other document counts reuse the graph without recompiling.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"model.compile: found no decoder layers in {type(model).__name__} (it declares no _no_split_modules); "
            "set model.compile = false",
            key="model.compile",
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


class DocumentBoundaries:
    """Wraps a packed collator: each batch also carries ``packed_attention_kwargs`` of its positions."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch.update(packed_attention_kwargs(batch["position_ids"]))
        return batch


def with_document_boundaries(collator, model):
    """``collator``, wrapped in ``DocumentBoundaries`` when it packs and the model's attention reads them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = getattr(base.config, "_attn_implementation", None) or ""
    if getattr(collator, "packed", False) and (
        attention == VARLEN or attention.startswith("flash_attention")
    ):
        return DocumentBoundaries(collator)
    return collator
