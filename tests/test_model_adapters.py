"""[adapter]: LoRA / DoRA through peft on real tiny architectures, target selection, expert parameters,
trained special tokens, continued training, and the saved outputs reloading with plain HF/peft."""

import json
import os
import re

import pytest
import torch
from ftcore.config import validate_config
from ftcore.errors import ConfigError
from ftcore.model import load_model_and_tokenizer, save_pretrained
from ftcore.testing import stories_model
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

CHAT = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\nOnce upon a time, Lily ran.<|im_end|>\n"


@pytest.fixture
def tiny_base(ftcore_tiny_model_dir):
    """A tiny random-init model folder of an architecture (with the stories tokenizer): ftcore.testing's."""
    return ftcore_tiny_model_dir


def load(tmp_path, base, adapter, **model):
    raw = {
        "model": {"base": str(base), **model},
        "adapter": adapter,
        "train": {"output_dir": str(tmp_path / "o")},
    }
    config, plugins = validate_config(raw, base_dir=tmp_path)
    return load_model_and_tokenizer(config, plugins)


def adapted(model) -> set[str]:
    """Names (without the peft prefix) of the modules that carry LoRA weights."""
    return {
        re.sub(r"^base_model\.model\.", "", n)
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and m.lora_A
    }


def train_step(model, tokenizer, text=CHAT, lr=0.5):
    model.train()
    batch = tokenizer(text, return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return loss.item()


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_targets_by_names_regex_and_all_linear(tmp_path, tiny_base, architecture):
    base = tiny_base(architecture)
    layers = range(2)
    model, _ = load(tmp_path, base, {"r": 2, "targets": ["q_proj", "v_proj"]})
    assert adapted(model) == {f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "v_proj")}
    model, _ = load(tmp_path, base, {"r": 2, "targets": r".*\.mlp\.(gate|up)_proj"})
    assert adapted(model) == {f"model.layers.{i}.mlp.{p}" for i in layers for p in ("gate_proj", "up_proj")}
    model, _ = load(tmp_path, base, {"r": 2})
    every = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    assert adapted(model) == {f"model.layers.{i}.{p}" for i in layers for p in every}  # not lm_head
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_and_dora_on_the_pretrained_model_train(tmp_path):
    for kind in ("lora", "dora"):
        model, tokenizer = load(tmp_path, stories_model(), {"kind": kind, "r": 4, "alpha": 8})
        magnitudes = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
        assert bool(magnitudes) == (kind == "dora")
        assert model.peft_config["default"].lora_alpha == 8 and model.peft_config["default"].use_dora == (
            kind == "dora"
        )
        first = train_step(model, tokenizer, lr=0.05)
        for _ in range(3):
            last = train_step(model, tokenizer, lr=0.05)
        assert last < first


def test_lora_on_expert_parameters_of_qwen3_moe(tmp_path, tiny_base):
    adapter = {"r": 2, "targets": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    model, tokenizer = load(tmp_path, tiny_base("qwen3_moe"), adapter)
    wrappers = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}
    assert {m.parameter_name for m in model.modules() if type(m).__name__ == "ParamWrapper"} == {
        "gate_up_proj",
        "down_proj",
    }
    assert len(wrappers) == 4  # two layers, one wrapper per parameter (nested)
    assert not any("self_attn" in name for name in adapted(model))
    experts = model.get_base_model().model.layers[0].mlp.experts.get_base_layer()
    before = experts.gate_up_proj.detach().clone()
    train_step(model, tokenizer)
    grads_ok = [p for n, p in model.named_parameters() if "lora_" in n]
    assert grads_ok and all(p.requires_grad for p in grads_ok)
    assert torch.equal(experts.gate_up_proj, before)  # the base stays frozen; the delta lives in LoRA
    model, _ = load(tmp_path, tiny_base("qwen3_moe"), {**adapter, "targets": ["q_proj"]})
    assert adapted(model) >= {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


def test_wrong_targets_are_clear_errors(tmp_path, tiny_base):
    base = tiny_base("qwen3_moe")
    with pytest.raises(
        ConfigError, match='adapter.targets: no module is named .q_prj. \\(did you mean "q_proj"\\?\\)'
    ):
        load(tmp_path, base, {"targets": ["q_proj", "q_prj"]})
    with pytest.raises(ConfigError, match="adapter.targets: invalid regex"):
        load(tmp_path, base, {"targets": "(q_proj"})
    with pytest.raises(
        ConfigError, match="adapter.targets: the regex 'q_proj' matches no module; it must match whole"
    ):
        load(tmp_path, base, {"targets": "q_proj"})
    with pytest.raises(ConfigError, match='adapter.target_parameters: .*did you mean "experts.gate_up_proj"'):
        load(tmp_path, base, {"targets": [], "target_parameters": ["experts.gate_upproj"]})


def test_modules_to_save_are_trained_in_full_and_saved(tmp_path):
    model, tokenizer = load(
        tmp_path, stories_model(), {"r": 2, "targets": ["q_proj"], "modules_to_save": ["lm_head"]}
    )
    assert type(model.get_base_model().lm_head).__name__ == "ModulesToSaveWrapper"
    train_step(model, tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "saved")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "saved")
    trained = model.get_base_model().lm_head.modules_to_save["default"].weight
    assert torch.equal(reloaded.get_base_model().lm_head.modules_to_save["default"].weight, trained)
    original = AutoModelForCausalLM.from_pretrained(stories_model()).lm_head.weight
    assert not torch.equal(trained, original)


