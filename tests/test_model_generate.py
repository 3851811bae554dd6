"""ftcore generate / chat from the pretrained model, an adapter output and its merged model."""

import shutil

import pytest
import torch
from click.testing import CliRunner
from ftcore.cli import cli
from ftcore.config import validate_config
from ftcore.generate import Sampling, generate, load_for_inference
from ftcore.merge import merge_lora
from ftcore.model import load_model_and_tokenizer, save_pretrained
from ftcore.testing import stories_model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A DoRA adapter (with the chatml template and its tokens) whose weights moved off their init."""
    folder = tmp_path_factory.mktemp("generate")
    raw = {
        "model": {
            "base": str(stories_model()),
            "chat_template": "chatml",
            "special_tokens": ["<|im_start|>", "<|im_end|>"],
        },
        "adapter": {"kind": "dora", "r": 4},
        "train": {"output_dir": str(folder / "o")},
    }
    config, plugins = validate_config(raw)
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    save_pretrained(model, tokenizer, folder / "adapter")
    merge_lora(folder / "adapter", log=lambda _: None)
    return folder / "adapter"


def ftcore(*args, input=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    return result.exit_code, result.output


def test_generate_continues_a_story_from_the_pretrained_model():
    code, output = ftcore(
        "generate",
        stories_model(),
        "--prompt",
        "Once upon a time",
        "--temperature",
        0,
        "--max-new-tokens",
        30,
    )
    assert code == 0, output
    assert "Lily" in output


def test_generate_from_adapter_and_merged_outputs_agree(adapter_dir):
    greedy = ["--prompt", "Tell me a story.", "--temperature", "0", "--max-new-tokens", "16"]
    code, from_adapter = ftcore("generate", adapter_dir, *greedy)
    assert code == 0, from_adapter
    code, from_merged = ftcore("generate", adapter_dir / "merged", *greedy)
    assert code == 0, from_merged
    assert from_adapter.strip() and from_adapter == from_merged
    _, from_base = ftcore("generate", stories_model(), "--chat-template", "chatml", *greedy)
    assert from_base != from_adapter  # the adapter changed the model


def test_sampling_follows_the_seed(adapter_dir):
    model, tokenizer = load_for_inference(str(adapter_dir / "merged"))
    messages = [{"role": "user", "content": "Tell me a story."}]
    first = generate(
        model, tokenizer, messages, Sampling(max_new_tokens=12, temperature=1.0, top_k=50, seed=3)
    )
    again = generate(
        model, tokenizer, messages, Sampling(max_new_tokens=12, temperature=1.0, top_k=50, seed=3)
    )
    other = generate(
        model, tokenizer, messages, Sampling(max_new_tokens=12, temperature=1.0, top_k=50, seed=4)
    )
    assert first == again and first != other


def test_chat_keeps_the_conversation_and_resets():
    model, tokenizer = load_for_inference(str(stories_model()), chat_template="chatml")
    greedy = Sampling(max_new_tokens=12, temperature=0)
    hi, question = {"role": "user", "content": "Hi"}, {"role": "user", "content": "Where is the dog?"}
    first = generate(model, tokenizer, [hi], greedy)
    with_history = generate(model, tokenizer, [hi, {"role": "assistant", "content": first}, question], greedy)
    fresh = generate(model, tokenizer, [question], greedy)
    assert with_history != fresh  # the check below can tell them apart
    code, output = ftcore(
        "chat", stories_model(), "--chat-template", "chatml", "--temperature", 0, "--max-new-tokens", 12,
        input="Hi\nWhere is the dog?\n/reset\n\nWhere is the dog?\n/exit\nnever read\n",
    )  # fmt: skip
    assert code == 0, output
    replies = [part.strip() for part in output.split(">>> ")]
    assert replies == ["", first, with_history, "", "", fresh, ""]


def test_generate_and_chat_errors_are_clear(tmp_path):
    code, output = ftcore("chat", stories_model(), input="hi\n")
    assert code == 2 and "has no chat template: pass --chat-template" in output
    code, output = ftcore("generate", tmp_path / "nothing", "--prompt", "x")
    assert code == 2 and "nothing: no such model folder (and not a Hugging Face hub id)" in output
    (tmp_path / "empty").mkdir()
    code, output = ftcore("generate", tmp_path / "empty", "--prompt", "x")
    assert code == 2 and "holds no model (config.json) or adapter" in output
    shutil.copytree(stories_model(), tmp_path / "run" / "checkpoints" / "step-000010")
    code, output = ftcore("generate", tmp_path / "run", "--prompt", "x")
    assert code == 2 and "a checkpoint is a model too: " in output and "step-000010" in output
    code, output = ftcore("generate", stories_model(), "--prompt", "x", "--chat-template", "chatlm")
    assert code == 2 and 'did you mean "chatml"' in output
