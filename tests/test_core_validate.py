"""``ftcore validate`` runs every check that needs no weights and no data rows, so it reports the
same first error as ``ftcore run`` for every bad config below (both exit 2 with the same message)."""

import json

import pytest
from click.testing import CliRunner
from ftcore.cli import cli
from ftcore.testing import asset, stories_model

GOOD = """
plugins = []
[model]
base = "{model}"
[[datasets]]
path = "rows.jsonl"
format = "alpaca"
[train]
output_dir = "out"
max_steps = 1
"""

# name: (replace this in GOOD, with this; extra --set overrides; a piece of the expected first error)
BAD = {
    "toml syntax": ("[train]", "[train", (), "TOML syntax error"),
    "unknown key": ("max_steps = 1", "max_stepz = 1", (), "unknown key 'train.max_stepz'"),
    "wrong type": ("max_steps = 1", 'learning_rate = "fast"', (), "key 'train.learning_rate'"),
    "missing table": ('output_dir = "out"', "", (), "missing required key 'train.output_dir'"),
    "bad --set": ("", "", ("train.max_steps",), "--set expects KEY=VALUE"),
    "unknown plugin": ("plugins = []", 'plugins = ["fqa"]', (), "plugin 'fqa': not installed"),
    "table of a disabled plugin": ("max_steps = 1", "max_steps = 1\n[dpo]\nbeta = 0.2", (), "[dpo] belongs"),
    "unknown method": ("max_steps = 1", 'method = "sftt"', (), 'unknown method "sftt"'),
    "unknown format": ('format = "alpaca"', 'format = "alpacca"', (), 'unknown format "alpacca"'),
    "missing data file": ('"rows.jsonl"', '"missing.jsonl"', (), "datasets.0.path"),
    "missing model folder": ("{model}", "./nope", (), "model.base"),
    "unknown format option": ('format = "alpaca"', 'format = "alpaca"\noptions = {sepparator = " "}', (),
                              "unknown option 'sepparator'"),
    "unknown field": ('format = "alpaca"', 'format = "alpaca"\nfields = {instructions = "q"}', (),
                      "datasets.0.fields.instructions"),
    "split of chat rows": ('format = "alpaca"', 'format = "alpaca"\nexcess_length = "split"', (),
                           "datasets.0.excess_length"),
    "no path": ('path = "rows.jsonl"', "", (), "reads a file: set path"),
    "no datasets": ('[[datasets]]\npath = "rows.jsonl"\nformat = "alpaca"', "", (), "no [[datasets]]"),
    "format of another schema": ("max_steps = 1", 'method = "dpo"', ('plugins=["dpo"]',),
                                 "produces 'messages' rows, but method 'dpo' takes preference"),
    "invalid targets regex": ("[train]", '[adapter]\ntargets = "(q_proj"\n[train]', (), "invalid regex"),
    "adapter on random init": ('base = "{model}"', 'base = "{model}"\ninit = "random"\n[adapter]\nr = 4', (),
                               'init = "random" with an [adapter]'),
    "eval without a split": ("max_steps = 1", "eval_steps = 2", (), "train.eval_steps"),
    "plugin validate_config": ("max_steps = 1", 'method = "dpo"\npacking = true', ('plugins=["dpo"]',),
                               "dpo trains on (prompt, chosen, rejected) pairs"),
}  # fmt: skip


def error(args) -> tuple[int, str]:
    """Exit code and the error message (a config error lists its problems one per line)."""
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_and_run_report_the_same_error(tmp_path, case):
    old, new, overrides, expected = BAD[case]
    (tmp_path / "rows.jsonl").write_text(
        asset("data/instructions/instructions_2000.jsonl").read_text().split("\n", 1)[0] + "\n"
    )
    path = tmp_path / "run.toml"
    path.write_text(GOOD.replace(old, new).replace("{model}", str(stories_model())))
    sets = [arg for override in overrides for arg in ("--set", override)]
    validated = error(["validate", str(path), *sets])
    assert validated[0] == 2 and expected in validated[1], validated
    assert error(["run", str(path), *sets]) == validated
    assert not (tmp_path / "out").exists()  # nothing started


def test_the_good_config_validates(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    path = tmp_path / "run.toml"
    path.write_text(GOOD.replace("{model}", str(stories_model())))
    assert error(["validate", str(path)]) == (0, "")
