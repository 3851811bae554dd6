"""``ftcore merge-lora``: fold a LoRA / DoRA adapter into its base model, one weight group at a time.

The base model is never held whole. For each safetensors shard of the base, the modules whose
weights it holds are loaded into a model built on the meta device (transformers' own key
conversion, e.g. per-expert tensors into fused expert parameters), the adapter is attached with
``PeftModel.from_pretrained`` and ``merge_and_unload`` does the merge with peft's own math:
layers left on the meta device cost nothing. The merged weights are converted back to the
checkpoint's key layout (as ``save_pretrained`` does) and written as one output shard. Peak
memory is about two shards, and the result equals peft's in-memory merge bit for bit.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from ftcore.errors import ConfigError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def merge_lora(adapter_dir: str | Path, out_dir: str | Path | None = None, log=print) -> Path:
    """Merge the adapter saved in ``adapter_dir`` into its base; returns the merged model folder."""
    from peft import PeftConfig, PeftType
    from transformers import AutoConfig, AutoTokenizer

    adapter_dir = Path(adapter_dir).resolve()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(
            f"{adapter_dir} holds no adapter_config.json: there is no adapter to merge "
            "(a full fine-tune is saved as a complete model already)"
        )
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    if peft_config.peft_type != PeftType.LORA:
        raise ConfigError(
            f"{adapter_dir} holds a {peft_config.peft_type} adapter; merge-lora merges LoRA and DoRA"
        )
    base_dir = base_model_folder(peft_config.base_model_name_or_path, adapter_dir)
    out = Path(out_dir).resolve() if out_dir else adapter_dir / "merged"
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: choose another --out or delete it")

    checkpoint = Checkpoint(base_dir)
    model_config = AutoConfig.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if _has_tokenizer(adapter_dir) else base_dir)
    vocab_size = max(len(tokenizer), model_config.vocab_size)
    groups = checkpoint.module_groups(meta_model(model_config, vocab_size))
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, keys in enumerate(groups, start=1):
        name = SAFE_WEIGHTS if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        log(f"merging {len(keys)} tensors into {name}")
        tensors = merge_group(checkpoint, keys, model_config, vocab_size, adapter_dir)
        _save(tensors, out / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    model_config.vocab_size = vocab_size
    model_config.save_pretrained(out)
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", out / "generation_config.json")
    tokenizer.save_pretrained(out)
    return out


def base_model_folder(base: str | None, adapter_dir: Path) -> Path:
    """The local folder of the adapter's base model (a hub id is fetched or found in the HF cache)."""
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    if Path(base).is_absolute() or Path(base).exists():
        if not Path(base).is_dir():
            raise ConfigError(
                f"the base model {base} named in {adapter_dir}/adapter_config.json is not a folder; "
                "set base_model_name_or_path there to where the base model is now"
            )
        return Path(base)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as exc:
        raise ConfigError(f"cannot fetch the base model {base!r} from the Hugging Face hub: {exc}") from None


def meta_model(model_config, vocab_size: int):
    """The model architecture on the meta device (no memory), embeddings sized for ``vocab_size``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=model_config.dtype)
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


class Checkpoint:
    """The safetensors files of a model folder and the model parameter each tensor loads into."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / SAFE_INDEX).is_file():
            self.file_of = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
        elif (folder / SAFE_WEIGHTS).is_file():
            from safetensors import safe_open

            with safe_open(folder / SAFE_WEIGHTS, "pt") as f:
                self.file_of = dict.fromkeys(f.keys(), SAFE_WEIGHTS)
        else:
            raise ConfigError(
                f"{folder} holds no {SAFE_WEIGHTS} or {SAFE_INDEX}: merge-lora reads safetensors weights"
            )

    def module_groups(self, model) -> list[list[str]]:
        """Checkpoint keys grouped per base shard; a module's keys stay together (in its first shard's group)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        state = model.state_dict()
        module_of = {}
        for key in self.file_of:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
            module_of[key] = target.rpartition(".")[0]
        groups: dict[str, list[str]] = {}
        group_of_module: dict[str, str] = {}
        for key, file in sorted(self.file_of.items(), key=lambda item: (item[1], item[0])):
            group = group_of_module.setdefault(module_of[key], file)
            groups.setdefault(group, []).append(key)
        return list(groups.values())

    def read(self, keys: list[str], stack):
        """Lazy slices of ``keys`` (files stay open, memory-mapped, until ``stack`` closes)."""
        from safetensors import safe_open

        handles = {}
        slices = {}
        for key in keys:
            file = self.file_of[key]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(self.folder / file, "pt"))
            slices[key] = handles[file].get_slice(key)
        return slices


def merge_group(checkpoint: Checkpoint, keys: list[str], model_config, vocab_size: int, adapter_dir: Path):
    """Merge the modules holding ``keys``; returns their merged tensors under the checkpoint's keys."""
    from contextlib import ExitStack

    from peft import PeftModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model, revert_weight_conversion
    from transformers.modeling_utils import LoadStateDictConfig

    model = meta_model(model_config, vocab_size)
    load_config = LoadStateDictConfig(
        device_map={"": "cpu"}, dtype=model_config.dtype, weight_mapping=get_model_conversion_mapping(model)
    )
    with ExitStack() as stack:
        tensors = _pad_resized(model, checkpoint.read(keys, stack))
        info, _ = convert_and_load_state_dict_in_model(model, tensors, load_config)
        del tensors
    if info.conversion_errors or info.mismatched_keys:
        raise ConfigError(
            f"cannot load base weights {sorted(info.mismatched_keys)}: {info.conversion_errors}"
        )
    model.tie_weights()
    loaded = [name for name, tensor in model.state_dict().items() if not tensor.is_meta]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta parameter.*")  # layers outside this group
        warnings.filterwarnings("ignore", category=FutureWarning)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    state = merged.state_dict()
    reverted = revert_weight_conversion(merged, {name: state[name] for name in loaded})
    missing = sorted(set(keys) - set(reverted))
    if missing:
        raise ConfigError(
            f"{checkpoint.folder} holds tensors the model does not load, e.g. {missing[:3]} (a quantized or "
            "otherwise converted checkpoint?); merge into the unquantized base model"
        )
    # only the checkpoint's own keys: a tied copy (lm_head) stays unsaved, as in the base
    return {key: reverted[key].contiguous() for key in keys}


def _pad_resized(model, slices: dict):
    """Embedding rows grown by the adapter's added tokens: the base rows padded with zeros.

    peft overwrites the new rows (the saved embedding layers or trainable-token rows), as it does
    in memory after ``resize_token_embeddings``.
    """
    import torch

    state = model.state_dict()
    for key, value in slices.items():
        target = state.get(key)
        shape = value.get_shape()
        if (
            target is not None
            and len(shape) == 2
            and shape[0] < target.shape[0]
            and shape[1] == target.shape[1]
        ):
            tensor = value[:]
            padded = torch.zeros((target.shape[0], shape[1]), dtype=tensor.dtype)
            padded[: shape[0]] = tensor
            slices[key] = padded
    return slices


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
