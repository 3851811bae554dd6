"""GPU: with every Liger kernel (liger-kernel's defaults: rms_norm, rope, swiglu, fused linear
cross-entropy), bf16 loss and gradients stay as close to an fp32 reference as the stock bf16
model's, for Llama- and Qwen3-shaped models, full fine-tuning, LoRA and packed rows."""

import copy
import importlib

import pytest
import torch
from ftcore.config import validate_config
from ftcore.testing import KERNEL_TEST_SHAPE, random_batch, tiny_model

pytestmark = pytest.mark.gpu
IGNORE_INDEX = -100
SHAPE = KERNEL_TEST_SHAPE


@pytest.fixture
def restore_transformers():
    """Undo the module-wide names liger-kernel replaces (rope, norm and MLP classes)."""
    modules = [importlib.import_module(f"transformers.models.{a}.modeling_{a}") for a in ("llama", "qwen3")]
    saved = {module: dict(vars(module)) for module in modules}
    yield
    for module, attributes in saved.items():
        for name, value in attributes.items():
            setattr(module, name, value)


def loss_and_grads(model, batch, num_items):
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
    return loss.item(), grads


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("variant", ["full", "lora", "packed"])
@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_bf16_loss_and_grads_match_stock_model(architecture, variant, restore_transformers):
    import peft

    config, plugins = validate_config(
        {"plugins": ["liger"], "model": {"base": "tiny"}, "train": {"output_dir": "unused"}}
    )
    model = tiny_model(architecture, **SHAPE).cuda()
    if variant == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    batch = random_batch(SHAPE["vocab_size"], packed=variant == "packed", device="cuda")
    num_items = 2 * int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # 2 accumulated micro-batches
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads(model, batch, num_items)  # fp32, stock
    base_loss, base_grads = loss_and_grads(bf16, batch, num_items)  # bf16, stock

    base = bf16.get_base_model() if variant == "lora" else bf16
    plugins.hook.before_model_load(config=config, model_config=base.config, run=None)
    plugins.hook.patch_model(config=config, model=base, run=None)
    plugins.hook.after_model_load(config=config, model=bf16, run=None)
    liger_loss, liger_grads = loss_and_grads(bf16, batch, num_items)

    base_error, liger_error = relative_error(base_grads, ref_grads), relative_error(liger_grads, ref_grads)
    print(
        f"\n{architecture}/{variant}: loss fp32 {ref_loss:.5f} bf16 {base_loss:.5f} liger {liger_loss:.5f}; "
        f"grad rel. error vs fp32: bf16 {base_error:.2e} liger {liger_error:.2e}"
    )
    assert abs(liger_loss - ref_loss) <= 2 * abs(base_loss - ref_loss) + 2e-3 * ref_loss
    assert liger_error <= 2 * base_error + 2e-3
