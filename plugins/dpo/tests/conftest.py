"""Shared pieces of the dpo tests: the real hh-rlhf subset, a chat preference set built here, configs."""

import json
from pathlib import Path

import pytest
from ftcore.testing import asset, stories_model

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bunny", "duck", "bear"]
PLACES = ["park", "garden", "house", "forest"]


def hh_rlhf_path() -> Path:
    return asset("data/hh_rlhf_harmless/harmless_base_test_subset.jsonl")


def chat_pairs() -> list[dict]:
    """Message-list preference rows (system and tool roles included): a story beats word salad."""
    rows = []
    for i, (animal, place) in enumerate((a, p) for a in ANIMALS for p in PLACES):
        if i % 4 == 3:
            prompt = [
                {"role": "user", "content": f"The {animal}?"},
                {"role": "assistant", "content": "Look."},
                {"role": "tool", "content": place},
            ]
        else:
            prompt = [
                {"role": "system", "content": "Tell stories."},
                {"role": "user", "content": f"The {animal} in the {place}."},
            ]
        chosen = f"The {animal} was happy in the {place}."
        rejected = f"{place} the {animal} {animal} was the."
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})  # fmt: skip
    return rows


@pytest.fixture
def chat_pairs_file(tmp_path) -> Path:
    path = tmp_path / "chat_pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_pairs()))
    return path


@pytest.fixture
def make_config(tmp_path):
    """Write a config for stories260K with the given [[datasets]] and extra tables; return its path."""

    def make(
        datasets: str, *, train: str = "", extra: str = "", adapter=True, chat_template=True, name="run.toml"
    ):
        model = f'base = "{stories_model()}"\ndtype = "float32"\n' + (
            'chat_template = "chatml"\n' if chat_template else ""
        )
        lora = "[adapter]\nr = 8\nalpha = 16" if adapter else ""
        path = tmp_path / name
        path.write_text(f"""
plugins = ["dpo"]
[model]
{model}
{lora}
{datasets}
[data]
cache_dir = "{tmp_path / "cache"}"
[train]
method = "dpo"
output_dir = "out"
sequence_len = 128
micro_batch_size = 4
learning_rate = 2e-3
logging_steps = 1
seed = 0
{train}
{extra}
""")
        return path

    return make


@pytest.fixture
def hh_dataset():
    """A [[datasets]] entry of the real hh-rlhf file (a fixed slice; long pairs handled by excess_length)."""

    def entry(split: str = "train[:400]", excess_length: str = "drop") -> str:
        return f'[[datasets]]\npath = "{hh_rlhf_path()}"\nformat = "hh_rlhf"\nsplit = "{split}"\nexcess_length = "{excess_length}"\n'

    return entry


@pytest.fixture
def chat_dataset(chat_pairs_file) -> str:
    """A [[datasets]] entry of the chat preference set."""
    return f'[[datasets]]\npath = "{chat_pairs_file}"\nformat = "preference"\n'


@pytest.fixture(scope="session")
def hh_rows() -> list[dict]:
    """The real hh-rlhf harmless-base rows (603)."""
    return [json.loads(line) for line in hh_rlhf_path().read_text().splitlines()]


@pytest.fixture
def chat_rows() -> list[dict]:
    return chat_pairs()
