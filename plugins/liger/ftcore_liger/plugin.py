"""Hook implementations of the `liger` plugin (kept light: heavy imports inside hooks).

The kernels come from liger-kernel's own per-architecture ``apply_liger_kernel_to_<arch>``
functions (``MODEL_TYPE_TO_APPLY_LIGER_FN``), applied to the loaded model instance in
``patch_model`` and verified on the instantiated model in ``after_model_load``. With
``fused_linear_cross_entropy`` the model's forward is Liger's own: in training it computes the
loss from the hidden states and the lm_head weight without materialising the logits, and
normalises by the ``num_items_in_batch`` the trainer passes to the model. ``compute_loss`` calls
that forward with ``chunk_mem_const``: how many tokens one chunk of the loss holds.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys

from ftcore.config import Section
from ftcore.errors import ConfigError, PluginError, did_you_mean
from ftcore.hookspecs import hookimpl
from pydantic import Field

# Config key -> the argument names liger-kernel's apply functions use for that kernel.
KERNEL_ARGUMENTS = {
    "rms_norm": ("rms_norm",),
    "rope": ("rope",),
    "swiglu": ("swiglu", "geglu"),
    "layer_norm": ("layer_norm",),
    "fused_linear_cross_entropy": ("fused_linear_cross_entropy",),
    "rms_norm_gated": ("rms_norm_gated",),
}


class LigerSection(Section):
    """``[liger]``: which Liger kernels to apply. Unset keys take liger-kernel's default for the
    architecture; a key set to true that the architecture has no kernel for is an error."""

    rms_norm: bool | None = Field(None, description="Fused RMSNorm.")
    rope: bool | None = Field(None, description="Fused rotary position embedding.")
    swiglu: bool | None = Field(None, description="Fused GLU MLP: SwiGLU, or GeGLU for Gemma models.")
    layer_norm: bool | None = Field(
        None, description="Fused LayerNorm (models that have one, e.g. vision towers)."
    )
    fused_linear_cross_entropy: bool | None = Field(
        None,
        description="Fused lm_head + cross-entropy: training never materialises the logits. "
        "Cannot be combined with the cce plugin.",
    )
    rms_norm_gated: bool | None = Field(
        None, description="Gated RMSNorm (Qwen3.5-style), where the installed liger-kernel has one."
    )
    chunk_mem_const: int = Field(
        8,
        ge=1,
        le=1024,
        description="Fused linear cross-entropy: the logits of one chunk of tokens may take this many times "
        "the hidden states' memory (liger-kernel's chunk_mem_const). Liger's own default, 1, cuts 8,192 "
        "tokens of a 152k-vocabulary, 1024-wide model into 128 chunks of 64 tokens, each re-reading and "
        "re-writing the whole output layer's gradient; 8 makes 16 chunks of 512.",
    )


@hookimpl
def config_section():
    return LigerSection


@hookimpl
def validate_config(config):
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            "the liger plugin needs the liger-kernel package: pip install liger-kernel", key="plugins"
        )
    if "cce" in config.plugins and config.liger.fused_linear_cross_entropy is not False:
        raise ConfigError(
            "Liger's fused linear cross-entropy and the cce plugin both replace the loss. Set "
            "[liger] fused_linear_cross_entropy = false to keep the other Liger kernels with the cce loss, "
            "or remove one of the two plugins.",
            key="liger.fused_linear_cross_entropy",
        )


@hookimpl
def before_model_load(config, model_config):
    """Fail before any weights load: unsupported architecture, kernel or device."""
    from liger_kernel.utils import infer_device

    kernel_arguments(apply_function(model_config.model_type), config.liger, model_config.model_type)
    if infer_device() == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise PluginError(
            "Liger kernels are Triton GPU kernels and no GPU (CUDA, ROCm, XPU or NPU) is available; "
            "remove liger from plugins to train on the CPU.",
            plugin="liger",
        )


@hookimpl
def patch_model(config, model):
    model_type = model.config.model_type
    apply = apply_function(model_type)
    arguments = kernel_arguments(apply, config.liger, model_type)
    try:
        apply(model=model, **arguments)
    except Exception as exc:
        raise PluginError(
            f"liger-kernel's {apply.__name__} failed on {type(model).__name__}: {type(exc).__name__}: {exc}",
            plugin="liger",
        ) from exc


@hookimpl
def after_model_load(config, model):
    """Check on the instantiated (possibly peft-wrapped) model that every enabled kernel took effect."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply = apply_function(base.config.model_type)
    wanted = enabled_kernels(apply, config.liger)
    missing = [kernel for kernel in wanted if not is_patched(kernel, base)]
    if missing:
        raise PluginError(
            f"the Liger kernels {', '.join(missing)} are not active on the loaded {type(base).__name__} "
            f"(model type {base.config.model_type!r}) although {apply.__name__} was asked to apply them. "
            "The model may have loaded as a class liger-kernel does not patch; set these keys to false in "
            "[liger] or remove liger from plugins.",
            plugin="liger",
        )


