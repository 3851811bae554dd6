"""The ``ftcore`` command line. Heavy libraries are imported inside the commands that need them."""

from __future__ import annotations

import json
import sys

import click

from ftcore import __version__
from ftcore.errors import UserError


class FtcoreGroup(click.Group):
    """Turns user errors into a message and exit code 2 (``--debug`` shows the traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.params.get("debug"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)


overrides_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (TOML literal), e.g. train.max_steps=10."
)


@click.group(cls=FtcoreGroup)
@click.version_option(__version__, prog_name="ftcore")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def cli(debug):
    """ftcore: fine-tune Hugging Face causal LMs (SFT, LoRA/QLoRA/DoRA, DPO, online RL) with plugins."""


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@overrides_option
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Delete a non-empty output_dir before training.")
@click.option("--force", is_flag=True, help="With --resume: accept a changed config or dataset.")
@click.option("--nproc", type=int, default=None, help="Launch N processes (GPUs) through torchrun.")
def run(config_path, overrides, resume, overwrite, force, nproc):
    """Train with the config file CONFIG_PATH."""
    from ftcore.config import load_config

    config, plugins = load_config(config_path, overrides)
    if nproc and nproc > 1:
        from ftcore.distributed import launch

        sys.exit(launch(config, config_path, sys.argv, nproc))
    from ftcore.pipeline import run_training

    run_training(config, plugins, resume=resume, overwrite=overwrite, force=force)


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@overrides_option
def validate(config_path, overrides):
    """Validate CONFIG_PATH and print the resolved config."""
    from ftcore.config import load_config

    config, _ = load_config(config_path, overrides)
    click.echo(config.to_toml(), nl=False)


@cli.command()
@click.option("--section", default=None, help="Only this table (model, train, or a plugin's table).")
@click.option("--markdown", is_flag=True, help="The config reference in Markdown (docs/config.md) instead of JSON schema.")
def schema(section, markdown):
    """Print the JSON schema of the config (core tables and every installed plugin's table)."""
    from ftcore.config import config_reference, installed_config_model
    from ftcore.errors import ConfigError, did_you_mean

    model = installed_config_model(on_error=lambda exc: click.echo(f"warning: {exc}; its table is left out", err=True))
    full = model.model_json_schema()
    props = full.get("properties", {})
    if section is not None and section not in props:
        raise ConfigError(f"no table {section!r}{did_you_mean(section, props)}; tables: {', '.join(props)}")
    if markdown:
        click.echo(config_reference(model, only=section), nl=False)
    elif section is None:
        click.echo(json.dumps(full, indent=2))
    else:
        click.echo(json.dumps({"properties": {section: props[section]}, "$defs": full.get("$defs", {})}, indent=2))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List built-in and installed plugins with their hooks and config tables."""
    from dataclasses import asdict

    from ftcore.plugins import describe_installed

    infos = describe_installed()
    if as_json:
        click.echo(json.dumps([asdict(info) for info in infos], indent=2))
        return
    for info in infos:
        kind = "built-in" if info.builtin else f"{info.distribution} {info.version}"
        table = f" [{info.config_table}]" if info.config_table else ""
        click.echo(f"{info.name} ({kind}){table}: {info.error or ', '.join(info.hooks)}")


@cli.command()
def env():
    """Print versions of ftcore, its plugins and the libraries it runs on."""
    from ftcore.environment import describe_environment

    for line in describe_environment():
        click.echo(line)


def main():
    from ftcore.plugins import plugin_commands

    plugin_commands(cli)
    cli(prog_name="ftcore")


if __name__ == "__main__":
    main()
