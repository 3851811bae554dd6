"""The README's offline quickstart trains a model that adds single digits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ftcore.generate import Sampling, generate, load_for_inference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_answers_heldout_additions(tmp_path):
    output_dir = tmp_path / "quickstart"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftcore.cli",
            "run",
            str(EXAMPLES / "quickstart.toml"),
            "--set",
            f"train.output_dir={output_dir}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tokenizer = load_for_inference(str(output_dir))
    heldout = [
        json.loads(line)
        for line in (EXAMPLES / "quickstart" / "addition_heldout.jsonl").read_text().splitlines()
    ]
    greedy = Sampling(max_new_tokens=4, temperature=0)
    correct = [
        generate(model, tokenizer, [{"role": "user", "content": row["prompt"]}], greedy).strip()
        == row["answer"]
        for row in heldout
    ]
    assert len(heldout) == 20
    assert sum(correct) >= 18, f"{sum(correct)}/20 correct"


FROM_AN_OUTPUT = {"grpo_quickstart.toml": ["--set", "model.base=quickstart/model"]}
"""Examples that start from another example's output (absent in a clean clone): validated with the
model folder of the run that makes it, and trained by their own plugin's tests."""
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.toml"))


def example_config(name):
    from ftcore.config import load_config

    return load_config(EXAMPLES / name, FROM_AN_OUTPUT.get(name, [])[1::2])[0]


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_example_configs_validate(example):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftcore.cli",
            "validate",
            str(EXAMPLES / example),
            *FROM_AN_OUTPUT.get(example, []),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[train]" in proc.stdout


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_every_example_runs_offline_from_the_clone_or_says_it_needs_the_hub(example):
    config = example_config(example)
    checkout = EXAMPLES.parent.resolve()
    for key, value in config.references():
        assert not Path(value).is_absolute() or Path(value).resolve().is_relative_to(checkout), (
            f"{example}: {key} points outside the repository: {value}"
        )
    if config.hub_ids():
        header = (EXAMPLES / example).read_text().split("\n", 1)[0]
        assert header.startswith("# Hub example (network needed)"), (
            f"{example} loads {config.hub_ids()} from the hub: its first line must say so"
        )


OFFLINE_EXAMPLES = [
    name
    for name in EXAMPLE_FILES
    if name != "quickstart.toml" and name not in FROM_AN_OUTPUT and not example_config(name).hub_ids()
]


@pytest.mark.slow
@pytest.mark.parametrize("example", OFFLINE_EXAMPLES)
def test_offline_examples_train_a_few_steps(tmp_path, example):
    proc = subprocess.run(
        [sys.executable, "-m", "ftcore.cli", "run", str(EXAMPLES / example),
         "--set", f"train.output_dir={tmp_path / 'out'}", "--set", "train.max_steps=2",
         "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "config.resolved.toml").is_file()
    assert "ftcore generate" in proc.stdout
