"""End-to-end runs on the real pretrained stories260K model and real data (CPU): SFT, and an
in-house online-RL method plugin."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ftcore.checkpoint import COMPLETE, complete_checkpoints
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training
from ftcore.testing import asset, stories_model

INHOUSE = str(Path(__file__).parent / "inhouse_plugins")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_config(tmp_path: Path, body: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def alpaca_config(
    tmp_path, *, extra_train="max_steps = 8", adapter="", plugins="[]", micro_batch_size=4
) -> Path:
    return write_config(
        tmp_path,
        f"""
plugins = {plugins}
[model]
base = "{stories_model()}"
dtype = "float32"
chat_template = "chatml"
{adapter}
[[datasets]]
path = "{asset("data/instructions/instructions_2000.jsonl")}"
format = "alpaca"
excess_length = "truncate"

[train]
output_dir = "out"
sequence_len = 256
micro_batch_size = {micro_batch_size}
learning_rate = 3e-3
logging_steps = 1
seed = 7
{extra_train}
""",
    )


def ftcore(*args, env=None, **kwargs):
    full_env = {**os.environ, "PYTHONPATH": INHOUSE, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ftcore.cli", *args], env=full_env, capture_output=True, text=True, **kwargs
    )


def test_full_finetune_alpaca_loss_falls_and_output_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, plugins = load_config(alpaca_config(tmp_path, extra_train="max_steps = 12"))
    result = run_training(config, plugins)
    losses = [row["loss"] for row in read_metrics(result.output_dir) if "loss" in row]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    rows = read_metrics(result.output_dir)
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= set(r) for r in rows if "loss" in r)
    assert (result.output_dir / "report.html").is_file()
    assert (result.output_dir / "config.resolved.toml").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)
    assert list(result.output_dir.glob("*.safetensors"))


def test_lora_on_oasst_chat_reloads_with_peft(tmp_path):
    from peft import AutoPeftModelForCausalLM

    path = write_config(
        tmp_path,
        f"""
