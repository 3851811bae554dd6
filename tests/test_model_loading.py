"""[model]: loading the real stories260K model and tiny configs through the model hooks, tokenizer setup."""

import pytest
import torch
from ftcore.chat_templates import TEMPLATES
from ftcore.config import validate_config
from ftcore.errors import ConfigError
from ftcore.hookspecs import hookimpl
from ftcore.model import load_model_and_tokenizer, load_tokenizer
from ftcore.testing import stories_model
from transformers import AutoConfig

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def make_config(tmp_path, model=None, adapter=None, **tables):
    raw = {
        "model": {"base": str(stories_model()), **(model or {})},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    if adapter is not None:
        raw["adapter"] = adapter
    return validate_config({**raw, **tables}, base_dir=tmp_path)


def story_loss(model, tokenizer) -> float:
    batch = tokenizer(STORY, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, labels=batch["input_ids"]).loss.item()


def test_pretrained_stories_loads_and_knows_its_stories(tmp_path):
    config, plugins = make_config(tmp_path)
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    assert model.name_or_path == str(stories_model())
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert story_loss(model, tokenizer) < 2.0
    prompt = tokenizer("Once upon a time", return_tensors="pt")
    text = tokenizer.decode(
        model.generate(**prompt, max_new_tokens=20, do_sample=False)[0], skip_special_tokens=True
    )
    assert "Lily" in text


def test_random_init_builds_the_architecture_without_the_weights(tmp_path):
    config, plugins = make_config(
        tmp_path, model={"init": "random", "dtype": "bfloat16", "attention": "eager"}
    )
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    assert model.config.num_hidden_layers == 5 and model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert story_loss(model.float(), tokenizer) > 5.0  # near log(512) = 6.2: knows nothing


def test_missing_local_base_is_an_error_naming_the_path(tmp_path):
    config, plugins = make_config(tmp_path, model={"base": "./no-such-model"})
    with pytest.raises(ConfigError, match=f"{tmp_path}/no-such-model is not a folder.*never looked up"):
        load_model_and_tokenizer(config, plugins)
    config, _ = make_config(tmp_path, model={"tokenizer": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match="model.tokenizer: .*gone is not a folder"):
        load_tokenizer(config)


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    config, plugins = make_config(tmp_path, model={"base": "empty"})
    with pytest.raises(ConfigError, match="model.base: cannot load .*empty.* as a folder"):
        load_model_and_tokenizer(config, plugins)


def test_chat_template_by_name_inline_and_jinja_file(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    config, _ = make_config(tmp_path, model={"chat_template": "chatml"})
    tokenizer = load_tokenizer(config)
    assert tokenizer.chat_template == TEMPLATES["chatml"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    mask = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    trained = [t for t, m in zip(mask["input_ids"], mask["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "hello<|im_end|>"

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    config, _ = make_config(tmp_path, model={"chat_template": "templates/mine.jinja"})
    assert config.model.chat_template == str(tmp_path / "templates" / "mine.jinja")
    assert load_tokenizer(config).apply_chat_template(messages, tokenize=False) == "[hi][hello]"

    config, _ = make_config(tmp_path, model={"chat_template": "{{ messages[0]['content'] }}!"})
    assert load_tokenizer(config).apply_chat_template(messages, tokenize=False) == "hi!"


def test_unknown_template_name_and_missing_file_are_errors(tmp_path):
    config, _ = make_config(tmp_path, model={"chat_template": "chatlm"})
    with pytest.raises(
        ConfigError, match='model.chat_template: unknown chat template .*did you mean "chatml"'
    ):
        load_tokenizer(config)
    config, _ = make_config(tmp_path, model={"chat_template": "nope.jinja"})
    with pytest.raises(ConfigError, match="cannot read the chat template file"):
        load_tokenizer(config)


def test_special_tokens_and_pad_token_resize_the_embeddings(tmp_path):
    model_table = {"special_tokens": ["<|im_start|>", "<|im_end|>"], "pad_token": "<pad>"}
    config, plugins = make_config(tmp_path, model=model_table)
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    assert len(tokenizer) == 515
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<pad>"]) == [512, 513, 514]
    assert tokenizer.tokenize("<|im_start|>hi")[0] == "<|im_start|>"  # one special token, not split
    assert (
        model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 515
    )
    assert model.config.vocab_size == 515 and model.config.pad_token_id == 514
    assert story_loss(model, tokenizer) < 2.0  # the old rows are untouched


def test_model_hooks_run_in_order_and_can_change_the_load(tmp_path):
    calls = []

    class Recorder:
        @hookimpl
        def before_model_load(self, config, model_config):
            calls.append(("before_model_load", model_config.model_type))

        @hookimpl
        def model_load_kwargs(self, config, kwargs):
            calls.append(("model_load_kwargs", kwargs["attn_implementation"], kwargs["trust_remote_code"]))
            kwargs["attn_implementation"] = "eager"

        @hookimpl
        def patch_model(self, config, model):
            calls.append(("patch_model", type(model).__name__))

        @hookimpl
        def after_model_load(self, config, model):
            calls.append(("after_model_load", type(model).__name__))

    config, plugins = make_config(tmp_path, adapter={"r": 2, "targets": ["q_proj"]})
    plugins.pm.register(Recorder())
    model, _ = load_model_and_tokenizer(config, plugins)
    assert calls == [
        ("before_model_load", "llama"),
        ("model_load_kwargs", "sdpa", False),
        ("patch_model", "LlamaForCausalLM"),
        ("after_model_load", "PeftModelForCausalLM"),
    ]
    assert model.get_base_model().config._attn_implementation == "eager"


def test_a_plugin_loader_replaces_the_built_in_one(tmp_path):
    from ftcore.testing import tiny_model

    class Loader:
        @hookimpl
        def load_model(self, config, kwargs):
            return tiny_model("qwen3")

    config, plugins = make_config(tmp_path)
    plugins.pm.register(Loader())
    model, _ = load_model_and_tokenizer(config, plugins)
    assert model.config.model_type == "qwen3"


def test_gradient_checkpointing_with_reentrant_choice_trains_an_adapter(tmp_path):
    for reentrant in (False, True):
        config, plugins = make_config(
            tmp_path, model={"gradient_checkpointing": True, "use_reentrant": reentrant}, adapter={"r": 2}
        )
        model, tokenizer = load_model_and_tokenizer(config, plugins)
        assert model.get_base_model().is_activation_checkpointing and model.config.use_cache is False
        model.train()
        batch = tokenizer(STORY, return_tensors="pt")
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_config_checks_of_model_and_adapter(tmp_path):
    with pytest.raises(ConfigError, match='adapter: init = "random" with an \\[adapter\\]'):
        make_config(tmp_path, model={"init": "random"}, adapter={})
    with pytest.raises(ConfigError, match="adapter.target_parameters: .*dropout"):
        make_config(tmp_path, adapter={"target_parameters": ["experts.gate_up_proj"], "dropout": 0.1})
    with pytest.raises(ConfigError, match="adapter.targets: targets = \\[\\] leaves nothing to train"):
        make_config(tmp_path, adapter={"targets": []})
    with pytest.raises(ConfigError, match="model.attention: .*flash-attn"):
        make_config(tmp_path, model={"attention": "flash_attention_2"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_qlora_without_cuda_is_a_clear_error_at_load_not_at_validate(tmp_path):
    from ftcore.model import qlora_kwargs

    config, _ = make_config(tmp_path, adapter={"kind": "qlora"})  # a GPU config validates anywhere
    with pytest.raises(ConfigError, match='adapter.kind: kind = "qlora" .*needs a CUDA GPU'):
        qlora_kwargs(config, torch.bfloat16)


def test_model_config_is_read_before_any_weights(tmp_path):
    seen = []

    class Peek:
        @hookimpl
        def before_model_load(self, config, model_config):
            seen.append(type(model_config))
            model_config.attention_dropout = 0.25  # a plugin may adjust the config before the build

    config, plugins = make_config(tmp_path)
    plugins.pm.register(Peek())
    model, _ = load_model_and_tokenizer(config, plugins)
    assert seen == [type(AutoConfig.from_pretrained(stories_model()))]
    assert model.config.attention_dropout == 0.25