@hookimpl
def compute_loss(config, model, batch, num_items_in_batch):
    """A training micro-batch through Liger's fused forward, with ``[liger] chunk_mem_const``.

    The patched forward takes the chunk budget as a keyword argument (the trainer's own call leaves
    liger's default); None where the fused loss is off, in evaluation, or without labels.
    """
    from ftcore.loss import base_model

    if not model.training or ("labels" not in batch and "shift_labels" not in batch):
        return None
    # from the settings, not from model.forward: under mixed precision accelerate wraps the forward
    model_type = base_model(model).config.model_type
    if "fused_linear_cross_entropy" not in enabled_kernels(apply_function(model_type), config.liger):
        return None
    outputs = model(
        **batch, num_items_in_batch=num_items_in_batch, chunk_mem_const=config.liger.chunk_mem_const
    )
    return outputs.loss


def apply_function(model_type: str):
    """liger-kernel's apply function for ``model_type``; an error listing the supported types."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        supported = sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)
        raise PluginError(
            f"liger-kernel has no kernels for model type {model_type!r}{did_you_mean(model_type, supported)}. "
            f"Supported model types: {', '.join(supported)}. Remove liger from plugins for this model.",
            plugin="liger",
        )
    return MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]


def kernel_arguments(apply, settings: LigerSection, model_type: str) -> dict[str, bool]:
    """The keyword arguments for ``apply`` from the keys set in ``[liger]``."""
    parameters = inspect.signature(apply).parameters
    arguments = {}
    for key, names in KERNEL_ARGUMENTS.items():
        value = getattr(settings, key)
        name = next((n for n in names if n in parameters), None)
        if value is None or (name is None and value is False):
            continue
        if name is None:
            available = [k for k, ns in KERNEL_ARGUMENTS.items() if any(n in parameters for n in ns)]
            raise PluginError(
                f"[liger] {key} = true, but liger-kernel has no {key} kernel for model type {model_type!r} "
                f"(kernels for it: {', '.join(available)}). Remove the key or set it to false.",
                plugin="liger",
            )
        arguments[name] = value
    return arguments


def enabled_kernels(apply, settings: LigerSection) -> list[str]:
    """The kernels ``apply`` turns on with these settings (liger-kernel's defaults for unset keys)."""
    parameters = inspect.signature(apply).parameters
    enabled = []
    for key, names in KERNEL_ARGUMENTS.items():
        name = next((n for n in names if n in parameters), None)
        if name is None:
            continue
        value = getattr(settings, key)
        if value is None:
            value = parameters[name].default is True
        if value:
            enabled.append(key)
    return enabled


def is_patched(kernel: str, model) -> bool:
    """Whether ``kernel`` shows on the instantiated model (module names, forwards, rope function)."""
    names = {module._get_name() for module in model.modules()}
    liger_names = [name for name in names if name.startswith("Liger")]
    if kernel == "rms_norm":
        return any("RMSNorm" in name and "Gated" not in name for name in liger_names)
    if kernel == "rms_norm_gated":
        return any("RMSNorm" in name and "Gated" in name for name in liger_names)
    if kernel == "layer_norm":
        return any("LayerNorm" in name for name in liger_names)
    if kernel == "swiglu":
        return any(part in name for name in liger_names for part in ("MLP", "GLU", "Experts"))
    if kernel == "rope":
        modelling = {sys.modules.get(type(module).__module__) for module in model.modules()}
        return any(_from_liger(getattr(m, "apply_rotary_pos_emb", None)) for m in modelling)
    if kernel == "fused_linear_cross_entropy":
        return _from_liger(model.forward)
    raise ValueError(f"unknown kernel {kernel!r}")


def _from_liger(function) -> bool:
    function = getattr(function, "__func__", function)
    return (getattr(function, "__module__", None) or "").startswith("liger_kernel")
