"""Hook implementations of the `ebft` plugin (light: no torch, transformers or trl at import)."""

from __future__ import annotations

from ftcore.hookspecs import hookimpl

from ftcore_ebft.config import EBFTSection, check

FORMATS = {
    "ebft_opencode": "ftcore_ebft.formats:OpenCode",
    "ebft_chat": "ftcore_ebft.formats:Chat",
    "ebft_reasoning": "ftcore_ebft.formats:Reasoning",
    "ebft_strided": "ftcore_ebft.formats:Strided",
}


@hookimpl
def config_section():
    return EBFTSection


@hookimpl
def register_methods(register):
    register("ebft", "ftcore_ebft.method:EBFTMethod")


@hookimpl
def register_formats(register):
    for name, target in FORMATS.items():
        register(name, target)


@hookimpl
def validate_config(config):
    if config.train.method == "ebft":
        check(config)
