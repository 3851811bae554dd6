"""A dataset with ``eval = true`` only evaluates: its rows form (part of) the eval set, never train rows."""

import pytest
from ftcore.data import load_rows, prepare_sft_data
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.errors import ConfigError
from ftcore.testing import asset

ALPACA = str(asset("data/instructions/instructions_2000.jsonl"))


def test_an_eval_dataset_is_held_out_whole(tmp_path):
    sources = [
        {"path": ALPACA, "format": "alpaca", "split": "train[:60]"},
        {"path": ALPACA, "format": "alpaca", "split": "train[100:110]", "eval": True},
    ]
    config, plugins = data_config(tmp_path, sources, data={"shuffle": False})
    train, evaluation = load_rows(config, plugins, ("messages",))
    assert len(train) == 60 and len(evaluation) == 10
    assert not {str(m) for m in evaluation["messages"]} & {str(m) for m in train["messages"]}
    bundle = prepare_sft_data(
        config, plugins, stories_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    )
    assert len(bundle.eval) == 10 and len(bundle.train) == 60


def test_eval_steps_accepts_an_eval_dataset_and_training_needs_one_other(tmp_path):
    sources = [{"path": ALPACA, "format": "alpaca", "eval": True}]
    with pytest.raises(ConfigError, match="nothing is left to train on"):
        data_config(tmp_path, sources)
    sources.insert(0, {"path": ALPACA, "format": "alpaca"})
    config, _ = data_config(tmp_path, sources, eval_steps=5)
    assert config.train.eval_steps == 5
