"""The data fingerprint and cache (hits and misses), and ``ftcore preprocess``."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from ftcore.cli import cli
from ftcore.data import prepare_sft_data
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.testing import asset, stories_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def alpaca_copy(tmp_path, rows=40):
    path = tmp_path / "alpaca.jsonl"
    with open(asset("data/instructions/instructions_2000.jsonl"), encoding="utf-8") as lines:
        path.write_text("".join(next(lines) for _ in range(rows)))
    return path


def bundle(tmp_path, path, tokenizer, *, data=None, **train):
    config, plugins = data_config(tmp_path, [{"path": str(path), "format": "alpaca"}], data=data, **train)
    return prepare_sft_data(config, plugins, tokenizer)


def test_cache_hits_and_misses(tmp_path):
    path, tokenizer = alpaca_copy(tmp_path), stories_tokenizer(CHATML)
    first = bundle(tmp_path, path, tokenizer)
    assert (
        first.stats["cache"] == "miss" and (tmp_path / "cache" / first.fingerprint / "stats.json").is_file()
    )
    again = bundle(tmp_path, path, tokenizer)
    assert again.stats["cache"] == "hit" and again.fingerprint == first.fingerprint
    assert (
        again.train["input_ids"] == first.train["input_ids"]
        and again.train["labels"] == first.train["labels"]
    )
    # where the output goes, how many processes tokenize, and where the file lies do not change the tokens
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(path, moved)
    config, plugins = data_config(
        tmp_path,
        [{"path": str(moved), "format": "alpaca"}],
        data={"num_proc": 2},
        output_dir=str(tmp_path / "other"),
    )
    assert prepare_sft_data(config, plugins, tokenizer).stats["cache"] == "hit"
    # what changes the tokens is a miss
    changed = {
        "sequence_len": bundle(tmp_path, path, tokenizer, sequence_len=512),
        "packing": bundle(tmp_path, path, tokenizer, packing=True),
        "train_on": bundle(tmp_path, path, tokenizer, data={"train_on": ["user", "assistant"]}),
        "template": bundle(
            tmp_path, path, stories_tokenizer(CHATML.replace("\n{{ m.content }}", "\n\n{{ m.content }}"))
        ),
        "special tokens": bundle(tmp_path, path, stories_tokenizer(CHATML, ("<|im_start|>", "<|im_end|>"))),
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"}) + "\n")
    changed["content"] = bundle(tmp_path, path, tokenizer)
    fingerprints = {first.fingerprint} | {b.fingerprint for b in changed.values()}
    assert len(fingerprints) == 1 + len(changed)
    assert all(b.stats["cache"] == "miss" for b in changed.values())
    assert changed["content"].stats["sequences"] == first.stats["sequences"] + 1


def test_an_incomplete_cache_folder_is_rebuilt(tmp_path):
    path, tokenizer = alpaca_copy(tmp_path, 10), stories_tokenizer(CHATML)
    first = bundle(tmp_path, path, tokenizer)
    (tmp_path / "cache" / first.fingerprint / "stats.json").unlink()
    again = bundle(tmp_path, path, tokenizer)
    assert again.stats["cache"] == "miss" and again.train["input_ids"] == first.train["input_ids"]


def write_config(tmp_path, path, **dataset):
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
base = "{stories_model()}"
chat_template = "chatml"

[[datasets]]
path = "{path}"
format = "alpaca"
{"".join(f'{k} = "{v}"' + chr(10) for k, v in dataset.items())}
[data]
cache_dir = "cache"

[train]
output_dir = "out"
sequence_len = 1024
packing = true
""")
    return config


def test_preprocess_command_shows_samples_and_a_summary(tmp_path):
    config = write_config(tmp_path, alpaca_copy(tmp_path))
    result = CliRunner().invoke(cli, ["preprocess", str(config), "--show", "2"])
    assert result.exit_code == 0, result.output
    assert (
        result.output.count("=== sample") == 2
        and "--- sequence 2 (position_ids restart) ---" in result.output
    )
    assert "<|im_start|>assistant\n[[" in result.output and "<|im_end|>]]" in result.output
    assert "cache miss" in result.output and "rows " in result.output and "packing " in result.output
    assert "sequences packed" in result.output and "40 sequences" in result.output.replace(",", "")
    result = CliRunner().invoke(cli, ["preprocess", str(config)])
    assert result.exit_code == 0 and "cache hit" in result.output and "=== sample" not in result.output


def test_preprocess_reports_bad_rows_as_user_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n{"instruction": "Hi"}\n')
    result = CliRunner().invoke(cli, ["preprocess", str(write_config(tmp_path, path))])
    assert result.exit_code == 2
    assert "bad.jsonl, row 2: missing value for 'output'" in result.output
    result = CliRunner().invoke(cli, ["preprocess", str(write_config(tmp_path, path, on_bad_rows="skip"))])
    assert result.exit_code == 0 and "skipped          1 bad rows" in result.output


