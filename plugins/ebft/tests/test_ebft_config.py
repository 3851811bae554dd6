"""The [ebft] table: defaults, every range, cross-table errors that name the file, key and fix; light imports."""

import subprocess
import sys

import pytest
from ftcore.config import load_config, validate_config
from ftcore.errors import ConfigError


def raw(mode="strided", plugins=("ebft",), **ebft):
    return {
        "plugins": list(plugins),
        "model": {"base": "some/model"},
        "datasets": [
            {"path": "rows.jsonl", "format": "ebft_strided" if mode == "strided" else "ebft_opencode"}
        ],
        "train": {"method": "ebft", "output_dir": "out", "sequence_len": 64},
        "ebft": {"mode": mode, **ebft},
    }


def error(config) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return info.value


def test_defaults_follow_the_paper_settings():
    config, _ = validate_config(raw())
    ebft = config.ebft
    assert ebft.feature_layers == [0.25, 0.5, 0.75] and ebft.embed_method == "last_token"
    assert (ebft.alignment_coef, ebft.diversity_coef, ebft.ce_coef, ebft.rl_coef) == (1.0, 1.0, 0.0, 1.0)
    assert (ebft.stride, ebft.context_length, ebft.generate_max_len, ebft.n_samples_per_prompt) == (
        8,
        8,
        8,
        4,
    )
    assert (ebft.temperature, ebft.advantage_estimator, ebft.gt_length_multiplier) == (0.6, "rloo", 1.5)
    assert validate_config(structured())[0].ebft.mode == "structured"


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("feature_layers", [], "at least one"),
        ("feature_layers", [0.5, 1.5], "(0, 1]"),
        ("feature_layers", [0.5, 0.5], "twice"),
        ("embed_method", "max", "last_token"),
        ("stride", 0, "greater than or equal to 1"),
        ("context_length", 0, "greater than or equal to 1"),
        ("generate_max_len", 0, "greater than or equal to 1"),
        ("n_samples_per_prompt", 0, "greater than or equal to 1"),
        ("gt_length_multiplier", 0.05, "greater than or equal to 0.1"),
        ("temperature", 0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("advantage_estimator", "ppo", "rloo"),
        ("alignment_coef", -1, "greater than or equal to 0"),
        ("ce_coef", -0.1, "greater than or equal to 0"),
        ("anchor_offset", -1, "greater than or equal to 0"),
        ("strid", 4, 'did you mean "stride"'),
    ],
)
def test_bad_values_are_errors_naming_the_key(key, value, words):
    message = str(error(raw(**{key: value})))
    assert f"ebft.{key}" in message and words in message


@pytest.mark.parametrize(
    "config, key, words",
    [
        (raw(mode="structured"), "plugins", 'plugins = ["grpo", "ebft"]'),
        (raw(generate_max_len=64), "ebft.generate_max_len", "below train.sequence_len"),
        (raw(anchor_offset=60), "ebft.anchor_offset", "no anchor fits"),
        (raw(alignment_coef=0, diversity_coef=0), "ebft.alignment_coef", "the reward is 0"),
    ],
)
def test_cross_table_errors_name_the_key_and_the_fix(config, key, words):
    exc = error(config)
    assert exc.key == key and words in exc.message


def structured(**tables):
    config = raw(mode="structured", plugins=("grpo", "ebft"))
    config["train"]["micro_batch_size"] = 8
    config["grpo"] = {"max_completion_length": 32}
    for table, values in tables.items():
        config.setdefault(table, {}).update(values)
    return config


@pytest.mark.parametrize(
    "tables, key, words",
    [
        ({"grpo": {"rewards": ["gsm8k_accuracy"]}}, "grpo.rewards", "remove grpo.rewards"),
        ({"grpo": {"reward_workers": 2}}, "grpo.reward_workers", "reward_workers = 0"),
        ({"grpo": {"async_prefetch": True}}, "grpo.async_prefetch", "remove grpo.async_prefetch"),
        ({"grpo": {"streaming_groups": 1}}, "grpo.streaming_groups", "remove grpo.streaming_groups"),
        ({"ebft": {"ce_coef": 0.1}}, "ebft.ce_coef", "strided mode"),
        ({"grpo": {"num_generations": 3}}, "grpo.num_generations", "must divide"),
        ({"grpo": {"max_completion_length": 64}}, "grpo.max_completion_length", "no room"),
        ({"train": {"packing": True}}, "train.packing", "packing = false"),
        ({"model": {"attention": "varlen"}, "ebft": {"mode": "strided"}}, "model.attention", "block mask"),
        ({"model": {"compile": True}, "ebft": {"mode": "strided"}}, "model.compile", "compile = false"),
        (
            {"data": {"val_fraction": 0.1}, "ebft": {"mode": "strided"}},
            "data.val_fraction",
            "no evaluation pass",
        ),
    ],
)
def test_structured_mode_checks_its_grpo_settings(tables, key, words):
    exc = error(structured(**tables))
    assert exc.key == key and words in exc.message


def test_a_config_file_error_names_the_file(tmp_path):
    path = tmp_path / "ebft.toml"
    path.write_text(
        'plugins = ["ebft"]\n[model]\nbase = "m"\n[[datasets]]\npath = "rows.jsonl"\nformat = "ebft_opencode"\n'
        '[train]\nmethod = "ebft"\noutput_dir = "out"\n[ebft]\nmode = "structured"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "plugins" in str(info.value)


def test_importing_the_plugin_config_and_method_imports_no_torch():
    code = (
        "import sys, ftcore_ebft.plugin, ftcore_ebft.config, ftcore_ebft.method, ftcore_ebft.formats\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_multi_turn_chat_rows_need_the_first_turn_as_target():
    from ftcore.data.prepare import dataset_specs

    config = raw("structured", plugins=("grpo", "ebft"))
    config["datasets"] = [{"path": "rows.jsonl", "format": "ebft_chat", "options": {"multi_turn": True}}]
    config["train"]["micro_batch_size"] = 8
    config["grpo"] = {"max_completion_length": 32}
    config, plugins = validate_config(config)
    with pytest.raises(ConfigError) as info:
        dataset_specs(config, plugins, ("prompt_only",))
    assert info.value.key == "datasets.0.options"
    assert str(info.value).endswith(
        "option 'multi_turn': Value error, multi_turn = true rolls out from the first assistant turn: "
        'set target = "first" (got True)'
    )
    config.datasets[0].options["target"] = "first"
    assert dataset_specs(config, plugins, ("prompt_only",))[0].format.options.multi_turn
