"""The ``ftcore`` command line. Heavy libraries are imported inside the commands that need them."""

from __future__ import annotations

import json
import sys

import click

from ftcore import __version__
from ftcore.errors import UserError


class FtcoreGroup(click.Group):
    """Turns user errors and file errors into a message and exit code 2, or 3 for a diverged run
    (``--debug`` shows the traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.params.get("debug"):
                raise
            click.secho(f"error: {exc}", fg="red", err=True)
            _exit(ctx, exc.exit_code)
        except OSError as exc:  # a path the user gave or a disk they filled: unreadable, read-only, full
            if ctx.params.get("debug") or exc.filename is None:
                raise
            click.secho(f"error: {exc.filename}: {exc.strerror}", fg="red", err=True)
            _exit(ctx, 2)


def _exit(ctx, code: int):
    """Exit with ``code``; a worker of ``ftcore run --nproc`` also leaves it for its launcher (torchrun
    itself exits 1 whatever its workers' codes were)."""
    from ftcore.distributed import record_exit_code

    record_exit_code(code)
    ctx.exit(code)


overrides_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key (TOML literal), e.g. train.max_steps=10.",
)


@click.group(cls=FtcoreGroup)
@click.version_option(__version__, prog_name="ftcore")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def cli(debug):
    """ftcore: fine-tune Hugging Face causal LMs (SFT, LoRA/QLoRA/DoRA, DPO, online RL) with plugins."""
    from ftcore.hub import no_usage_calls

    no_usage_calls()


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@overrides_option
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Delete a non-empty output_dir before training.")
@click.option(
    "--force",
    is_flag=True,
    help="With --resume: accept a changed config, dataset or base model, or a checkpoint without optimizer state.",
)
@click.option("--nproc", type=int, default=None, help="Launch N processes (GPUs) through torchrun.")
def run(config_path, overrides, resume, overwrite, force, nproc):
    """Train with the config file CONFIG_PATH."""
    from ftcore.config import load_config
    from ftcore.hub import offline_unless_reachable
    from ftcore.lock import run_lock
    from ftcore.pipeline import check_config, check_output_dir

    config, plugins = load_config(config_path, overrides)
    check_config(config, plugins)  # what validate checks, in the same order
    with run_lock(config):  # before anything in output_dir is read, deleted or written
        check_output_dir(config, resume=resume, overwrite=overwrite)
        offline_unless_reachable(config.hub_ids())
        if nproc and nproc > 1:
            from ftcore.distributed import launch

            sys.exit(launch(config, config_path, sys.argv, nproc))
        from ftcore.distributed import end_process_group, quiet_replica
        from ftcore.pipeline import run_training

        quiet_replica()
        run_training(config, plugins, resume=resume, overwrite=overwrite, force=force)
        end_process_group()


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@overrides_option
def validate(config_path, overrides):
    """Validate CONFIG_PATH (every check that needs no weights and no data rows) and print the resolved config."""
    from ftcore.config import load_config
    from ftcore.pipeline import check_config

    config, plugins = load_config(config_path, overrides)
    check_config(config, plugins)
    click.echo(config.to_toml(), nl=False)


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@overrides_option
@click.option(
    "--show",
    default=0,
    type=click.IntRange(min=0),
    metavar="N",
    help="Print N samples with the trained tokens marked.",
)
def preprocess(config_path, overrides, show):
    """Tokenize, mask and pack the datasets of CONFIG_PATH into the data cache; print a summary."""
    from ftcore.config import load_config
    from ftcore.hub import offline_unless_reachable

    config, plugins = load_config(config_path, overrides)
    offline_unless_reachable(config.hub_ids())
    from ftcore.data.preview import preprocess as prepare

    for line in prepare(config, plugins, show, color=sys.stdout.isatty()):
        click.echo(line, color=sys.stdout.isatty())


@cli.command()
@click.option("--section", default=None, help="Only this table (model, train, or a plugin's table).")
@click.option(
    "--markdown",
    is_flag=True,
    help="The config reference in Markdown (docs/config.md) instead of JSON schema.",
)
def schema(section, markdown):
    """Print the JSON schema of the config (core tables and every installed plugin's table)."""
    from ftcore.config import config_reference, installed_config_model
    from ftcore.errors import ConfigError, did_you_mean

    model = installed_config_model(
        on_error=lambda exc: click.echo(f"warning: {exc}; its table is left out", err=True)
    )
    full = model.model_json_schema()
    props = full.get("properties", {})
    if section is not None and section not in props:
        raise ConfigError(f"no table {section!r}{did_you_mean(section, props)}; tables: {', '.join(props)}")
    if markdown:
        click.echo(config_reference(model, only=section), nl=False)
    elif section is None:
        click.echo(json.dumps(full, indent=2))
    else:
        click.echo(
            json.dumps({"properties": {section: props[section]}, "$defs": full.get("$defs", {})}, indent=2)
        )


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


@cli.command("merge-lora")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write the merged model (default: OUTPUT_DIR/merged).",
)
def merge_lora(output_dir, out):
    """Merge the LoRA/DoRA adapter in OUTPUT_DIR into its base model, shard by shard."""
    from transformers.utils import logging as hf_logging

    from ftcore.merge import merge_lora as merge

    hf_logging.disable_progress_bar()
    click.echo(f"merged model written to {merge(output_dir, out, log=click.echo)}")


def sampling_options(command):
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed, --chat-template, --system."""
    options = [
        click.option("--max-new-tokens", type=int, default=256, show_default=True),
        click.option(
            "--temperature", type=float, default=0.7, show_default=True, help="0 = greedy decoding."
        ),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
        click.option(
            "--chat-template",
            default=None,
            help="A template name (chatml, llama3), a .jinja file or inline Jinja.",
        ),
        click.option("--system", default=None, help="A system message."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("path")
@click.option("--prompt", required=True, help="The user message (or the text to continue with --raw).")
@click.option("--raw", is_flag=True, help="Continue the prompt as plain text, without the chat template.")
@sampling_options
def generate(path, prompt, raw, chat_template, system, **sampling):
    """Generate a reply from PATH: a trained output (merged or adapter), a model folder or a hub id."""
    from ftcore.generate import check_model_path

    check_model_path(path)
    from transformers import TextStreamer

    from ftcore.generate import Sampling, generate, load_for_inference, messages_for

    model, tokenizer = load_for_inference(path, chat_template)
    chat = not raw and bool(tokenizer.chat_template)
    request = (
        messages_for(tokenizer, path, system) + [{"role": "user", "content": prompt}] if chat else prompt
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate(model, tokenizer, request, Sampling(**sampling), streamer=streamer)


@cli.command()
@click.argument("path")
@sampling_options
def chat(path, chat_template, system, **sampling):
    """Chat with PATH in the terminal (/reset starts over, /exit or Ctrl-D quits)."""
    from ftcore.generate import check_model_path

    check_model_path(path)
    from transformers import TextStreamer

    from ftcore.generate import Sampling, generate, load_for_inference, messages_for

    model, tokenizer = load_for_inference(path, chat_template)
    messages = messages_for(tokenizer, path, system)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages_for(tokenizer, path, system)
        elif line:
            messages.append({"role": "user", "content": line})
            reply = generate(model, tokenizer, messages, Sampling(**sampling), streamer=streamer)
            messages.append({"role": "assistant", "content": reply})


def main():
    from ftcore.plugins import plugin_commands

    plugin_commands(cli)
    cli(prog_name="ftcore")


if __name__ == "__main__":
    main()
