"""Config: TOML -> validated pydantic Config, --set overrides, paths, and the errors people see."""

import textwrap
from pathlib import Path

import pytest
from ftcore.config import apply_overrides, load_config, parse_override, read_toml, validate_config
from ftcore.errors import ConfigError, PluginError

BASE = """
[model]
base = "org/some-model"

[train]
output_dir = "out"
"""


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.fixture
def faq(monkeypatch, plugin_sites):
    """The fixture plugin distribution ftcore-faq is installed (its folder is on sys.path)."""
    monkeypatch.syspath_prepend(str(plugin_sites["faq"]))


FULL = """
plugins = ["faq"]

[model]
base = "models/tiny"
dtype = "float32"
chat_template = "chatml"

[adapter]
kind = "dora"
r = 8
targets = ["q_proj", "v_proj"]

[[datasets]]
path = "data/qa.jsonl"
format = "faq"
fields = { question = "q" }

[[datasets]]
path = "org/hub-dataset"
format = "faq"
split = "validation"
weight = 0.5
options = { limit = 3 }

[data]
val_fraction = 0.1

[train]
output_dir = "../runs/one"
sequence_len = 256
max_steps = 5
learning_rate = 1e-4

[faq]
stop_at_loss = 0.5
"""


def test_round_trip_revalidates_to_the_same_config(tmp_path, faq):
    write(tmp_path / "a", "", "data/qa.jsonl")
    first, _ = load_config(write(tmp_path / "a", FULL))
    # The printed config re-validates to the same config, from any folder (paths are absolute).
    again, _ = load_config(write(tmp_path / "elsewhere" / "deeper", first.to_toml()))
    assert again.model_dump() == first.model_dump()
    assert again.faq.stop_at_loss == 0.5 and again.adapter.kind == "dora"
    assert again.fingerprint() == first.fingerprint()


def test_relative_paths_resolve_from_the_config_folder(tmp_path, faq, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the config's folder
    folder = tmp_path / "a"
    write(folder, "", "data/qa.jsonl")
    (folder / "models" / "tiny").mkdir(parents=True)  # "org/name"-like paths are local when they exist
    config, _ = load_config(write(folder, FULL))
    assert config.model.base == str(folder / "models" / "tiny")
    assert config.datasets[0].path == str(folder / "data" / "qa.jsonl")
    assert config.train.output_dir == str(tmp_path / "runs" / "one")
    assert config.datasets[1].path == "org/hub-dataset"  # a hub id is kept
    assert config.source == str(folder / "config.toml")


def test_hub_id_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok").mkdir()
    config, _ = load_config(write(tmp_path, BASE), ["model.tokenizer=~/tok"])
    assert config.model.base == "org/some-model"
    assert config.model.tokenizer == str(tmp_path / "tok")
    assert config.hub_ids() == ["org/some-model"]


def test_a_local_path_that_does_not_exist_is_a_config_error(tmp_path):
    """validate reports a missing local model or dataset, as run does; a hub id is not checked."""
    message = config_error(write(tmp_path, BASE), ["model.base=./models/tiny"])
    assert f"model.base: {tmp_path / 'models' / 'tiny'}: no such file or folder" in message
    message = config_error(write(tmp_path, BASE + '\n[[datasets]]\npath = "data/rows.jsonl"\n'))
    assert f"config.toml: datasets.0.path: {tmp_path / 'data' / 'rows.jsonl'}: no such file" in message


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("1e-4", 1e-4), ("true", True), ('["a", "b"]', ["a", "b"]), ("{ x = 1 }", {"x": 1}),
     ('"quoted"', "quoted"), ("org/name", "org/name"), ("plain words", "plain words"), ("", "")],
)  # fmt: skip
def test_override_values_are_toml_literals_with_string_fallback(text, value):
    assert parse_override(text) == value


