"""The ftcore command line, run as users run it: the installed console script in a subprocess."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from ftcore import __version__

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")

CONFIG = """
plugins = ["faq"]

[model]
base = "org/model"

[[datasets]]
path = "qa.jsonl"
format = "faq"

[train]
output_dir = "out"
{extra}
"""


def write_config(folder: Path, extra: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text(CONFIG.format(extra=extra))
    (folder / "qa.jsonl").touch()
    return path


def in_repo_plugins() -> dict[str, str]:
    """{entry-point name: distribution} of every plugin under plugins/."""
    found = {}
    for pyproject in REPO.glob("plugins/*/pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        found.update(dict.fromkeys(project["entry-points"]["ftcore"], project["name"]))
    return found


def test_user_error_exits_2_with_a_suggestion_and_no_traceback(ftcore_cli, tmp_path):
    path = write_config(tmp_path, "max_stepz = 3")
    result = ftcore_cli("validate", path, sites=["faq"])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}: invalid config:")
    assert "unknown key 'train.max_stepz' (did you mean \"max_steps\"?)" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_shows_the_traceback(ftcore_cli, tmp_path):
    result = ftcore_cli("--debug", "validate", write_config(tmp_path, "max_stepz = 3"), sites=["faq"])
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ftcore.errors.ConfigError" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "missing.toml"], "missing.toml: config file not found"),
        (["validate", "--set", "train.max_steps", "{config}"], "--set expects KEY=VALUE"),
        (
            ["validate", "--set", 'plugins=["fqa"]', "{config}"],
            "plugin 'fqa': not installed (did you mean \"faq\"?)",
        ),
        (["schema", "--section", "trian"], "no table 'trian' (did you mean \"train\"?)"),
    ],
)
def test_other_user_errors_exit_2(ftcore_cli, tmp_path, args, message):
    config = write_config(tmp_path)
    result = ftcore_cli(*[a.format(config=config) for a in args], sites=["faq"], cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_validate_prints_a_config_that_revalidates_to_itself(ftcore_cli, tmp_path):
    first = ftcore_cli("validate", write_config(tmp_path), "--set", "train.max_steps=9", sites=["faq"])
    assert first.returncode == 0, first.stderr
    resolved = tomllib.loads(first.stdout)
    assert resolved["train"]["max_steps"] == 9 and resolved["train"]["output_dir"] == str(tmp_path / "out")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "resolved.toml").write_text(first.stdout)
    second = ftcore_cli("validate", tmp_path / "again" / "resolved.toml", sites=["faq"])
    assert second.returncode == 0 and second.stdout == first.stdout


LIGHT_CHECK = """
import sys
from ftcore.cli import main

sys.argv = ["ftcore", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["validate", "{config}"], ["validate", "{bad}"], ["validate", "{missing}"], ["plugins"],
     ["plugins", "--json"], ["schema"], ["schema", "--markdown"], ["run", "{busy}"]],
    ids=lambda args: " ".join(args),
)  # fmt: skip
def test_light_commands_do_not_import_torch_or_transformers(plugin_sites, tmp_path, args):
    """Also the config-only errors of ``run`` (a non-empty output_dir) come before any heavy import."""
    for name in ("bad", "missing", "busy"):
        (tmp_path / name).mkdir()
    paths = {
        "config": write_config(tmp_path),
        "bad": write_config(tmp_path / "bad", "max_stepz = 1"),
        "missing": write_config(tmp_path / "missing"),
        "busy": write_config(tmp_path / "busy"),
    }
    (tmp_path / "missing" / "qa.jsonl").unlink()
    (tmp_path / "busy" / "out").mkdir()
    (tmp_path / "busy" / "out" / "metrics.jsonl").touch()
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_CHECK.format(heavy=HEAVY), *[a.format(**paths) for a in args]],
        capture_output=True, text=True, env={"PYTHONPATH": os.pathsep.join([str(plugin_sites["faq"]), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    user_error = any(name in arg for arg in args for name in ("{bad}", "{missing}", "{busy}"))
    assert result.returncode == (2 if user_error else 0), result.stderr
    if "{missing}" in args:
        assert "datasets.0.path" in result.stderr and "qa.jsonl: no such file or folder" in result.stderr
    if "{busy}" in args:
        assert "is not empty: pass --resume" in result.stderr
    assert "HEAVY=\n" in result.stderr, f"ftcore {' '.join(args)} imported: {result.stderr.splitlines()[-1]}"


def test_plugins_json_lists_builtins_and_every_in_repo_plugin(ftcore_cli):
    result = ftcore_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    for name in ("core.formats", "core.model", "core.sft"):
        assert listed[name]["builtin"] and listed[name]["distribution"] == "ftcore"
    expected = in_repo_plugins()
    assert {"liger", "cce", "dpo", "scattermoe"} <= set(expected)
    for name, distribution in expected.items():
        assert name in listed, f"in-repo plugin {name} is not installed: pip install -e plugins/{name}"
        assert listed[name]["distribution"] == distribution and not listed[name]["builtin"]
        assert listed[name]["error"] is None, listed[name]["error"]


def test_schema_includes_installed_plugin_tables(ftcore_cli):
    full = json.loads(ftcore_cli("schema", sites=["faq"]).stdout)
    assert {"plugins", "model", "adapter", "datasets", "data", "train", "faq"} <= set(full["properties"])
    section = json.loads(ftcore_cli("schema", "--section", "faq", sites=["faq"]).stdout)
    assert list(section["properties"]) == ["faq"]
    markdown = ftcore_cli("schema", "--markdown", "--section", "faq", sites=["faq"]).stdout
    assert "## `[faq]`" in markdown and "| `stop_at_loss` | number (> 0) | not set |" in markdown


def test_env_reports_versions(ftcore_cli):
    result = ftcore_cli("env")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"ftcore {__version__}"
    for name in "python torch transformers peft trl accelerate datasets triton cuda".split():
        assert any(line.startswith(f"{name} ") for line in lines), f"no {name} line in:\n{result.stdout}"
    for name, distribution in in_repo_plugins().items():
        assert any(line.startswith(f"plugin {name}: {distribution} ") for line in lines)
    assert not any(line.startswith("warning:") for line in lines), result.stdout


def test_env_warns_about_broken_requirements(ftcore_cli):
    result = ftcore_cli("env", sites=["badplugins"])
    assert result.returncode == 0
    assert "warning: ftcore-badplugins 0.0.1 requires transformers<1, but transformers 5." in result.stdout


def test_version(ftcore_cli):
    assert ftcore_cli("--version").stdout.strip() == f"ftcore, version {__version__}"


HUB_DOWN = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""}


@pytest.mark.parametrize("command", ["run", "generate"])
def test_an_unreachable_hub_id_fails_at_once_with_the_clear_message(ftcore_cli, tmp_path, command):
    """Port 9 on loopback refuses connections: the hub is down. No minute of retries, exit 2."""
    (tmp_path / "rows.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = tmp_path / "config.toml"
    config.write_text(
        '[model]\nbase = "someorg/no-such-model"\n[[datasets]]\npath = "rows.jsonl"\n[train]\noutput_dir = "out"\n'
    )
    args = ["run", config] if command == "run" else ["generate", "someorg/no-such-model", "--prompt", "hi"]
    result = ftcore_cli(*args, env={**HUB_DOWN, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr
    assert "the Hugging Face hub does not answer" in result.stdout + result.stderr
    assert "someorg/no-such-model" in result.stderr and "Retry" not in result.stderr
