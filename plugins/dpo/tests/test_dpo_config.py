"""The [dpo] table, its cross-table checks, and enabling the plugin (no training here)."""

import re
import subprocess
import sys

import pytest
from ftcore.config import validate_config
from ftcore.errors import ConfigError
from ftcore_dpo.plugin import LOSS_TYPES


def raw_config(**dpo):
    return {
        "plugins": ["dpo"],
        "model": {"base": "/models/any"},
        "datasets": [{"path": "/data/pairs.jsonl", "format": "preference"}],
        "train": {"method": "dpo", "output_dir": "/out", "sequence_len": 128},
        "dpo": dpo,
    }


def config_error(raw) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw, source="run.toml")
    return caught.value


def test_loss_types_are_the_installed_trls():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", help_text))


def test_defaults_and_a_single_loss_type_string():
    config, plugins = validate_config(raw_config(loss_type="ipo"))
    assert config.dpo.loss_type == ["ipo"]
    assert config.dpo.beta == 0.1 and config.dpo.precompute_ref_log_probs is False
    assert plugins.registry("method").owner("dpo") == "dpo"
    assert {"preference", "hh_rlhf"} <= set(plugins.registry("format").names())


def test_unknown_loss_type_lists_the_valid_ones():
    error = config_error(raw_config(loss_type=["sigmoid", "sigmod_norm"]))
    assert error.key == "dpo.loss_type" and error.file == "run.toml"
    assert 'did you mean "sigmoid_norm"' in str(error)
    assert all(name in str(error) for name in LOSS_TYPES)


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"train": {"packing": True}}, "train.packing", "packing = false"),
        ({"dpo": {"loss_type": ["ipo"], "label_smoothing": 0.1}}, "dpo.label_smoothing", "ipo"),
        (
            {"dpo": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}},
            "dpo.loss_weights",
            "1 weights for 2",
        ),
        ({"dpo": {"loss_type": ["exo_pair"]}}, "dpo.label_smoothing", "exo_pair"),
        (
            {"dpo": {"loss_type": ["bco_pair"], "f_divergence_type": "js_divergence"}},
            "dpo.f_divergence_type",
            "bco_pair",
        ),
        ({"dpo": {"max_prompt_length": 128}}, "dpo.max_prompt_length", "no room"),
    ],
)
def test_cross_table_errors(change, key, words):
    raw = raw_config()
    for table, values in change.items():
        raw[table].update(values)
    error = config_error(raw)
    assert error.key == key and words in str(error)


def test_no_dpo_checks_for_other_methods():
    raw = raw_config(loss_type=["ipo"], label_smoothing=0.1)
    raw["train"].update(method="sft", packing=True)
    raw["datasets"][0]["format"] = "messages"
    config, _ = validate_config(raw)
    assert config.train.packing


def test_unknown_dpo_key_suggests_the_right_one():
    error = config_error(raw_config(betta=0.2))
    assert "did you mean" in str(error) and "beta" in str(error)


def test_method_dpo_without_the_plugin_says_which_plugin_to_enable(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nbase = "/models/any"\n[[datasets]]\npath = "/data/p.jsonl"\nformat = "messages"\n'
        '[train]\nmethod = "dpo"\noutput_dir = "out"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ftcore.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert 'method "dpo" is provided by the plugin "dpo", which is not enabled' in proc.stderr
    assert 'plugins = ["dpo"]' in proc.stderr and "train.method" in proc.stderr


def test_dpo_table_without_the_plugin_says_to_enable_it():
    raw = raw_config()
    raw["plugins"] = []
    error = config_error(raw)
    assert 'plugins = ["dpo"]' in str(error) and error.key == "dpo"


def test_plugin_module_imports_no_torch_or_trl():
    code = "import sys, ftcore_dpo.plugin; print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
