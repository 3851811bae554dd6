"""transformers integration: the ``scattermoe`` experts implementation and the fused expert-LoRA path.

transformers 5 stores MoE experts as fused 3-D parameters and dispatches their forward through
``transformers.integrations.moe.ExpertsInterface`` by ``config._experts_implementation``. We register
``scattermoe`` there. The model's own router still picks the experts and their weights (softmax
top-k, normalised top-k, sigmoid with bias...), so routing variants need nothing here.

peft adapts 3-D expert parameters (``target_parameters = ["experts.gate_up_proj", ...]``) with
``ParamWrapper``, which folds ``W + s B A`` into a full-size weight on every forward. For those
wrappers we replace the forward with one that hands the per-expert LoRA factors to the kernels.
"""

from __future__ import annotations

import types

import torch
from ftcore.errors import PluginError
from torch import nn

from ftcore_scattermoe import ops
from ftcore_scattermoe.routing import flatten_sort_count

IMPLEMENTATION = "scattermoe"
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED = (
    "MoE models whose experts transformers dispatches through its ExpertsInterface "
    "(classes decorated with @use_experts_implementation: qwen3_moe, qwen3_5_moe, mixtral, olmoe, "
    "qwen2_moe, gemma4, gpt_oss, deepseek_v3, glm4_moe, ...), with unquantized 3-D expert weights and no "
    "expert parallelism"
)


def register() -> None:
    """Make ``experts_implementation="scattermoe"`` known to transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, scattermoe_experts_forward)


def is_experts_module(module: nn.Module) -> bool:
    """A module whose class transformers decorated with ``@use_experts_implementation``."""
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "_is_expert_parallel")
        and hasattr(module, "down_proj")
    )


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the kernels cannot run this experts module, or None."""
    if module._is_expert_parallel:
        return "expert parallelism is enabled"
    for name in (_up_name(module), "down_proj"):
        weight = getattr(module, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.dtype not in COMPUTE_DTYPES:
            return (
                f"{name} is not a 3-D float32/bfloat16/float16 tensor (quantized experts are not supported)"
            )
    return None


def check_model(model: nn.Module, *, autotune: bool = True, full_finetuning: str = "kernels") -> int:
    """Check every experts module can be served and select ``scattermoe`` (with ``autotune`` tiles or
    fixed ones; experts whose weights train without LoRA on ``full_finetuning``: ``"grouped_mm"`` or
    ``"kernels"``); returns how many there are."""
    register()
    found = 0
    for name, module in model.named_modules():
        if is_experts_module(module):
            reason = unsupported_reason(module)
            if reason:
                raise PluginError(
                    f"cannot serve {name} ({type(module).__name__}): {reason}. Supported: {SUPPORTED}."
                )
            module.scattermoe_autotune = autotune
            module.scattermoe_full_finetuning = full_finetuning
            found += 1
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise PluginError(
            f"the model ({model_type}) has no experts served through transformers' ExpertsInterface. "
            f"Supported: {SUPPORTED}. Remove 'scattermoe' from plugins for this model.",
            plugin=IMPLEMENTATION,
        )
    model.set_experts_implementation(IMPLEMENTATION)
    return found


def scattermoe_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: dict[str, ops.LoRA] | None = None,
) -> torch.Tensor:
    """The experts forward of transformers' ExpertsInterface, on the ScatterMoE kernels.

    ``lora`` maps a parameter name (``gate_up_proj``/``up_proj``, ``down_proj``) to its per-expert
    LoRA factors ``(A [E, R, in], B [E, out, R], scaling)``.
    """
    reason = unsupported_reason(self)
    if reason:
        raise PluginError(f"{type(self).__name__}: {reason}. Supported: {SUPPORTED}.", plugin=IMPLEMENTATION)
    lora = lora or {}
    if (
        not lora
        and _trains_own_weights(self)
        and getattr(self, "scattermoe_full_finetuning", "kernels") == "grouped_mm"
    ):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    up_name = _up_name(self)
    up, down = _out_in(self, up_name), _out_in(self, "down_proj")
    num_tokens, k = top_k_index.shape
    routing = flatten_sort_count(
        top_k_index, up.shape[0], autotune=getattr(self, "scattermoe_autotune", True)
    )
    x = hidden_states.to(up.dtype)
    h = ops.scatter_linear(
        x, up, routing, x_grouped=False, y_grouped=True, lora=_cast(lora.get(up_name), up.dtype)
    )  # [S, 2I] grouped by expert
    if self.has_bias:
        h = h + getattr(self, f"{up_name}_bias")[routing.expert_idxs]
    a = _activation(self, h)
    out = ops.scatter_linear(
        a, down, routing, x_grouped=True, y_grouped=False, lora=_cast(lora.get("down_proj"), down.dtype)
    )  # [T * k, H] in (token, slot) order
    if self.has_bias:
        out = out + self.down_proj_bias[top_k_index.reshape(-1)]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = (out.view(num_tokens, k, -1) * top_k_weights.unsqueeze(-1)).sum(1)
    return out.to(hidden_states.dtype)


