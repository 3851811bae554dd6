"""ftcore.testing: the one test-asset locator (FTCORE_TEST_ASSETS when set, else the assets packaged
with ftcore), the pytest fixtures, and the metrics route they expose."""

import importlib.util
import json
from pathlib import Path

import pytest
from ftcore.errors import ConfigError
from ftcore.testing import ASSETS_ENV, PACKAGED_ASSETS, MissingAssets, asset, assets_dir, stories_model

INHOUSE = str(Path(__file__).parent / "inhouse_plugins")


def test_the_variable_names_the_assets_folder(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path))
    assert assets_dir() == tmp_path.resolve()
    assert asset("data/rows.jsonl") == tmp_path.resolve() / "data" / "rows.jsonl"
    with pytest.raises(MissingAssets, match=r"test asset 'models/stories260K-hf' missing under "):
        stories_model()


def test_a_wrong_variable_fails_clearly_instead_of_falling_back(tmp_path, monkeypatch):
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "nope"))
    with pytest.raises(
        MissingAssets, match=rf"test assets not found \(tried {tmp_path / 'nope'}\)\. Set {ASSETS_ENV}"
    ):
        assets_dir()


def test_without_the_variable_the_packaged_assets_are_used(monkeypatch):
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    assert assets_dir() == PACKAGED_ASSETS
    assert (stories_model() / "model.safetensors").is_file()


def test_every_packaged_file_is_listed_in_the_assets_readme():
    readme = (PACKAGED_ASSETS / "README.md").read_text()
    for path in sorted((PACKAGED_ASSETS / "data").glob("*/*.jsonl")):
        folder, name = path.parent.name, path.name
        assert f"data/{folder}/{name}" in readme or f"data/{folder}/*.jsonl" in readme, path
        for line in path.read_text(encoding="utf-8").splitlines():
            json.loads(line)
    assert "`models/stories260K-hf/`" in readme


def test_run_ftcore_trains_in_process_and_returns_result_metrics_and_output(run_ftcore, ftcore_stories_model):
    trained = run_ftcore(steps=2)
    assert trained.result.global_step == 2 and not trained.result.interrupted
    assert [row["step"] for row in trained.metrics if "loss" in row] == [1, 2]
    assert trained.output_dir == trained.result.output_dir and (trained.output_dir / "config.json").is_file()
    assert trained.config.model.base == str(ftcore_stories_model) and trained.config.train.max_steps == 2
    with pytest.raises(ConfigError, match="not empty: pass --resume"):
        run_ftcore(steps=2)
    assert run_ftcore(steps=2, overwrite=True).result.global_step == 2


def tensorboard_scalars(output_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {path.parent for path in output_dir.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_a_plugin_callback_metric_lands_in_every_sink(run_ftcore, monkeypatch):
    """Run.log_metrics from a plugin callback: metrics.jsonl, a tracker (TensorBoard when installed,
    else the plugin's recording callback), report.html and the trainer's log history."""
    monkeypatch.syspath_prepend(INHOUSE)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    config = {"train": {"report_to": ["tensorboard"] if tensorboard else [], "save_steps": 3}}
    trained = run_ftcore(config, plugins=["inhouse.metrics_probe"], steps=3)
    expected = {1: 1, 2: 4, 3: 9}
    assert {r["step"]: r["probe/step_squared"] for r in trained.metrics if "loss" in r} == expected
    recorded = trained.stash["metrics_probe"]
    assert {r["probe/step_squared"] for r in recorded if "loss" in r} == set(expected.values())
    assert {r["first_callback"] for r in recorded} == {"LoggedMetricsCallback"}
    if tensorboard:
        assert tensorboard_scalars(trained.output_dir, "train/probe/step_squared") == expected
    report = (trained.output_dir / "report.html").read_text()
    assert "<h2>probe/step_squared</h2>" in report and report.count("<polyline") >= 3
    state = json.loads(
        (trained.output_dir / "checkpoints" / "step-000003" / "trainer_state.json").read_text()
    )
    assert [r["probe/step_squared"] for r in state["log_history"] if "loss" in r] == [1, 4, 9]
    assert "training has ended" in trained.stash["too_late"]


def test_cached_venv_is_built_once_and_a_failed_build_says_why(tmp_path):
    from ftcore.testing import COMPLETE_MARKER, VenvBuildError, cached_venv

    calls = []

    def install(pip, env_dir):
        calls.append(env_dir)
        pip("--version")

    python = cached_venv("ok", install, root=tmp_path)
    assert python == tmp_path / "ok" / "bin" / "python" and (tmp_path / "ok" / COMPLETE_MARKER).exists()
    assert cached_venv("ok", install, root=tmp_path) == python and len(calls) == 1  # built once

    def broken(pip, env_dir):
        pip("install", "--no-index", "a-package-that-is-not-there")

    with pytest.raises(
        VenvBuildError, match=r"(?s)`pip install --no-index a-package.*failed.*Use my env\..*No matching"
    ):
        cached_venv("broken", broken, root=tmp_path, hint="Use my env.")
    assert not (tmp_path / "broken" / COMPLETE_MARKER).exists()  # tried again next time