def test_set_overrides(tmp_path, faq):
    for name in ("b.jsonl", "c.jsonl"):
        write(tmp_path, "", name)
    path = write(tmp_path, BASE + '\n[[datasets]]\npath = "a.jsonl"\nformat = "faq"\n')
    config, plugins = load_config(
        path,
        [
            "train.max_steps=7",
            "train.learning_rate=3e-5",
            "model.base=org/other",  # not TOML: kept as a string
            "train.method = sft",  # spaces around '=' are fine
            "datasets.0.path=b.jsonl",  # arrays of tables by index
            "datasets.1.path=c.jsonl",  # one past the end appends a table
            "datasets.1.format=faq",
            "adapter.r=4",  # a new table
            'plugins=["faq"]',  # applied before discovery: [faq] is known
            "faq.stop_at_loss=0.25",
        ],
    )
    assert config.train.max_steps == 7 and config.train.learning_rate == 3e-5
    assert config.model.base == "org/other" and config.train.method == "sft"
    assert [Path(d.path).name for d in config.datasets] == ["b.jsonl", "c.jsonl"]
    assert config.adapter.r == 4 and config.faq.stop_at_loss == 0.25
    assert plugins.enabled == ["faq"]


def test_set_on_a_config_without_the_array_creates_it():
    raw = apply_overrides({}, ["datasets.0.path=x.jsonl", "datasets.0.split=test"])
    assert raw == {"datasets": [{"path": "x.jsonl", "split": "test"}]}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps", "--set expects KEY=VALUE"),
        ("=3", "--set expects KEY=VALUE"),
        ("datasets.5.path=x", "datasets.5: --set: '5' is not an index of this 1-item array"),
        ("datasets.first.path=x", "'first' is not an index"),
        ("model.base.name=x", "model.base.name: --set: model.base is a value, not a table"),
    ],
)
def test_bad_set_overrides(tmp_path, override, message):
    path = write(tmp_path, BASE + '\n[[datasets]]\npath = "a.jsonl"\n')
    assert message in config_error(path, [override])


def test_unknown_keys_and_tables_suggest_the_closest(tmp_path):
    path = write(tmp_path, BASE.replace("[train]", "[modle]\nx = 1\n[train]\nmax_stepz = 3"))
    message = config_error(path)
    assert message.startswith(f"{path}: invalid config:")
    assert "unknown key 'train.max_stepz' (did you mean \"max_steps\"?)" in message
    assert "unknown table 'modle' (did you mean \"model\"?)" in message


def test_unknown_key_inside_an_array_of_tables(tmp_path, faq):
    path = write(tmp_path, BASE + '\n[[datasets]]\npath = "a.jsonl"\nformat = "faq"\nspilt = "test"\n')
    assert "unknown key 'datasets.0.spilt' (did you mean \"split\"?)" in config_error(path)


def test_unknown_key_in_a_plugin_table(tmp_path, faq):
    path = write(tmp_path, 'plugins = ["faq"]\n' + BASE + "\n[faq]\nstop_at_los = 1.0\n")
    assert "unknown key 'faq.stop_at_los' (did you mean \"stop_at_loss\"?)" in config_error(path)


def test_an_unknown_table_close_to_an_installed_plugin(tmp_path, faq):
    path = write(tmp_path, BASE + "\n[fqa]\n")
    assert "unknown table 'fqa' (did you mean \"faq\"?)" in config_error(path)


def test_wrong_types_name_key_value_and_expected_type(tmp_path):
    path = write(tmp_path, BASE + 'micro_batch_size = "two"\n\n[adapter]\ntargets = 3\n')
    message = config_error(path)
    assert "key 'train.micro_batch_size': got 'two' (str); expected a valid integer" in message
    # a union type gives one line for the key, not one per member of the union
    assert "key 'adapter.targets': got 3 (int); expected a valid string or a valid list" in message
    assert "targets.str" not in message


