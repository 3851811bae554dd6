"""The ebft plugin's structured mode (a method built on grpo's extension point) through the REAL vLLM
server of this folder's session (``tiny_server``, see conftest.py) with LoRA sync every step: a short
seeded run raises the mean alignment, and resumes. Here rather than in plugins/ebft/tests so that it
shares the session's one server; skipped when ftcore-ebft is not installed."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("ftcore_ebft")

pytestmark = pytest.mark.slow

WORDS = ["cats", "dogs", "birds", "fish", "frogs", "ducks", "bears", "foxes"]


def ebft_config(tmp_path, base, url) -> dict:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"input": f"Tell me about {w}.", "output": " yes yes yes."}) + "\n"
                            for w in WORDS))  # fmt: skip
    return {
        "plugins": ["grpo", "ebft"],
        "model": {"base": str(base), "dtype": "float32"},
        "adapter": {"r": 8, "alpha": 16},
        "datasets": [{"path": str(rows), "format": "ebft_opencode"}],
        "train": {"method": "ebft", "sequence_len": 96, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "learning_rate": 3e-2, "scheduler": "constant", "seed": 0, "save_steps": 4},
        "grpo": {"generation": "vllm", "num_generations": 4, "max_completion_length": 16, "temperature": 1.0,
                 "sync_interval": 1, "log_completions_steps": 1, "log_completions_count": 4,
                 "vllm": {"url": url, "max_model_len": 256}},
        "ebft": {"embed_method": "completion_mean", "diversity_coef": 0.0},
    }  # fmt: skip


def test_ebft_structured_lora_through_vllm_raises_alignment_and_resumes(
    tiny_server, tiny_vllm_model, run_ftcore, tmp_path
):
    config = ebft_config(tmp_path, tiny_vllm_model, tiny_server.url)
    run = run_ftcore(config, steps=12)
    rows = {row["step"]: row for row in run.metrics if "ebft/alignment" in row}
    assert sorted(rows) == list(range(1, 13))
    versions = {}
    for line in (run.output_dir / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        versions.setdefault(row["step"], set()).add(row["policy_version"])
    assert [versions[step] for step in sorted(versions)] == [{s} for s in range(12)]  # LoRA synced every step
    first = sum(rows[s]["ebft/alignment"] for s in (1, 2, 3, 4)) / 4
    last = sum(rows[s]["ebft/alignment"] for s in (9, 10, 11, 12)) / 4
    print(f"ebft through vLLM: mean alignment {first:.3f} (steps 1-4) -> {last:.3f} (steps 9-12)")
    assert last > first + 0.02, (first, last)

    for later in sorted((run.output_dir / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)  # as if the run had stopped after step 4
    resumed = run_ftcore(config, steps=12, resume=True)
    assert resumed.result.global_step == 12
    assert sorted(r["step"] for r in resumed.metrics if "ebft/alignment" in r) == list(range(1, 13))
