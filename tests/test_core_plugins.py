"""Plugin discovery and every plugin error, with real distributions pip-installed from tests/fixtures."""

import json
import textwrap

import pytest
from ftcore.config import load_config
from ftcore.errors import PluginError
from ftcore.methods import Run
from ftcore.plugins import Plugins, describe_installed, installed_plugins

CONFIG = """
plugins = {plugins}

[model]
base = "org/model"

[train]
output_dir = "out"

[[datasets]]
path = "qa.jsonl"
format = "faq"
"""


@pytest.fixture
def sites(monkeypatch, plugin_sites):
    """Put installed fixture distributions on sys.path: ``sites("faq", "badplugins")``."""

    def add(*names):
        for name in names:
            monkeypatch.syspath_prepend(str(plugin_sites[name]))

    return add


def plugin_error(*enabled) -> str:
    with pytest.raises(PluginError) as info:
        Plugins(list(enabled))
    return str(info.value)


def test_discovered_through_entry_points_without_importing(sites):
    sites("faq")
    entry_point = installed_plugins()["faq"]
    assert entry_point.value == "ftcore_faq.plugin" and entry_point.dist.name == "ftcore-faq"


def test_enabled_plugin_contributes_table_registries_and_callbacks(sites, tmp_path):
    sites("faq")
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(plugins='["faq"]') + "\n[faq]\nstop_at_loss = 0.5\n")
    (tmp_path / "qa.jsonl").touch()
    config, plugins = load_config(path)
    assert plugins.enabled == ["faq"] and config.faq.stop_at_loss == 0.5
    info = plugins.infos["faq"]
    assert (info.distribution, info.version, info.builtin) == ("ftcore-faq", "0.1.0", False)
    assert plugins.registry("format").owner("faq") == "faq"
    assert plugins.registry("reward").get("faq_exact")(["Paris.", "Rome"], answer=["paris", "Paris"]) == [
        1.0,
        0.0,
    ]
    run = Run(config=config, plugins=plugins, output_dir=tmp_path / "out")
    (callbacks,) = [c for c in plugins.hook.trainer_callbacks(config=config, run=run) if c]
    from transformers import TrainerControl, TrainerState, TrainingArguments

    control = TrainerControl()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    callbacks[0].on_log(args, TrainerState(), control, logs={"loss": 0.9})
    assert not control.should_training_stop
    callbacks[0].on_log(args, TrainerState(), control, logs={"loss": 0.4})
    assert control.should_training_stop


def test_enabling_by_dotted_module_path(sites):
    sites("faq")
    plugins = Plugins(["ftcore_faq.plugin"])
    assert plugins.enabled == ["ftcore_faq.plugin"]
    assert plugins.registry("format").owner("faq") == "ftcore_faq.plugin"


def test_enabling_twice_registers_once(sites):
    sites("faq")
    plugins = Plugins(["faq", "faq", "ftcore_faq.plugin"])
    assert plugins.enabled == ["faq"]


def test_unknown_name_lists_the_installed_plugins(sites):
    sites("faq")
    message = plugin_error("fqa")
    assert message.startswith("plugin 'fqa': not installed (did you mean \"faq\"?)")
    assert "Installed plugins:" in message and "faq" in message.split("Installed plugins:")[1]


def test_unimportable_dotted_path():
    message = plugin_error("no_such_house.plugin")
    assert "plugin 'no_such_house.plugin': failed to import" in message and "ModuleNotFoundError" in message


def test_import_failure_names_distribution_and_exception(sites):
    sites("badplugins")
    message = plugin_error("broken")
    assert message.startswith("plugin 'broken': failed to import (distribution 'ftcore-badplugins'")
    assert "ModuleNotFoundError: No module named 'ftcore_no_such_dependency'" in message


def test_hook_implementation_matching_no_spec(sites):
    sites("badplugins")
    message = plugin_error("misspelt")
    assert message.startswith(
        "plugin 'misspelt': its hook implementation 'register_format' matches no hook spec"
    )
    assert '(did you mean "register_formats"?)' in message


def test_hook_implementation_with_an_argument_its_spec_lacks(sites):
    sites("badplugins")
    message = plugin_error("badargs")
    assert message.startswith("plugin 'badargs': invalid hook implementation")
    assert "strict" in message


def test_duplicate_registry_name_names_both_plugins(sites):
    sites("faq", "badplugins")
    plugins = Plugins(["faq", "dupformat"])
    with pytest.raises(PluginError, match=r"format 'faq' is registered by both 'faq' and 'dupformat'"):
        plugins.registry("format")


def test_format_and_reward_of_a_disabled_plugin_say_which_to_enable(sites):
    sites("faq")
    plugins = Plugins([])
    for kind, name in [("format", "faq"), ("reward", "faq_exact")]:
        with pytest.raises(PluginError) as info:
            plugins.registry(kind).get(name)
        assert f'{kind} "{name}" is provided by the plugin "faq", which is not enabled' in str(info.value)
        assert 'plugins = ["faq"]' in str(info.value)


def test_a_name_several_disabled_plugins_provide(sites):
    sites("faq", "badplugins")  # dupformat registers "faq" too; the broken plugins do not get in the way
    with pytest.raises(PluginError) as info:
        Plugins([]).registry("format").get("faq")
    assert str(info.value) == (
        'format "faq" is provided by the plugins "dupformat", "faq", which are not enabled: add one of them to plugins.'
    )


