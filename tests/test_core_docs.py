"""The docs are proven: the plugin guide shows the tested fixture plugin verbatim, and the config
reference is what ``ftcore schema --markdown`` prints for the core and the in-repo plugins."""

import json
import re
import tomllib
from pathlib import Path

import pytest
from ftcore.config import build_config_model, config_reference
from ftcore.plugins import Plugins
from ftcore.testing import stories_model

REPO = Path(__file__).resolve().parents[1]
FAQ = REPO / "tests" / "fixtures" / "ftcore-faq"
FILE_BLOCK = re.compile(r"\*\*`ftcore-faq/(?P<path>[^`]+)`\*\*\n\n```[a-z]*\n(?P<body>.*?)```\n", re.S)


def test_plugin_guide_shows_the_fixture_plugin_verbatim():
    guide = (REPO / "docs" / "plugins.md").read_text()
    shown = {m["path"]: m["body"] for m in FILE_BLOCK.finditer(guide)}
    files = {
        str(path.relative_to(FAQ)): path.read_text()
        for path in FAQ.rglob("*")
        if path.is_file()
        and not any(part.endswith(("__pycache__", ".egg-info", "build")) for part in path.parts)
    }
    assert set(shown) == set(files), "docs/plugins.md and tests/fixtures/ftcore-faq list different files"
    for path, body in files.items():
        assert shown[path] == body, (
            f"docs/plugins.md shows a different ftcore-faq/{path}: copy the fixture's file"
        )


def test_config_reference_is_up_to_date():
    names = []
    for pyproject in sorted(REPO.glob("plugins/*/pyproject.toml")):
        names += tomllib.loads(pyproject.read_text())["project"]["entry-points"]["ftcore"]
    model = build_config_model(Plugins(sorted(names)).config_sections())
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_reference(model), (
        "docs/config.md is out of date: regenerate it with `ftcore schema --markdown > docs/config.md` "
        "(in an environment with ftcore and the in-repo plugins installed, and no other plugins)"
    )


@pytest.mark.slow
def test_the_guides_example_trains_with_the_plugin(ftcore_cli, tmp_path):
    """`ftcore run example/faq.toml` from the guide, on the tiny pretrained Llama: the faq format feeds
    the data and the plugin's StopAtLoss callback (faq.stop_at_loss) ends training at the first log."""
    result = ftcore_cli(
        "run", "faq.toml",
        "--set", f"model.base={stories_model()}",
        "--set", f"train.output_dir={tmp_path / 'out'}",
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", "faq.stop_at_loss=100",
        sites=["faq"], cwd=FAQ / "example",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1], f"expected training to stop at step 1 of 50, logged steps: {steps}"
    assert (tmp_path / "out" / "config.json").exists()


def test_ci_runs_the_readmes_test_command_word_for_word():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if line.startswith('# README, "Set up", command 2'))
    command = ci[marker + 1]
    readme = (REPO / "README.md").read_text()
    assert f"\n   {command}\n" in readme, f"README's command 2 differs from .ci/run's: {command}"
    assert command.endswith("&& pytest -q")
