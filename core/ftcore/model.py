"""The model and tokenizer of a run: loading through the model hooks, peft adapters, saving.

``load_model_and_tokenizer`` follows one order (see ``hookspecs.py``): read the model config ->
``before_model_load`` -> default load kwargs -> ``model_load_kwargs`` -> ``load_model`` (the HF
loader is the built-in, last implementation) -> resize embeddings for added tokens ->
``patch_model`` -> adapter (``[adapter]``, peft) -> ``after_model_load``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftcore.errors import ConfigError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from ftcore.config import Config
    from ftcore.methods import Run
    from ftcore.plugins import Plugins


def check_model_ref(ref: str, key: str, config: Config | None = None) -> str:
    """A local folder must exist (never looked up on the hub); a hub id is returned as is."""
    if os.path.isabs(ref) and not Path(ref).is_dir():
        raise ConfigError(
            f"{ref} is not a folder (local paths are never looked up on the Hugging Face hub); fix the path",
            file=config.source if config else None,
            key=key,
        )
    return ref


def _load_error(ref: str, key: str, config: Config | None, exc: Exception) -> ConfigError:
    where = "folder" if os.path.isabs(ref) else "Hugging Face hub id (no local folder has that name)"
    return ConfigError(
        f"cannot load {ref!r} as a {where}: {type(exc).__name__}: {exc}",
        file=config.source if config else None,
        key=key,
    )


def resolve_chat_template(value: str, key: str = "model.chat_template", source: str | None = None) -> str:
    """A template name, an inline Jinja template, or a ``.jinja`` file -> the template text."""
    from ftcore.chat_templates import TEMPLATES

    if value.strip().endswith(".jinja"):
        try:
            return Path(value.strip()).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the chat template file: {exc}", file=source, key=key) from None
    if "{{" in value or "{%" in value:
        return value
    if value in TEMPLATES:
        return TEMPLATES[value]
    raise ConfigError(
        f"unknown chat template {value!r}{did_you_mean(value, TEMPLATES)}; use a name ({', '.join(TEMPLATES)}), "
        "an inline Jinja template, or a path to a .jinja file",
        file=source,
        key=key,
    )


def load_tokenizer(config: Config):
    """The tokenizer with the configured chat template, added special tokens and a pad token.

    Loads no model weights (``ftcore preprocess`` uses it alone).
    """
    model = config.model
    key = "model.tokenizer" if model.tokenizer else "model.base"
    source = check_model_ref(model.tokenizer or model.base, key, config)
    try:
        if generic_tokenizer_folder(source, model):
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            tokenizer = TokenizersBackend.from_pretrained(source)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=model.trust_remote_code, config=config_stand_in(source, model)
            )
    except (OSError, ValueError) as exc:
        raise _load_error(source, key, config, exc) from None
    if model.chat_template:
        tokenizer.chat_template = resolve_chat_template(model.chat_template, source=config.source)
    if model.special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(model.special_tokens)})
    if model.pad_token:
        if model.pad_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"pad_token": model.pad_token})
        tokenizer.pad_token = model.pad_token
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                "the tokenizer has neither a pad nor an eos token: set model.pad_token",
                file=config.source,
                key="model.pad_token",
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
GENERIC_TOKENIZER_MODEL_TYPES = ("llama", "qwen2_moe", "qwen3", "qwen3_moe")
"""Model types for which ``AutoTokenizer`` loads a folder that names a generic tokenizer class as
that generic class (``TokenizersBackend``); ``tests/test_data_cache.py`` checks each against it."""


def generic_tokenizer_folder(source: str, model) -> bool:
    """True when ``source`` is a local folder whose tokenizer ``AutoTokenizer`` would load as the
    generic ``TokenizersBackend``: a ``tokenizer.json``, a generic ``tokenizer_class``, no remote code,
    and a model type of ``GENERIC_TOKENIZER_MODEL_TYPES``. Loading that class directly skips
    ``AutoTokenizer``'s module, which imports torch (seconds of start-up for ``ftcore preprocess``)."""
    folder = Path(source)
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        not model.trust_remote_code
        and (folder / "tokenizer.json").is_file()
        and settings.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
        and "auto_map" not in settings
        and "auto_map" not in values
        and values.get("model_type") in GENERIC_TOKENIZER_MODEL_TYPES
    )


