"""Hook implementations of the `cce` plugin (kept light: heavy imports inside hooks).

``compute_loss`` runs the model's own forward (through any DDP/FSDP/peft wrapper) with the
output layer's forward swapped for one that computes the cut-cross-entropy loss from the final
hidden states and the lm_head weight, so the logits tensor is never materialised. The swapped
forward returns the real logits of the first two positions only; on the first step they check
that the lm_head weight and the model's post-processing of the logits (final-logit softcapping,
nothing else) are what the loss assumes, so an unknown model fails loudly instead of training on
a wrong loss. This is generic for any ``*ForCausalLM`` / ``*ForConditionalGeneration`` with an
output layer, peft-wrapped or not.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Literal

from ftcore.config import Section
from ftcore.errors import ConfigError, PluginError
from ftcore.hookspecs import hookimpl
from pydantic import Field

IGNORE_INDEX = -100
PROBE_POSITIONS = 2


class CCESection(Section):
    """``[cce]``: Cut Cross-Entropy loss (the ``cut-cross-entropy`` package)."""

    impl: Literal["cce", "torch_compile"] = Field(
        "cce",
        description="cut-cross-entropy implementation: cce (Triton, needs a CUDA GPU) or torch_compile (any device).",
    )
    reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="mean: summed token losses / trained tokens of the whole gradient-accumulation step "
        "(num_items_in_batch), else of the micro-batch; sum: the summed token losses.",
    )
    keep_eval_logits: bool = Field(
        False,
        description="Evaluate through the model's own forward, with logits (for metrics that need them).",
    )
    gradient_filter: bool = Field(
        False,
        description="impl cce only: skip backward blocks whose softmax gradients are all below eps/32 of the "
        "dtype (the package's filter_eps='high'). Faster, but approximate: it drops the small gradients of "
        "lm_head rows that are not targets, which matters for a near-uniform softmax (random init).",
    )


@hookimpl
def config_section():
    return CCESection


@hookimpl
def validate_config(config):
    if importlib.util.find_spec("cut_cross_entropy") is None:
        raise ConfigError(
            "the cce plugin needs the cut-cross-entropy package: pip install cut-cross-entropy", key="plugins"
        )
    if config.cce.gradient_filter and config.cce.impl != "cce":
        raise ConfigError(
            f'gradient_filter needs impl = "cce" (impl is "{config.cce.impl}")', key="cce.gradient_filter"
        )


@hookimpl
def before_model_load(config):
    import torch

    if config.cce.impl == "cce" and not torch.cuda.is_available():
        raise PluginError(
            'impl "cce" is a Triton kernel that needs a CUDA GPU, and none is available. '
            'Set [cce] impl = "torch_compile" to run on this machine.',
            plugin="cce",
        )


@hookimpl
def after_model_load(config, model):
    """Fail now, not at the first step, when the model has no output layer the loss can use."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lm_head = output_layer(model)
    name = type(lm_head).__name__
    if isinstance(lm_head, BaseTunerLayer):
        raise PluginError(
            f"the output layer is wrapped by a peft adapter ({name}), which cut-cross-entropy cannot fuse. "
            "Leave lm_head out of [adapter] targets (put it in modules_to_save to train it in full).",
            plugin="cce",
        )
    if getattr(lm_head, "bias", None) is not None:
        raise PluginError(
            f"the output layer ({name}) has a bias, which cut-cross-entropy does not support.", plugin="cce"
        )


