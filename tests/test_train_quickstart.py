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
model folder of the run that makes it."""


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
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