def test_added_special_tokens_are_trained_under_lora_and_reload(tmp_path, monkeypatch):
    special = {"special_tokens": ["<|im_start|>", "<|im_end|>"], "chat_template": "chatml"}
    model, tokenizer = load(tmp_path, stories_model(), {"r": 4}, **special)
    embeddings = model.get_base_model().get_input_embeddings()
    old_rows = embeddings.token_adapter.base_layer.weight[:512].detach().clone()
    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    indices = model.peft_config["default"].trainable_token_indices
    assert indices == {"model.embed_tokens": new_ids, "lm_head": new_ids}
    new_rows = embeddings(torch.tensor(new_ids)).detach().clone()
    train_step(model, tokenizer)
    assert not torch.equal(embeddings(torch.tensor(new_ids)), new_rows)  # the added tokens learn
    assert torch.equal(embeddings(torch.arange(512)), old_rows)  # the rest of the vocabulary does not
    model.eval()
    batch = tokenizer(CHAT, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    save_pretrained(model, tokenizer, tmp_path / "adapter")
    monkeypatch.chdir(tmp_path.parent)  # reload from anywhere: the adapter names its base by absolute path
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(stories_model())
    assert (tmp_path / "adapter" / "chat_template.jinja").is_file()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert len(tokenizer) == 514 and tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
    with torch.no_grad():
        assert torch.allclose(reloaded(**tokenizer(CHAT, return_tensors="pt")).logits, expected, atol=1e-5)


def test_continue_training_from_an_existing_adapter(tmp_path):
    model, tokenizer = load(
        tmp_path, stories_model(), {"kind": "dora", "r": 4, "targets": ["q_proj", "o_proj"]}
    )
    train_step(model, tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "first")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model, _ = load(tmp_path, stories_model(), {"init_from": "first"})
    assert model.peft_config["default"].use_dora and model.peft_config["default"].r == 4
    continued = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert continued.keys() == trained.keys()
    assert all(torch.equal(continued[n], trained[n]) and continued[n].requires_grad for n in trained)
    with pytest.raises(ConfigError, match="adapter.r: the adapter in init_from was trained with r = 4"):
        load(tmp_path, stories_model(), {"init_from": "first", "r": 8})
    with pytest.raises(ConfigError, match="adapter.init_from: .*missing holds no peft adapter"):
        load(tmp_path, stories_model(), {"init_from": "missing"})


def test_full_fine_tune_saves_a_complete_safetensors_model(tmp_path):
    config, plugins = validate_config(
        {
            "model": {"base": str(stories_model()), "special_tokens": ["<tool>"]},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    train_step(model, tokenizer, lr=0.01)
    save_pretrained(model, tokenizer, tmp_path / "full")
    assert "model.safetensors" in os.listdir(tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert reloaded.config.vocab_size == 513
    assert all(
        torch.equal(a, b)
        for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
