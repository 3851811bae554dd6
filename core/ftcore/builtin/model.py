"""Built-in Hugging Face model loader (the last ``load_model``) and config checks of [model]/[adapter]."""

import importlib.util
import re

from ftcore.errors import ConfigError
from ftcore.hookspecs import hookimpl


@hookimpl
def validate_config(config):
    model, adapter = config.model, config.adapter
    if model.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            'attention = "flash_attention_2" needs the flash-attn package; use "sdpa" or "flex_attention"',
            key="model.attention",
        )
    if adapter is None:
        return
    if model.init == "random":
        raise ConfigError(
            'init = "random" with an [adapter]: the adapter would be saved against weights that exist nowhere; '
            "remove [adapter] to train the whole model",
            key="adapter",
        )
    if adapter.target_parameters and (adapter.dropout or adapter.kind == "dora"):
        raise ConfigError(
            'target_parameters (LoRA on 3-D parameters) works with neither dropout > 0 nor kind = "dora" in peft; '
            'set dropout = 0 and kind = "lora"',
            key="adapter.target_parameters",
        )
    if isinstance(adapter.targets, str) and adapter.targets != "all-linear":
        try:
            re.compile(adapter.targets)
        except re.error as exc:
            raise ConfigError(f"invalid regex {adapter.targets!r}: {exc}", key="adapter.targets") from None
    if adapter.targets == [] and not adapter.target_parameters and not adapter.modules_to_save:
        raise ConfigError(
            "targets = [] leaves nothing to train: name modules, target_parameters or modules_to_save",
            key="adapter.targets",
        )


@hookimpl(trylast=True)
def load_model(config, kwargs):
    from ftcore.model import load_hf_model

    return load_hf_model(config, kwargs)