SHOUT_PLUGIN = """
from ftcore.data.formats import RowFormat
from ftcore.hookspecs import hookimpl


class Shout(RowFormat):
    schema = "prompt_completion"
    fields = ("prompt", "completion")

    def convert(self, row):
        return {"prompt": row["prompt"], "completion": row["completion"].upper()}


@hookimpl
def register_formats(register):
    register("shout", "shoutpkg.plugin:Shout")
"""


def test_editing_a_format_s_code_changes_the_fingerprint(tmp_path, monkeypatch):
    """An editable install keeps its version while its code changes: the format's source file counts."""
    from ftcore.config import validate_config
    from ftcore.data.cache import data_fingerprint
    from ftcore.data.prepare import dataset_specs

    (tmp_path / "shoutpkg").mkdir()
    (tmp_path / "shoutpkg" / "__init__.py").write_text("")
    module = tmp_path / "shoutpkg" / "plugin.py"
    module.write_text(SHOUT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Say hi: ", "completion": "hi"}) + "\n")
    raw = {
        "plugins": ["shoutpkg.plugin"],
        "model": {"base": str(stories_model())},
        "datasets": [{"path": str(rows), "format": "shout"}],
        "train": {"output_dir": str(tmp_path / "out")},
    }
    config, plugins = validate_config(raw, base_dir=tmp_path)
    tokenizer = stories_tokenizer()

    def fingerprint():
        return data_fingerprint(
            config, dataset_specs(config, plugins, ("prompt_completion",)), plugins, tokenizer
        )

    before = fingerprint()
    assert fingerprint() == before
    module.write_text(SHOUT_PLUGIN.replace(".upper()", ".lower()"))
    assert fingerprint() != before


MODEL_LOADING = (
    "torch",  # the stories260K tokenizer is generic: loaded without AutoTokenizer, whose module imports torch
    "transformers.modeling_utils",
    "transformers.trainer",
    "transformers.conversion_mapping",
    "transformers.core_model_loading",
    "transformers.integrations.finegrained_fp8",
    "torch.distributed.tensor",
    "torch._dynamo",
    "accelerate",
    "peft",
    "trl",
)


def test_preprocess_imports_no_model_loading_code(tmp_path):
    config = write_config(tmp_path, alpaca_copy(tmp_path))
    check = (
        "import sys\nfrom ftcore.cli import main\nsys.argv = ['ftcore', 'preprocess', sys.argv[1]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        f"print('LOADED=' + ','.join(m for m in {MODEL_LOADING!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", check, str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cache miss" in result.stdout and result.stdout.strip().endswith("LOADED="), result.stdout[-300:]


@pytest.mark.parametrize(
    "model_type, tokenizer_class",
    [("llama", "PreTrainedTokenizerFast"), ("llama", "LlamaTokenizerFast"), ("llama", None),
     ("qwen3", "Qwen2TokenizerFast"), ("mistral", "LlamaTokenizer"), ("gpt2", "GPT2TokenizerFast"),
     ("llama", "TokenizersBackend"), ("qwen2", "PreTrainedTokenizerFast"), ("qwen2_moe", "PreTrainedTokenizerFast"),
     ("qwen3", "PreTrainedTokenizerFast"), ("qwen3_moe", "TokenizersBackend"), ("phi3", "PreTrainedTokenizerFast")],
)  # fmt: skip
def test_tokenizer_loads_as_with_the_real_model_config(tmp_path, model_type, tokenizer_class):
    """``load_tokenizer`` hands AutoTokenizer a stand-in for the model config, or loads a generic
    tokenizer directly: the same tokenizer results as AutoTokenizer with the real config."""
    from ftcore.data.cache import tokenizer_digest
    from ftcore.model import (
        GENERIC_TOKENIZER_CLASSES,
        GENERIC_TOKENIZER_MODEL_TYPES,
        config_stand_in,
        generic_tokenizer_folder,
        load_tokenizer,
    )
    from transformers import AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    folder = tmp_path / "model"
    shutil.copytree(stories_model(), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class")
    if tokenizer_class:
        settings["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    model_config = json.loads((folder / "config.json").read_text()) | {"model_type": model_type}
    (folder / "config.json").write_text(json.dumps(model_config))
    config, _ = data_config(tmp_path, [])
    config.model.base = str(folder)
    assert type(config_stand_in(str(folder), config.model)).__name__ == CONFIG_MAPPING_NAMES[model_type]
    direct = model_type in GENERIC_TOKENIZER_MODEL_TYPES and tokenizer_class in GENERIC_TOKENIZER_CLASSES
    assert (
        generic_tokenizer_folder(str(folder), config.model) is direct
    )  # TokenizersBackend without AutoTokenizer
    expected = AutoTokenizer.from_pretrained(folder)
    expected.pad_token = expected.eos_token
    loaded = load_tokenizer(config)
    assert type(loaded) is type(expected)
    assert tokenizer_digest(loaded) == tokenizer_digest(expected)
    text = "Once upon a time, <s> there was a cat.</s>"
    assert loaded(text)["input_ids"] == expected(text)["input_ids"]
