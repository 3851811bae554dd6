"""The docs are proven: the plugin guide shows the tested fixture plugin verbatim and every command
in it runs (the plugin's own tests included), and the config reference is what
``ftcore schema --markdown`` prints for the core and the in-repo plugins."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from ftcore.config import build_config_model, config_reference
from ftcore.plugins import Plugins
from ftcore.testing import stories_model

REPO = Path(__file__).resolve().parents[1]
FAQ = REPO / "tests" / "fixtures" / "ftcore-faq"
GUIDE = REPO / "docs" / "plugins.md"
FILE_BLOCK = re.compile(r"\*\*`ftcore-faq/(?P<path>[^`]+)`\*\*\n\n```[a-z]*\n(?P<body>.*?)```\n", re.S)
BLOCK = re.compile(
    r"(?:\*\*`ftcore-faq/(?P<path>[^`]+)`\*\*\n\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```\n", re.S
)


def fixture_files() -> dict[str, str]:
    return {
        str(path.relative_to(FAQ)): path.read_text()
        for path in FAQ.rglob("*")
        if path.is_file()
        and not any(
            part.endswith(("__pycache__", ".egg-info", "build", ".pytest_cache")) for part in path.parts
        )
    }


def test_plugin_guide_shows_the_fixture_plugin_verbatim():
    guide = GUIDE.read_text()
    shown = {m["path"]: m["body"] for m in FILE_BLOCK.finditer(guide)}
    files = fixture_files()
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


def guide_blocks() -> list[tuple[str | None, str, str]]:
    """(file path or None, language, body) of every fenced block of the plugin guide, in order."""
    return [(m["path"], m["lang"], m["body"]) for m in BLOCK.finditer(GUIDE.read_text())]


def test_the_package_tree_in_the_guide_lists_the_fixture_files():
    (tree,) = [body for path, lang, body in guide_blocks() if body.startswith("ftcore-faq/\n")]
    listed, folders = set(), []
    for line in tree.splitlines()[1:]:
        name = line.split("#")[0].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        folders[depth - 1 :] = [name.strip()]
        if not name.endswith("/"):
            listed.add("".join(folders))
    assert listed == set(fixture_files())


def shell(commands: str, workdir: Path, site: Path) -> subprocess.CompletedProcess:
    """Run a bash block of the guide as written, but offline: the pip install is the session's
    (``plugin_sites``, the same package without network), and ``ftcore run`` trains the packaged
    tiny model (the hub is unreachable in CI) with its data cache in ``workdir``."""
    lines = [line for line in commands.splitlines() if not line.startswith("pip install")]
    offline = f" --set model.base={stories_model()} --set data.cache_dir={workdir / 'cache'}"
    script = "set -e\n" + "\n".join(
        line + offline if line.startswith("ftcore run ") else line for line in lines
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True)


def test_every_example_in_the_plugin_guide_runs(plugin_sites, tmp_path):
    """Each bash block runs (in a copy of the fixture package, installed), each output block that
    follows one is what it prints, and every other block is a file of the tested plugin or its tree.
    One block runs the plugin's own tests, with ftcore's pytest fixtures."""
    shutil.copytree(FAQ, tmp_path / "ftcore-faq", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    blocks, ran, previous = guide_blocks(), 0, None
    files = fixture_files()
    for path, lang, body in blocks:
        if path is not None:
            assert files[path] == body
        elif lang == "bash":
            previous = shell(body, tmp_path, plugin_sites["faq"])
            assert previous.returncode == 0, f"{body}\n{previous.stdout[-2000:]}\n{previous.stderr[-3000:]}"
            ran += 1
        elif body.startswith("ftcore-faq/\n"):
            continue  # the package tree, checked above
        else:
            assert lang == "text" and previous is not None, f"a block no test checks:\n{body}"
            printed = re.sub(r" in \d+\.\d ms", " in 0.0 ms", previous.stdout + previous.stderr).splitlines()
            missing = [line for line in body.splitlines() if line not in printed]
            assert not missing, f"the guide shows lines the command does not print: {missing}"
            previous = None
    assert ran == 4
    rows = (tmp_path / "ftcore-faq" / "example" / "runs" / "faq" / "metrics.jsonl").read_text()
    assert '"faq/noised_batches": 1' in rows.splitlines()[0]  # the example run, with its noise metric


def test_ci_runs_the_readmes_test_command_word_for_word():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if line.startswith('# README, "Set up", command 2'))
    command = ci[marker + 1]
    readme = (REPO / "README.md").read_text()
    assert f"\n   {command}\n" in readme, f"README's command 2 differs from .ci/run's: {command}"
    assert command.endswith("&& pytest -q")
