"""Fixtures of the core tests: the plugin distributions in tests/fixtures, really pip-installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
collect_ignore = ["fixtures"]  # the fixture plugins' own tests run installed (test_core_docs.py)


@pytest.fixture(scope="session")
def plugin_sites(tmp_path_factory) -> dict[str, Path]:
    """{"faq": folder, "badplugins": folder}: each tests/fixtures/ftcore-NAME distribution
    pip-installed (without dependencies) into a folder of its own, once per session. Put a
    folder on PYTHONPATH (or sys.path) and its entry points are installed plugins."""
    sites = {}
    for source in sorted(FIXTURES.glob("ftcore-*")):
        name = source.name.removeprefix("ftcore-")
        work = tmp_path_factory.mktemp(name)
        shutil.copytree(source, work / "src")  # setuptools writes build files beside the sources
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(work / "site"), str(work / "src")],
            check=True,
        )  # fmt: skip
        sites[name] = work / "site"
    return sites


@pytest.fixture(scope="session")
def ftcore_cli(plugin_sites):
    """Run the installed ``ftcore`` console script: ``ftcore_cli("validate", path, sites=["faq"])``."""
    script = Path(sys.executable).with_name("ftcore")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ftcore.cli"]

    def run(*args, sites=(), env=None, cwd=None) -> subprocess.CompletedProcess:
        environ = {**os.environ, **(env or {})}
        paths = [str(plugin_sites[name]) for name in sites]
        environ["PYTHONPATH"] = os.pathsep.join(paths + [environ.get("PYTHONPATH", "")]).strip(os.pathsep)
        return subprocess.run(
            [*command, *map(str, args)], capture_output=True, text=True, env=environ, cwd=cwd
        )

    return run