@hookimpl
def compute_loss(config, model, batch, num_items_in_batch):
    settings = config.cce
    if not model.training and settings.keep_eval_logits:
        return None
    inputs = dict(batch)
    labels, shift_labels = inputs.pop("labels", None), inputs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return None
    targets, shift = (labels, True) if shift_labels is None else (shift_labels, False)
    lm_head = output_layer(model)
    softcap = final_logit_softcap(model)
    calls = []

    def loss_forward(hidden, lm_head_forward):
        weight = lm_head.weight
        total = linear_cross_entropy_sum(
            hidden,
            weight,
            targets,
            impl=settings.impl,
            softcap=softcap,
            shift=shift,
            gradient_filter=settings.gradient_filter,
        )
        probe = lm_head_forward(hidden[..., :PROBE_POSITIONS, :])
        calls.append((total, hidden[..., :PROBE_POSITIONS, :], weight, probe))
        return probe

    with forward_replaced(lm_head, loss_forward):
        outputs = model(**inputs)
    if len(calls) != 1:
        raise PluginError(
            f"the output layer ran {len(calls)} times in one forward of {type(model).__name__} (expected once); "
            "cce supports models with one lm_head call (no multi-token prediction heads).",
            plugin="cce",
        )
    total, hidden_probe, weight, probe = calls[0]
    if not getattr(lm_head, "_ftcore_cce_verified", False):
        verify_logits(model, hidden_probe, weight, probe, outputs, softcap)
        lm_head._ftcore_cce_verified = True
    if settings.reduction == "sum":
        return total
    if num_items_in_batch is None:
        num_items_in_batch = (targets[..., 1:] if shift else targets).ne(IGNORE_INDEX).sum()
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def linear_cross_entropy_sum(
    hidden,
    weight,
    targets,
    *,
    impl: str,
    softcap: float | None = None,
    shift: bool = True,
    gradient_filter: bool = False,
):
    """Summed token cross-entropy of ``hidden @ weight.T`` without materialising the logits.

    ``shift=True`` predicts ``targets[..., 1:]`` from ``hidden[..., :-1, :]``; ``IGNORE_INDEX``
    targets are skipped. Under autocast both operands use the autocast dtype, as the lm_head would.
    Gradients are exact unless ``gradient_filter`` (see ``CCESection``).
    """
    import torch
    from cut_cross_entropy import linear_cross_entropy

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    targets = targets.to(hidden.device)
    filter_eps = "high" if gradient_filter else None
    return linear_cross_entropy(
        hidden,
        weight,
        targets,
        softcap=softcap,
        reduction="sum",
        shift=shift,
        filter_eps=filter_eps,
        impl=impl,
    )


def output_layer(model):
    """The model's output layer (lm_head), looking through DDP/FSDP/compile and peft wrappers."""
    from accelerate.utils import extract_model_from_parallel

    unwrapped = extract_model_from_parallel(model)
    get_output = getattr(unwrapped, "get_output_embeddings", None)
    lm_head = get_output() if get_output is not None else None
    weight = getattr(lm_head, "weight", None)
    if lm_head is None or getattr(weight, "ndim", None) != 2:
        raise PluginError(
            f"{type(unwrapped).__name__} has no output layer with a 2-D weight (lm_head); cce needs a causal "
            "language model (a *ForCausalLM or *ForConditionalGeneration class). Remove cce from plugins.",
            plugin="cce",
        )
    return lm_head


def final_logit_softcap(model) -> float | None:
    from accelerate.utils import extract_model_from_parallel

    config = extract_model_from_parallel(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "final_logit_softcapping", None)


@contextmanager
def forward_replaced(module, forward):
    """Call ``forward(inputs, original_forward)`` in place of ``module.forward`` inside the block."""
    saved = module.__dict__.get("forward")
    original = module.forward

    def replacement(hidden, *args, **kwargs):
        return forward(hidden, lambda x: original(x, *args, **kwargs))

    module.forward = replacement
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def verify_logits(model, hidden_probe, weight, probe, outputs, softcap):
    """Check that the loss sees what the model would: the lm_head weight and softcapping only."""
    import torch

    name = type(model).__name__
    expected = torch.nn.functional.linear(hidden_probe.to(probe.dtype), weight.to(probe.dtype))
    if not torch.allclose(probe.float(), expected.float(), rtol=1e-2, atol=1e-2):
        raise PluginError(
            f"the output layer of {name} does not compute hidden @ lm_head.weight.T (a quantized or adapted "
            "lm_head?), so cut-cross-entropy would train on a different loss. Remove cce from plugins.",
            plugin="cce",
        )
    logits = getattr(outputs, "logits", None)
    expected = probe.float()
    if softcap is not None:
        expected = torch.tanh(expected / softcap) * softcap
    if (
        logits is None
        or logits.shape != probe.shape
        or not torch.allclose(logits.float(), expected, rtol=1e-3, atol=1e-3)
    ):
        raise PluginError(
            f"{name}.forward changes the logits after the output layer beyond final-logit softcapping "
            "(a logit scale, for example), which cut-cross-entropy would not reproduce. Remove cce from plugins.",
            plugin="cce",
        )
