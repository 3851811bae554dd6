"""``ftcore generate`` and ``ftcore chat``: text from a trained output (merged or adapter) or a hub model."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ftcore.errors import ConfigError


@dataclass
class Sampling:
    """Generation settings; ``temperature = 0`` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def check_model_path(path: str) -> None:
    """Before torch loads: a path that is not a hub id must exist; a hub id needs the hub or the cache."""
    from ftcore.config import HUB_ID
    from ftcore.hub import offline_unless_reachable

    if Path(path).expanduser().exists():
        return
    if os.path.isabs(path) or path.startswith((".", "~")) or not HUB_ID.match(path):
        raise ConfigError(f"{path}: no such model folder (and not a Hugging Face hub id)")
    offline_unless_reachable([path])


def load_for_inference(path: str, chat_template: str | None = None):
    """``(model, tokenizer)`` from a model folder, an adapter folder (its base is loaded too) or a hub id.

    Quiets transformers' progress bars and warnings: the terminal is for the conversation.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load(path, chat_template)


def _load(path: str, chat_template: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer_source = path
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM, PeftConfig

        base = PeftConfig.from_pretrained(folder).base_model_name_or_path
        if os.path.isabs(base) and not Path(base).is_dir():
            raise ConfigError(
                f"the base model {base} named in {folder}/adapter_config.json is not a folder; "
                "fix base_model_name_or_path there, or merge the adapter on a machine that has the base"
            )
        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer_source = folder if (folder / "tokenizer_config.json").is_file() else base
    elif (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    elif folder.exists() or os.path.isabs(path) or path.startswith((".", "~")):
        checkpoints = sorted(folder.glob("checkpoints/*/")) if folder.is_dir() else []
        hint = f"; a checkpoint is a model too: {checkpoints[-1]}" if checkpoints else ""
        raise ConfigError(f"{folder} holds no model (config.json) or adapter (adapter_config.json){hint}")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as exc:
            raise ConfigError(
                f"{path!r} is no local folder and cannot be loaded from the hub: {exc}"
            ) from None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if chat_template:
        from ftcore.model import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(chat_template, key="--chat-template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def generate(model, tokenizer, prompt: str | list[dict], sampling: Sampling, streamer=None) -> str:
    """The reply to ``prompt``: chat messages (through the chat template) or raw text to continue."""
    import torch
    from transformers import set_seed

    from ftcore.chat_templates import END_OF_TURN

    if isinstance(prompt, list):
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        stops = [marker for marker in END_OF_TURN if marker in (tokenizer.chat_template or "")]
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
        stops = []
    inputs = inputs.to(model.device)
    if sampling.seed is not None:
        set_seed(sampling.seed)
    options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if sampling.temperature > 0:
        options = {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or None,
        }
    with torch.no_grad():
        output = model.generate(
            **inputs,
            **options,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=stops or None,
            tokenizer=tokenizer,
            streamer=streamer,
        )
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for marker in stops:
        reply = reply.split(marker)[0]
    return reply.strip() if stops else reply


def messages_for(tokenizer, path: str, system: str | None) -> list[dict]:
    """The opening messages of a chat; a clear error when there is no chat template."""
    if not tokenizer.chat_template:
        raise ConfigError(
            f"{path} has no chat template: pass --chat-template with a name (chatml, llama3), a .jinja file "
            "or an inline template"
        )
    return [{"role": "system", "content": system}] if system else []