[model]
base = "{stories_model()}"
dtype = "float32"
chat_template = '''{CHATML}'''
[adapter]
kind = "lora"
r = 8
alpha = 16
[[datasets]]
path = "{asset("data/oasst1_chat/oasst_en_threads.jsonl")}"
format = "messages"
excess_length = "truncate"
[train]
output_dir = "out"
sequence_len = 256
micro_batch_size = 4
learning_rate = 1e-2
max_steps = 10
logging_steps = 1
""",
    )
    config, plugins = load_config(path)
    result = run_training(config, plugins)
    losses = [row["loss"] for row in read_metrics(result.output_dir) if "loss" in row]
    assert losses[-1] < losses[0]
    adapter_config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(stories_model())
    reloaded = AutoPeftModelForCausalLM.from_pretrained(result.output_dir)
    ids = torch.tensor([[1, 300, 301, 302, 400]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model.eval()(ids).logits, atol=1e-6)


def test_logged_loss_does_not_depend_on_gradient_accumulation(tmp_path):
    first_losses = []
    for micro, accumulation in ((4, 1), (1, 4), (2, 2)):
        run_dir = tmp_path / f"mb{micro}"
        run_dir.mkdir()
        path = alpaca_config(
            run_dir,
            micro_batch_size=micro,
            extra_train=f"gradient_accumulation_steps = {accumulation}\nmax_steps = 1",
        )
        config, plugins = load_config(path)
        run_training(config, plugins)
        first_losses.append(next(r["loss"] for r in read_metrics(run_dir / "out") if "loss" in r))
    assert max(first_losses) - min(first_losses) < 1e-4, first_losses


def test_checkpointing_every_second_layer_trains_the_same_losses(tmp_path):
    runs = {}
    for name, model in (
        ("plain", "gradient_checkpointing = false"),
        ("every2", "gradient_checkpointing = true\ncheckpoint_every_n_layers = 2"),
    ):
        run_dir = tmp_path / name
        run_dir.mkdir()
        path = alpaca_config(run_dir, extra_train="max_steps = 3")
        path.write_text(
            path.read_text().replace('chat_template = "chatml"', f'chat_template = "chatml"\n{model}')
        )
        config, plugins = load_config(path)
        result = run_training(config, plugins)
        runs[name] = (_losses(result.output_dir), result.model)
    layers = runs["every2"][1].model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
    assert not any(layer.gradient_checkpointing for layer in runs["plain"][1].model.layers)
    plain, every2 = runs["plain"][0], runs["every2"][0]
    assert plain.keys() == every2.keys() and all(abs(plain[s] - every2[s]) < 1e-5 for s in plain)


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path):
    path = alpaca_config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    proc = ftcore("run", str(path))
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


def _final_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(output_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def _losses(output_dir: Path) -> dict:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir) if "loss" in row}


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


RESUME_CASES = {
    "full": ("", ""),
    "lora_packed": ("[adapter]\nkind = 'lora'\nr = 4\n", "packing = true"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_after_sigkill_equals_uninterrupted_run_bit_for_bit(tmp_path, case):
    adapter, packing = RESUME_CASES[case]
    train = f"max_steps = 6\nsave_steps = 2\n{packing}"
    plugins = '["inhouse.run_control"]'
    reference = alpaca_config(tmp_path, extra_train=train, adapter=adapter, plugins=plugins)
    proc = ftcore("run", str(reference), "--set", "train.output_dir=reference")
    assert proc.returncode == 0, proc.stderr

    flags = tmp_path / "flags"
    flags.mkdir()
    env = {"FTCORE_TEST_FLAG_DIR": str(flags), "FTCORE_TEST_STALL_AT_SAVE": "2"}
    running = subprocess.Popen(
        [sys.executable, "-m", "ftcore.cli", "run", str(reference), "--set", "train.output_dir=killed"],
        env={**os.environ, "PYTHONPATH": INHOUSE, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for(flags / "stalled-in-save", running)  # inside the second checkpoint write (step 4)
    running.send_signal(signal.SIGKILL)
    running.wait()
    killed = tmp_path / "killed"
    assert [p.name for p in complete_checkpoints(killed)] == ["step-000002"]
    assert (killed / "checkpoints" / "checkpoint-4").is_dir()  # the half-written one, never picked

    proc = ftcore(
        "run",
        str(reference),
        "--set",
        "train.output_dir=killed",
        "--resume",
        env={"FTCORE_TEST_FLAG_DIR": str(flags)},
    )
    assert proc.returncode == 0, proc.stderr
    assert (flags / "restored-1").exists()
    assert _losses(killed) == _losses(tmp_path / "reference")
    reference_weights, resumed_weights = _final_weights(tmp_path / "reference"), _final_weights(killed)
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
    path = alpaca_config(tmp_path, extra_train="max_steps = 40", plugins='["inhouse.run_control"]')
    flags = tmp_path / "flags"
    flags.mkdir()
    running = subprocess.Popen(
        [sys.executable, "-m", "ftcore.cli", "run", str(path)],
        env={
            **os.environ,
            "PYTHONPATH": INHOUSE,
            "FTCORE_TEST_FLAG_DIR": str(flags),
            "FTCORE_TEST_STEP_SLEEP": "0.3",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(flags / "step-3", running)
    running.send_signal(signal.SIGTERM)
    out, err = running.communicate(timeout=120)
    assert running.returncode == 0, err
    saved = complete_checkpoints(tmp_path / "out")
    assert saved and 3 <= int(saved[-1].name.split("-")[1]) < 40
    assert (saved[-1] / COMPLETE).is_file()
    assert not list((tmp_path / "out").glob("*.safetensors"))  # no final model: training did not finish
    assert "--resume" in out

    proc = ftcore("run", str(path), "--resume", "--set", "train.max_steps=40")
    assert proc.returncode == 0, proc.stderr
    assert max(_losses(tmp_path / "out")) == 40
    rows = read_metrics(tmp_path / "out")  # the stopped run's summary row is gone, the resumed one's is last
    assert [i for i, row in enumerate(rows) if "train_loss" in row] == [len(rows) - 1]


def test_resume_refuses_a_changed_config_unless_forced(tmp_path):
    path = alpaca_config(tmp_path, extra_train="max_steps = 2\nsave_steps = 2")
    config, plugins = load_config(path)
    run_training(config, plugins)
    proc = ftcore("run", str(path), "--resume", "--set", "train.learning_rate=0.1")
    assert proc.returncode == 2
    assert "config changed" in proc.stderr and "--force" in proc.stderr
    proc = ftcore("run", str(path), "--resume", "--force", "--set", "train.learning_rate=0.1")
    assert proc.returncode == 0, proc.stderr


def test_a_missing_dataset_file_is_reported_before_the_model_loads(tmp_path):
    path = alpaca_config(tmp_path)
    path.write_text(path.read_text().replace("instructions_2000.jsonl", "missing.jsonl"))
    proc = ftcore("run", str(path))
    assert proc.returncode == 2
    assert "datasets.0.path" in proc.stderr and "missing.jsonl: no such file" in proc.stderr
    assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr


def test_eval_split_logs_eval_rows_and_eval_steps_without_a_split_is_an_error(tmp_path):
    path = alpaca_config(tmp_path, extra_train="max_steps = 4\neval_steps = 2")
    proc = ftcore("validate", str(path))
    assert proc.returncode == 2 and "train.eval_steps" in proc.stderr and "val_fraction" in proc.stderr
    config, plugins = load_config(path, ["data.val_fraction=0.01"])
    result = run_training(config, plugins)
    eval_rows = [row for row in read_metrics(result.output_dir) if "eval_loss" in row]
    assert [row["step"] for row in eval_rows] == [2, 4]


def test_an_online_rl_method_plugin_trains_and_resumes_through_the_core(tmp_path, monkeypatch):
    """TRL's GRPOTrainer behind an in-house method plugin: prompt rows, registered rewards, the
    core's callbacks and atomic checkpoints with plugin state; no core code knows about RL."""
    monkeypatch.syspath_prepend(INHOUSE)
    path = write_config(
        tmp_path,
        f"""
plugins = ["inhouse.online_rl"]
[model]
base = "{stories_model()}"
dtype = "float32"
[online_rl]
rewards = ["mentions_answer", "shorter_is_better"]
[[datasets]]
path = "{asset("data/gsm8k/train_first300.jsonl")}"
format = "prompt"
fields = {{prompt = "question"}}
options = {{columns = ["answer"]}}
split = "train[:64]"
[train]
method = "toy_grpo"
output_dir = "out"
micro_batch_size = 4
max_steps = 4
save_steps = 2
logging_steps = 1
learning_rate = 1e-4
""",
    )
    config, plugins = load_config(path)
    result = run_training(config, plugins)
    rows = [row for row in read_metrics(result.output_dir) if "loss" in row]
    assert len(rows) == 4
    assert {"reward", "rewards/mentions_answer/mean", "rewards/shorter_is_better/mean"} <= set(rows[0])
    assert [row["online_rl/scored"] for row in rows] == [4, 8, 12, 16]  # Run.log_metrics, every step
    assert result.stash["online_rl"] == {"scored": 4 * 4}  # 4 steps x 2 prompts x 2 generations
    step2 = result.output_dir / "checkpoints" / "step-000002"
    assert (step2 / COMPLETE).is_file()
    state = torch.load(step2 / "plugin_state.pt", weights_only=True)
    assert state["online_rl"] == {"scored": 8}

    shutil.rmtree(result.output_dir / "checkpoints" / "step-000004")
    config, plugins = load_config(path)
    resumed = run_training(config, plugins, resume=True)
    assert resumed.global_step == 4
    assert resumed.stash["online_rl"] == {"scored": 8 + 2 * 4}  # restored at step 2, then two more steps


def test_resuming_a_finished_run_trains_nothing_and_writes_its_final_model(tmp_path):
    from safetensors.torch import load_file

    path = alpaca_config(tmp_path, extra_train="max_steps = 3\nsave_steps = 3")
    config, plugins = load_config(path)
    out = run_training(config, plugins).output_dir
    weights, rows = load_file(out / "model.safetensors"), read_metrics(out)
    (out / "model.safetensors").unlink()  # as if the final save had been lost
    config, plugins = load_config(path)
    result = run_training(config, plugins, resume=True)
    assert result.global_step == 3 and read_metrics(out) == rows  # not a step past max_steps
    assert [p.name for p in complete_checkpoints(out)] == ["step-000003"]
    reloaded = load_file(out / "model.safetensors")
    assert weights.keys() == reloaded.keys() and all(torch.equal(weights[k], reloaded[k]) for k in weights)