def config_stand_in(source: str, model) -> Any:
    """What ``AutoTokenizer`` reads of a model config, without importing the model's config class.

    ``AutoTokenizer`` loads the model config only to read its model type, its class name and a few
    attributes; importing a model's config class imports transformers' model-loading code
    (conversion mapping, DTensor sharding, torch.compile), seconds of start-up that tokenizing
    does not need. The stand-in is an object of a class with the config class's name (every
    lookup ``AutoTokenizer`` makes is by that name) holding ``config.json``'s values, so the
    tokenizer class chosen is the one the real config gives. None (the real config, loaded by
    ``AutoTokenizer``) for remote code, unknown or encoder-decoder model types, or no config.json.
    """
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        values, _ = PreTrainedConfig.get_config_dict(source)
    except (OSError, ValueError):
        return None
    model_type = values.get("model_type")
    if (
        model.trust_remote_code
        or "auto_map" in values
        or model_type not in CONFIG_MAPPING_NAMES
        or model_type == "encoder-decoder"
    ):
        return None
    stand_in = type(CONFIG_MAPPING_NAMES[model_type], (), {"model_type": model_type})()
    vars(stand_in).update(values, _name_or_path=str(source))
    return stand_in


def load_model_config(config: Config):
    """The ``PretrainedConfig`` of ``model.base``."""
    from transformers import AutoConfig

    base = check_model_ref(config.model.base, "model.base", config)
    try:
        return AutoConfig.from_pretrained(base, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(base, "model.base", config, exc) from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SAMPLES, SAMPLE_BYTES = 16, 4096


def base_model_fingerprint(config: Config) -> str | None:
    """A hash of the base model's files, cheap for any size: config.json, and each weight file's name,
    size, safetensors header and 16 sampled 4 KiB blocks. None when a hub model is not in the local cache."""
    import hashlib

    folder = _local_model_folder(config.model.base)
    if folder is None:
        return None
    hasher = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json":
            hasher.update(b"config.json" + file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES or file.name.endswith(".index.json"):
            size = file.stat().st_size
            hasher.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as handle:
                if file.suffix == ".safetensors":
                    header = int.from_bytes(handle.read(8), "little")
                    hasher.update(handle.read(min(header, size)))
                for k in range(SAMPLES):
                    handle.seek(size * k // SAMPLES)
                    hasher.update(handle.read(SAMPLE_BYTES))
    return hasher.hexdigest()[:16]


def _local_model_folder(base: str) -> Path | None:
    """The folder holding ``base``: itself, or a hub model's snapshot in the local cache."""
    if os.path.isabs(base):
        return Path(base)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def choose_dtype(config: Config):
    """``model.dtype`` as a torch dtype; auto = bfloat16 on GPUs that support it, else float32."""
    import torch

    if config.model.dtype != "auto":
        return getattr(torch, config.model.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def choose_attention(config: Config, model_config=None) -> str:
    """The ``attn_implementation`` for ``model.attention``; ``auto`` and ``varlen`` per ``ftcore.speed``."""
    from ftcore.speed import resolve_attention

    return resolve_attention(config, model_config)


def default_load_kwargs(config: Config, model_config) -> dict[str, Any]:
    """The ``from_pretrained`` / ``from_config`` arguments before plugins adjust them."""
    kwargs = {
        "config": model_config,
        "dtype": choose_dtype(config),
        "attn_implementation": choose_attention(config, model_config),
        "trust_remote_code": config.model.trust_remote_code,
    }
    if config.adapter and config.adapter.kind == "qlora":
        kwargs.update(qlora_kwargs(config, kwargs["dtype"]))
    return kwargs


def qlora_kwargs(config: Config, dtype) -> dict[str, Any]:
    """A bitsandbytes 4-bit (NF4, double quantization) config on this process's GPU."""
    import torch

    problem = None
    if not torch.cuda.is_available():
        problem = "a CUDA GPU, and this machine has none"
    elif importlib.util.find_spec("bitsandbytes") is None:
        problem = "the bitsandbytes package (pip install bitsandbytes)"
    if problem:
        raise ConfigError(
            f'kind = "qlora" (a 4-bit base through bitsandbytes) needs {problem}; use kind = "lora" instead',
            file=config.source,
            key="adapter.kind",
        )
    from transformers import BitsAndBytesConfig

    compute_dtype = dtype if dtype != torch.float32 else torch.bfloat16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": quantization, "dtype": compute_dtype, "device_map": {"": _local_device()}}


def _local_device() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def load_hf_model(config: Config, kwargs: dict[str, Any]):
    """The built-in loader: ``from_pretrained``, or ``from_config`` for ``init = "random"``."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    if config.model.init == "random":
        model_config = kwargs.pop("config")
        kwargs.pop("device_map", None)
        return AutoModelForCausalLM.from_config(model_config, **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(config.model.base, **kwargs)
    except OSError as exc:
        raise _load_error(config.model.base, "model.base", config, exc) from None


def load_model_and_tokenizer(config: Config, plugins: Plugins, run: Run | None = None):
    """Build the model of ``config`` through the model hooks; returns ``(model, tokenizer)``.

    ``run`` is the run context the hooks receive (a new one for ``config.train.output_dir`` when
    not given); its ``tokenizer`` and ``model`` are set as loading goes.
    """
    if run is None:
        from ftcore.methods import Run

        run = Run(config=config, plugins=plugins, output_dir=Path(config.train.output_dir))
    tokenizer = run.tokenizer = load_tokenizer(config)
    model_config = load_model_config(config)
    plugins.hook.before_model_load(config=config, model_config=model_config, run=run)
    kwargs = default_load_kwargs(config, model_config)
    plugins.hook.model_load_kwargs(config=config, kwargs=kwargs, run=run)
    model = run.model = plugins.hook.load_model(config=config, kwargs=kwargs, run=run)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for settings in (model.config, model.generation_config):
        if settings is not None:
            settings.pad_token_id = tokenizer.pad_token_id
    plugins.hook.patch_model(config=config, model=model, run=run)
    if config.model.gradient_checkpointing:
        model.config.use_cache = False
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": config.model.use_reentrant},
            every_n_layers=config.model.checkpoint_every_n_layers,
        )
    if config.adapter:
        model = run.model = add_adapter(config, model, tokenizer)
    plugins.hook.after_model_load(config=config, model=model, run=run)
    return model, tokenizer


def add_adapter(config: Config, model, tokenizer):
    """Wrap ``model`` in the peft adapter of ``[adapter]`` (new, or continued from ``init_from``)."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    adapter = config.adapter
    if adapter.kind == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": config.model.use_reentrant},
        )
    elif config.model.gradient_checkpointing and config.model.use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints need inputs that require grad
    if adapter.init_from:
        check_continued_adapter(config)
        model = PeftModel.from_pretrained(model, adapter.init_from, is_trainable=True)
    else:
        check_targets(config, model)
        try:
            model = get_peft_model(model, lora_config(config, model, tokenizer))
        except ValueError as exc:
            raise ConfigError(f"peft refused the adapter: {exc}", file=config.source, key="adapter") from None
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = config.model.base
    return model


def lora_config(config: Config, model, tokenizer):
    """The peft ``LoraConfig`` of ``[adapter]``; added special tokens get trainable embedding rows."""
    from peft import LoraConfig

    adapter = config.adapter
    targets = adapter.targets
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets if targets or not adapter.target_parameters else None,
        target_parameters=list(adapter.target_parameters) or None,
        modules_to_save=list(adapter.modules_to_save) or None,
        use_dora=adapter.kind == "dora",
        trainable_token_indices=trainable_token_indices(config, model, tokenizer),
        task_type="CAUSAL_LM",
    )


def trainable_token_indices(config: Config, model, tokenizer) -> dict[str, list[int]] | None:
    """Embedding rows of ``model.special_tokens`` to train under the adapter (input and untied output)."""
    if not config.model.special_tokens:
        return None
    ids = sorted(set(tokenizer.convert_tokens_to_ids(list(config.model.special_tokens))))
    names = {id(module): name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    indices = {names[id(layer)]: ids for layer in layers}
    trained_fully = set(config.adapter.modules_to_save)
    if any(name.rsplit(".", 1)[-1] in trained_fully or name in trained_fully for name in indices):
        return None
    return indices


def check_targets(config: Config, model) -> None:
    """Every ``targets`` name and ``target_parameters`` entry must match the model; clear errors if not."""
    adapter = config.adapter
    modules = dict(model.named_modules())
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, m in modules.items() if name and not list(m.children())}
    )
    if isinstance(adapter.targets, list):
        for target in adapter.targets:
            if not any(name == target or name.endswith("." + target) for name in modules):
                raise ConfigError(
                    f"no module is named {target!r}{did_you_mean(target, leaves)}; module names: {', '.join(leaves)}",
                    file=config.source,
                    key="adapter.targets",
                )
    elif adapter.targets != "all-linear":
        pattern = re.compile(adapter.targets)  # its syntax is checked with the config
        if not any(pattern.fullmatch(name) for name in modules):
            example = next(name for name in reversed(modules) if name and not list(modules[name].children()))
            raise ConfigError(
                f"the regex {adapter.targets!r} matches no module; it must match whole module names such as {example!r}",
                file=config.source,
                key="adapter.targets",
            )
    params = [
        f"{name}.{p}" if name else p
        for name, m in modules.items()
        for p, _ in m.named_parameters(recurse=False)
    ]
    for target in adapter.target_parameters:
        if not any(key == target or key.endswith("." + target) for key in params):
            short = sorted({".".join(key.rsplit(".", 2)[-2:]) for key in params})
            raise ConfigError(
                f"no parameter matches {target!r}{did_you_mean(target, short)} (write MODULE.PARAMETER, "
                f"e.g. experts.gate_up_proj)",
                file=config.source,
                key="adapter.target_parameters",
            )


def check_continued_adapter(config: Config) -> None:
    """``init_from`` must hold a LoRA adapter agreeing with the keys set in ``[adapter]``."""
    from peft import PeftConfig

    adapter = config.adapter
    try:
        saved = PeftConfig.from_pretrained(adapter.init_from)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{adapter.init_from} holds no peft adapter (adapter_config.json): {exc}",
            file=config.source,
            key="adapter.init_from",
        ) from None
    given = {"r": adapter.r, "alpha": adapter.alpha, "kind": adapter.kind == "dora"}
    found = {"r": saved.r, "alpha": saved.lora_alpha, "kind": bool(saved.use_dora)}
    for key in adapter.model_fields_set & set(given):
        if given[key] != found[key]:
            shown = ("dora" if found[key] else "lora") if key == "kind" else found[key]
            raise ConfigError(
                f"the adapter in init_from was trained with {key} = {shown!r}; remove adapter.{key} or set it to that",
                file=config.source,
                key=f"adapter.{key}",
            )


def save_pretrained(model, tokenizer, folder: str | Path) -> Path:
    """Save the model (only the adapter for a peft model) and the tokenizer with its chat template.

    Hugging Face format with safetensors weights: the folder reloads with ``from_pretrained``
    (``AutoPeftModelForCausalLM`` for an adapter, whose config names its base model).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
