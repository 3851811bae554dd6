"""Checks shared by the tests (CPU, interpreter, GPU): a tiny MoE on the kernels against eager experts."""

from __future__ import annotations

import copy

import torch

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(architecture: str, with_lora: bool, seed: int = 0):
    """A tiny random-init MoE (fp32); with expert LoRA (random B, so the adapter matters) when asked."""
    from ftcore.testing import tiny_model
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt_oss(seed) if architecture == "gpt_oss" else tiny_model(architecture, seed=seed)
    if not with_lora:
        return model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def tiny_gpt_oss(seed: int = 0):
    """A tiny random-init GPT-OSS: experts stored transposed ([E, in, out]), with biases and their own gate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_bias"):  # transformers initialises them to zero
                param.normal_(0, 0.1)
    return model


def loss_and_grads(model, implementation: str, input_ids: torch.Tensor):
    """Loss and the gradients of every trainable parameter with the given experts implementation."""
    from ftcore_scattermoe import experts

    if implementation == experts.IMPLEMENTATION:
        experts.check_model(model)
        experts.install_expert_lora(model)
    else:
        model.set_experts_implementation(implementation)
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.float().item(), grads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def compare_with_eager(architecture: str, with_lora: bool, device: str, dtype: torch.dtype, tolerance: float):
    """Assert loss and gradients on the kernels match eager experts.

    The reference is eager in fp32; in a lower precision the kernels may differ from it by at most
    ``tolerance`` more than eager experts in that same precision do.
    """
    model = tiny_moe(architecture, with_lora).to(device)
    input_ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    ref_loss, ref_grads = loss_and_grads(model, "eager", input_ids)
    low = copy.deepcopy(model).to(dtype)
    eager_loss, eager_grads = loss_and_grads(low, "eager", input_ids)
    loss, grads = loss_and_grads(low, "scattermoe", input_ids)
    assert grads.keys() == ref_grads.keys() and len(grads) >= 4
    loss_budget = abs(eager_loss - ref_loss) + tolerance * abs(ref_loss)
    assert abs(loss - ref_loss) <= loss_budget, (
        f"loss {loss} vs eager fp32 {ref_loss} (eager {dtype}: {eager_loss})"
    )
    for name, ref in ref_grads.items():
        budget = relative_error(eager_grads[name], ref) + tolerance
        error = relative_error(grads[name], ref)
        assert error <= budget, f"{name}: gradient relative error {error:.2e} > {budget:.2e}"