def test_unknown_registry_name_lists_what_is_available(sites):
    sites("faq")
    with pytest.raises(
        PluginError,
        match=r'unknown reward "faq_exactly" \(did you mean "faq_exact"\?\)\. Available: faq_exact',
    ):
        Plugins(["faq"]).registry("reward").get("faq_exactly")


def test_registered_import_string_that_fails_names_the_plugin(tmp_path, monkeypatch):
    (tmp_path / "inhouse_rewards.py").write_text(
        textwrap.dedent(
            """
            from ftcore.hookspecs import hookimpl

            @hookimpl
            def register_rewards(register):
                register("gone", "inhouse_rewards:missing_function")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "house.py").write_text("from inhouse_rewards import *  # noqa\nname = 'house'\n")
    registry = Plugins(["pkg.house"]).registry("reward")
    with pytest.raises(
        PluginError,
        match=r"plugin 'house': cannot import reward 'gone' from 'inhouse_rewards:missing_function'",
    ):
        registry.get("gone")


def test_listing_reports_broken_plugins_and_keeps_the_rest(sites):
    sites("faq", "badplugins")
    infos = {info.name: info for info in describe_installed()}
    assert {"core.formats", "core.model", "core.sft"} <= {n for n, i in infos.items() if i.builtin}
    assert infos["faq"].config_table == "faq" and infos["faq"].error is None
    assert set(infos["faq"].hooks) == {
        "checkpoint_state", "config_section", "patch_model", "register_commands", "register_formats",
        "register_rewards", "restore_checkpoint_state", "trainer_callbacks", "validate_config",
    }  # fmt: skip
    for name in ("broken", "misspelt", "badargs"):
        assert infos[name].error.startswith(f"plugin '{name}':")
    assert infos["dupformat"].error is None  # a duplicate shows only when both are enabled


def test_trace_hooks_prints_calls_implementations_and_durations(ftcore_cli, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(plugins='["faq"]'))
    (tmp_path / "qa.jsonl").touch()
    result = ftcore_cli("validate", path, sites=["faq"], env={"FTCORE_TRACE_HOOKS": "1"})
    assert result.returncode == 0, result.stderr
    trace = [line for line in result.stderr.splitlines() if line.startswith("[ftcore hook]")]
    assert "[ftcore hook] config_section() -> [faq]" in trace
    assert "[ftcore hook] register_formats(register) -> [faq]" in trace
    assert any(
        line.startswith("[ftcore hook] validate_config ok in ") and line.endswith(" ms") for line in trace
    )
    quiet = ftcore_cli("validate", path, sites=["faq"])
    assert "[ftcore hook]" not in quiet.stderr


def test_cli_lists_the_installed_fixture_plugin(ftcore_cli):
    result = ftcore_cli("plugins", "--json", sites=["faq"])
    assert result.returncode == 0, result.stderr
    (faq,) = [p for p in json.loads(result.stdout) if p["name"] == "faq"]
    assert faq == {
        "name": "faq", "module": "ftcore_faq.plugin", "distribution": "ftcore-faq", "version": "0.1.0",
        "builtin": False, "config_table": "faq", "error": None,
        "hooks": ["checkpoint_state", "config_section", "patch_model", "register_commands", "register_formats",
                  "register_rewards", "restore_checkpoint_state", "trainer_callbacks", "validate_config"],
    }  # fmt: skip


def test_plugin_cli_command(ftcore_cli, tmp_path):
    assert "faq-check" in ftcore_cli("--help", sites=["faq"]).stdout
    assert "faq-check" not in ftcore_cli("--help").stdout
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        '{"question": "Capital of France?", "answer": "Paris"}\n{"question": "2 + 2?", "answer": "4"}\n'
    )
    result = ftcore_cli("faq-check", rows, sites=["faq"])
    assert (result.returncode, result.stdout) == (0, f"{rows}: 2 question/answer rows\n")
    rows.write_text(
        '{"question": "Capital of France?", "answer": "Paris"}\n{"question": "2 + 2?", "answer": ""}\n'
    )
    result = ftcore_cli("faq-check", rows, sites=["faq"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{rows}, row 2: not a question/answer row: answer must be a non-empty string" in result.stderr


def test_plugin_format_through_the_registry(sites):
    sites("faq")
    faq = Plugins(["faq"]).registry("format").get("faq")
    assert faq.schema == "prompt_completion"
    row = faq({"question_prefix": "Q: ", "answer_prefix": " A: "}).convert(
        {"question": " Why? ", "answer": "Because."}
    )
    assert row == {"prompt": "Q: Why? A:", "completion": " Because."}  # the space trains with the answer


def test_broken_plugins_warn_but_the_cli_still_works(ftcore_cli):
    result = ftcore_cli("plugins", sites=["badplugins"])
    assert result.returncode == 0
    assert "warning: plugin 'broken': failed to import" in result.stderr
    assert "broken (ftcore-badplugins 0.0.1): plugin 'broken': failed to import" in result.stdout
    schema = ftcore_cli("schema", "--section", "train", sites=["badplugins"])
    assert schema.returncode == 0 and "warning: plugin 'misspelt'" in schema.stderr
    assert json.loads(schema.stdout)["properties"]["train"]
