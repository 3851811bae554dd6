"""CPU tests of the cce plugin: discovery, config, error paths, and the loss (cut-cross-entropy's
torch_compile implementation) against the model's own cross-entropy, loss and gradients."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from ftcore.config import validate_config
from ftcore.errors import ConfigError, PluginError
from ftcore.plugins import Plugins
from ftcore.testing import TINY_SHAPE, tiny_model

IGNORE_INDEX = -100
TINY_TEXT = {
    k: v for k, v in TINY_SHAPE.items() if k not in ("max_position_embeddings", "tie_word_embeddings")
}


def cce_config(**cce):
    raw = {"plugins": ["cce"], "model": {"base": "tiny"}, "train": {"output_dir": "unused"}, "cce": cce}
    return validate_config(raw)


def batch_for(model, packed=False):
    """Two rows with ignored prompt tokens; ``packed``: the first row holds two sequences."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 16), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[1, :6] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["position_ids"] = torch.cat([torch.arange(9), torch.arange(7)]).repeat(2, 1)
        labels[0, 9] = IGNORE_INDEX
    return batch


def with_lora(model, **lora):
    """The model wrapped by peft LoRA, with LoRA B nonzero (it starts at zero) so every grad is tested."""
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, **lora))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def grads_of(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def assert_matches_model_loss(model, batch, num_items_in_batch, **cce):
    """The plugin's loss and gradients equal those of the model's own loss."""
    config, plugins = cce_config(impl="torch_compile", **cce)
    plugins.hook.after_model_load(config=config, model=model, run=None)
    model.train()
    loss = plugins.hook.compute_loss(
        config=config, model=model, batch=batch, num_items_in_batch=num_items_in_batch, run=None
    )
    loss.backward()
    grads = grads_of(model)
    reference = model(**batch, num_items_in_batch=num_items_in_batch).loss
    reference.backward()
    reference_grads = grads_of(model)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in reference_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
    return loss


def test_plugin_is_discovered_and_imports_no_torch():
    assert "cce" in Plugins(["cce"]).enabled
    code = "import sys, ftcore_cce.plugin; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_table_defaults_and_bad_values():
    config, _ = cce_config()
    assert config.cce.model_dump() == {
        "impl": "cce",
        "reduction": "mean",
        "keep_eval_logits": False,
        "gradient_filter": False,
    }
    with pytest.raises(ConfigError, match="cce.impl.*'cce' or 'torch_compile'"):
        cce_config(impl="triton")
    with pytest.raises(ConfigError, match='did you mean "keep_eval_logits"'):
        cce_config(keep_logits=True)
    with pytest.raises(ConfigError, match='gradient_filter needs impl = "cce"'):
        cce_config(impl="torch_compile", gradient_filter=True)


def test_missing_package_is_a_clear_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "cut_cross_entropy" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install cut-cross-entropy"):
        cce_config()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cce_impl_without_cuda_is_an_error_before_loading():
    config, plugins = cce_config()
    with pytest.raises(PluginError, match='needs a CUDA GPU.*impl = "torch_compile"'):
        plugins.hook.before_model_load(config=config, model_config=tiny_model("llama").config, run=None)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_loss_and_grads_match_under_gradient_accumulation(architecture):
    model = tiny_model(architecture)
    batch = batch_for(model)
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = assert_matches_model_loss(model, batch, torch.tensor(3 * trained))  # 3 accumulated micro-batches
    assert_matches_model_loss(model, batch, None)  # mean over this micro-batch
    assert loss.item() == pytest.approx(model(**batch).loss.item() / 3, rel=1e-5)


def test_lora_with_packing_and_tied_embeddings():
    model = tiny_model("qwen3", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = with_lora(model, target_modules="all-linear")
    batch = batch_for(model, packed=True)
    assert_matches_model_loss(model, batch, torch.tensor(40))


def test_lm_head_in_modules_to_save():
    model = with_lora(tiny_model("llama"), target_modules=["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(
            1.5
        )  # differs from the original
    assert_matches_model_loss(model, batch_for(model), None)


def test_softcapping_on_a_conditional_generation_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = {**TINY_TEXT, "final_logit_softcapping": 30.0}
    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert_matches_model_loss(model, batch_for(model), torch.tensor(20))


def test_reduction_sum_and_eval_logits():
    model = tiny_model("llama")
    batch = batch_for(model)
    assert_matches_model_loss(model, batch, torch.tensor(1), reduction="sum")
    config, plugins = cce_config(impl="torch_compile", keep_eval_logits=True)
    model.eval()
    assert (
        plugins.hook.compute_loss(config=config, model=model, batch=batch, num_items_in_batch=None, run=None)
        is None
    )
    model.train()
    assert (
        plugins.hook.compute_loss(config=config, model=model, batch=batch, num_items_in_batch=None, run=None)
        is not None
    )


def test_unknown_logit_transform_fails_loudly():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **TINY_TEXT, logits_scaling=4.0))
    config, plugins = cce_config(impl="torch_compile")
    with pytest.raises(PluginError, match="GraniteForCausalLM.forward changes the logits"):
        plugins.hook.compute_loss(
            config=config, model=model, batch=batch_for(model), num_items_in_batch=None, run=None
        )


def test_models_the_loss_cannot_serve_fail_at_load():
    import peft
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config, plugins = cce_config(impl="torch_compile")
    with pytest.raises(PluginError, match="LlamaModel has no output layer"):
        plugins.hook.after_model_load(
            config=config, model=AutoModel.from_config(tiny_model("llama").config), run=None
        )
    lora_on_head = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(PluginError, match="wrapped by a peft adapter"):
        plugins.hook.after_model_load(config=config, model=lora_on_head, run=None)
    phi = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi", **TINY_TEXT))
    with pytest.raises(PluginError, match="has a bias"):
        plugins.hook.after_model_load(config=config, model=phi, run=None)