def _trains_own_weights(module: nn.Module) -> bool:
    """Gradients flow into the expert weights themselves (full fine-tuning of the experts)."""
    return torch.is_grad_enabled() and any(
        getattr(module, name).requires_grad for name in (_up_name(module), "down_proj")
    )


def install_expert_lora(model: nn.Module) -> int:
    """Route peft LoRA on expert parameters through the kernels; returns how many experts modules."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    installed = 0
    for outer in wrappers:
        if id(outer) in inner:
            continue
        chain, experts = _wrapper_chain(outer)
        if not is_experts_module(experts):
            continue
        names = {w.parameter_name for w in chain}
        allowed = {_up_name(experts), "down_proj"}
        if not names <= allowed:
            raise PluginError(
                f"LoRA targets {sorted(names - allowed)} on {type(experts).__name__}; the fused expert LoRA "
                f"supports {sorted(allowed)}. Drop the others from adapter.target_parameters, or set "
                "scattermoe.expert_lora = false to keep peft's generic path.",
                plugin=IMPLEMENTATION,
            )
        if "forward" not in outer.__dict__:
            outer.forward = types.MethodType(_fused_lora_forward, outer)
        installed += 1
    return installed


def _fused_lora_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """Forward of the outermost peft ``ParamWrapper`` around an experts module."""
    chain, experts = _wrapper_chain(self)
    lora = None
    if not args and not kwargs and experts.config._experts_implementation == IMPLEMENTATION:
        lora = _active_lora(chain)
    if lora is None:  # disabled or merged adapters, several active adapters: peft's own path
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    return scattermoe_experts_forward(experts, hidden_states, top_k_index, top_k_weights, lora=lora)


def _wrapper_chain(outer):
    """The nested peft ParamWrappers from ``outer`` inwards, and the experts module they wrap."""
    chain = [outer]
    while type(chain[-1].base_layer) is type(outer):
        chain.append(chain[-1].base_layer)
    return chain, chain[-1].base_layer


def _active_lora(chain) -> dict[str, ops.LoRA] | None:
    """{parameter name: (A [E, R, in], B [E, out, R], scaling)} of the single active adapter."""
    lora = {}
    for wrapper in chain:
        if wrapper.disable_adapters or wrapper.merged:
            return None
        active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
        if len(active) > 1:
            return None
        if active:
            name = active[0]
            experts, rank = wrapper.num_experts, wrapper.r[name]
            weight_a, weight_b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
            # peft stores A as [E*R, in] (expert-major) and B as [out, R*E] (rank-major).
            lora_a = weight_a.view(experts, rank, weight_a.shape[-1])
            lora_b = weight_b.view(weight_b.shape[0], rank, experts).permute(2, 0, 1)
            lora[wrapper.parameter_name] = (lora_a, lora_b, wrapper.scaling[name])
    return lora


def _up_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def _out_in(module: nn.Module, name: str) -> torch.Tensor:
    """The expert weight as an [E, out, in] view (transformers stores some as [E, in, out])."""
    weight = getattr(module, name)
    return weight.transpose(1, 2) if module.is_transposed else weight


def _cast(lora: ops.LoRA | None, dtype: torch.dtype) -> ops.LoRA | None:
    if lora is None:
        return None
    lora_a, lora_b, scaling = lora
    # B is small: an expert-major copy makes the kernels' reads of B_e coalesced.
    return lora_a.to(dtype), lora_b.to(dtype).contiguous(), scaling


def _activation(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The experts' gate: the fused SwiGLU kernel for the default silu gate, else the module's own."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    if not module.has_gate:
        return module.act_fn(h)
    if type(module)._apply_gate is _default_apply_gate and isinstance(
        module.act_fn, (SiLUActivation, nn.SiLU)
    ):
        return ops.swiglu(h)
    return module._apply_gate(h)