def test_constraint_violation(tmp_path):
    message = config_error(write(tmp_path, BASE + "learning_rate = -1\n"))
    assert "key 'train.learning_rate': got -1 (int); expected greater than 0" in message


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[model]\nbase = "x"\n\n[train\noutput_dir = "out"\n')
    message = config_error(path)
    assert str(path) in message and "TOML syntax error" in message and "line 4" in message


def test_missing_required_key_and_table(tmp_path):
    message = config_error(write(tmp_path, '[model]\nbase = "x"\n\n[train]\nmax_steps = 3\n'))
    assert "missing required key 'train.output_dir'" in message
    message = config_error(write(tmp_path, '[train]\noutput_dir = "out"\n'))
    assert "missing required table [model]" in message


def test_missing_file(tmp_path):
    assert "config file not found" in config_error(tmp_path / "nope.toml")


def test_plugins_must_be_a_list_of_names(tmp_path):
    assert "expected a list of plugin names" in config_error(write(tmp_path, 'plugins = "faq"\n' + BASE))


def test_a_table_of_a_disabled_plugin_says_to_enable_it(tmp_path, faq):
    message = config_error(write(tmp_path, BASE + "\n[faq]\nstop_at_loss = 1.0\n"))
    assert 'table [faq] belongs to the plugin "faq", which is not enabled' in message
    assert 'plugins = ["faq"]' in message


def test_a_format_of_a_disabled_plugin_says_to_enable_it(tmp_path, faq):
    path = write(tmp_path, BASE + '\n[[datasets]]\npath = "a.jsonl"\nformat = "faq"\n')
    message = config_error(path)
    assert f"{path}: datasets.0.format:" in message
    assert 'format "faq" is provided by the plugin "faq", which is not enabled' in message


def test_an_unknown_method_lists_the_available_ones(tmp_path):
    message = config_error(write(tmp_path, BASE + 'method = "sfft"\n'))
    assert "train.method" in message and 'unknown method "sfft" (did you mean "sft"?)' in message


def test_plugin_validate_config_errors_get_the_file(tmp_path, monkeypatch):
    write(
        tmp_path,
        """
        from ftcore.errors import ConfigError
        from ftcore.hookspecs import hookimpl

        @hookimpl
        def validate_config(config):
            if config.train.max_steps == 13:
                raise ConfigError("max_steps = 13 is unlucky", key="train.max_steps")
        """,
        "inhouse_checks/plugin.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, 'plugins = ["inhouse_checks.plugin"]\n' + BASE + "max_steps = 13\n")
    assert config_error(path) == f"{path}: train.max_steps: max_steps = 13 is unlucky"


def test_inhouse_plugin_table_is_named_by_its_name_attribute(tmp_path, monkeypatch):
    write(
        tmp_path,
        """
        from ftcore.config import Section
        from ftcore.hookspecs import hookimpl

        name = "house"

        class HouseSection(Section):
            level: int = 1

        @hookimpl
        def config_section():
            return HouseSection
        """,
        "inhouse_table/plugin.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config, plugins = validate_config(
        {**read_toml(write(tmp_path, BASE)), "plugins": ["inhouse_table.plugin"], "house": {"level": 3}}
    )
    assert config.house.level == 3 and plugins.enabled == ["house"]


def test_a_plugin_table_must_be_a_section(tmp_path, monkeypatch):
    write(
        tmp_path,
        """
        from pydantic import BaseModel
        from ftcore.hookspecs import hookimpl

        class Loose(BaseModel):  # ignores unknown keys: ftcore refuses it
            level: int = 1

        @hookimpl
        def config_section():
            return Loose
        """,
        "inhouse_loose/plugin.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginError,
        match=r"plugin 'inhouse_loose.plugin': config_section\(\) returned .*ftcore.config.Section",
    ):
        validate_config({**read_toml(write(tmp_path, BASE)), "plugins": ["inhouse_loose.plugin"]})
