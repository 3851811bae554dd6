"""TOML config -> validated pydantic ``Config`` (core tables plus one table per plugin).

Semantics (contract): relative paths resolve from the config file's folder; ``--set a.b=V``
parses V as a TOML literal with a plain-string fallback, arrays of tables are addressed by
index (``datasets.0.path=...``), and ``--set plugins=[...]`` applies before plugin discovery.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
)

from ftcore.errors import ConfigError, PluginError, did_you_mean
from ftcore.plugins import Plugins, installed_plugins, load_installed

COMPILED_ADAMW = "adamw_compiled"
"""The ``train.optimizer`` name of ``ftcore.optimizer.CompiledAdamW`` (not a name the HF Trainer knows)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".jinja", ".safetensors", ".gguf"}


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def _resolve_path(value: str, info: ValidationInfo) -> str:
    return _resolved(_base_dir(info) / Path(value).expanduser())


def _resolved(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise ValueError(f"a path that resolves ({path}: {exc})") from None


def _resolve_ref(value: str, info: ValidationInfo) -> str:
    """A local path (resolved) or a hub id (kept): paths start with / . ~, exist locally or name a file."""
    local = _base_dir(info) / Path(value).expanduser()
    looks_like_file = Path(value).suffix.lower() in FILE_SUFFIXES
    if value.startswith(("/", ".", "~")) or local.is_symlink() or local.exists() or looks_like_file:
        return _resolved(local)
    return value if HUB_ID.match(value) else _resolved(local)


LocalPath = Annotated[str, AfterValidator(_resolve_path)]
"""A filesystem path; relative values resolve from the config file's folder."""
PathOrHubId = Annotated[str, AfterValidator(_resolve_ref)]
"""A local path (resolved like ``LocalPath``) or a Hugging Face hub id such as ``org/name``."""


def _resolve_template(value: str, info: ValidationInfo) -> str:
    """A ``.jinja`` file path resolves like ``LocalPath``; a template name or inline template is kept."""
    return _resolve_path(value, info) if value.strip().endswith(".jinja") else value


class Section(BaseModel):
    """Base of every config table: unknown keys are errors, types are strict (no true for 1, no "5" for 5),
    numbers finite."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)

    result_neutral: ClassVar[tuple[str, ...]] = ()
    """Keys of this table that may change between a run and its ``--resume`` without changing what it
    trains (a server's address, timeouts); every other key changed makes ``--resume`` ask for ``--force``."""
    renamed: ClassVar[dict[str, str]] = {}
    """Former keys of this table and what replaced them: such a key is an error that names the new key."""


def result_neutral_keys(section: BaseModel, prefix: str = "") -> list[str]:
    """The dotted ``result_neutral`` keys of ``section`` and of the tables nested in it."""
    keys = [prefix + key for key in getattr(type(section), "result_neutral", ())]
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            keys += result_neutral_keys(value, f"{prefix}{name}.")
    return keys


class ModelSection(Section):
    """``[model]``: what to load and how."""

    base: PathOrHubId = Field(
        description="Hub id or local folder of the base model (or of its config for init='random')."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto = bf16 on GPUs that support it, else float32."
    )
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "varlen"] = Field(
        "auto",
        description="Attention implementation; varlen = torch's variable-length flash attention over packed documents; auto = the fastest available (varlen for packed rows on a CUDA GPU, else sdpa).",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random builds the architecture from its config (training from scratch)."
    )
    chat_template: Annotated[str, AfterValidator(_resolve_template)] | None = Field(
        None,
        description="A template name (chatml, llama3), an inline Jinja template, or a path to a .jinja file.",
    )
    tokenizer: PathOrHubId | None = Field(
        None, description="A separate tokenizer path or hub id (default: base)."
    )
    pad_token: str | None = Field(
        None,
        description="Pad token (added when not in the vocabulary); default: the tokenizer's own, else eos.",
    )
    special_tokens: list[str] = Field(
        default_factory=list, description="Extra special tokens to add (embeddings resized and trained)."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub; off by default.")
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute activations in backward to save memory (on by default, as in TRL; false is "
        "faster when the activations fit).",
    )
    use_reentrant: bool = Field(
        False, description="Reentrant gradient checkpointing (torch.utils.checkpoint)."
    )
    checkpoint_every_n_layers: int = Field(
        1,
        ge=1,
        description="With gradient_checkpointing: recompute only every n-th decoder layer (1 = all); larger "
        "values give memory back for speed.",
    )
    compile: bool = Field(False, description="torch.compile the decoder layers (regional compilation).")


class AdapterSection(Section):
    """``[adapter]``: parameter-efficient fine-tuning through peft (absent = full fine-tune)."""

    kind: Literal["lora", "dora", "qlora"] = Field(
        "lora", description="lora, dora, or qlora (4-bit base via bitsandbytes, CUDA only)."
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    targets: str | list[str] = Field(
        "all-linear",
        description='"all-linear", a regex over whole module names, or a list of module names ([] with target_parameters: only those).',
    )
    target_parameters: list[str] = Field(
        default_factory=list, description="3-D parameters to adapt, e.g. experts.gate_up_proj."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter."
    )
    init_from: LocalPath | None = Field(
        None, description="Start from this existing adapter folder (continued training)."
    )


class DatasetSection(Section):
    """``[[datasets]]``: one source of rows."""

    path: PathOrHubId | None = Field(
        None,
        description="A local file or folder (jsonl/json/parquet/csv/arrow, or a save_to_disk folder) or a hub dataset id; not used by generator formats (synthetic).",
    )
    format: str = Field(
        "messages",
        description="Row format name: messages, sharegpt, alpaca, completion, prompt_completion, pretokenized, synthetic, or one a plugin registers.",
    )
    split: str = Field(
        "train", description="Split to read (a local file has only train; slices such as train[:1000] work)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description='Field mapping: the format\'s field name -> column name in the file, e.g. {instruction = "question"}.',
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Use weight x the rows of this dataset: 2 repeats every row twice, 0.5 samples half (default: every row once).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Format-specific options (see docs/data.md)."
    )
    excess_length: Literal["drop", "truncate", "raise", "split"] | None = Field(
        None,
        description="Rows longer than train.sequence_len: drop, truncate, raise, or split into windows (text and token rows); default: split for completion, drop otherwise.",
    )
    on_bad_rows: Literal["raise", "skip"] = Field(
        "raise",
        description="raise: a DataError naming the file and row; skip: skip and count bad rows and empty files.",
    )
    eval: bool = Field(
        False,
        description="Evaluate on this dataset's rows (every train.eval_steps), never train on them; val_fraction does not apply to it.",
    )


class DataSection(Section):
    """``[data]``: options shared by every dataset."""

    val_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of rows held out for evaluation.")
    num_proc: int | None = Field(None, gt=0, description="Processes for tokenization (default: one).")
    shuffle: bool = Field(True, description="Shuffle rows with train.seed.")
    train_on: list[Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=lambda: ["assistant"],
        description="Roles whose messages are trained (a message's own train flag wins).",
    )
    split_special_tokens: bool = Field(
        True,
        description="Tokenize special tokens spelled out in row text (<|im_start|>, </s>) as plain text, so a row "
        "cannot forge chat-template turns or train an end-of-sequence it only spells; the template's own stay special. "
        "Holds for SFT rows, DPO pairs and RL prompts.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the chat template, e.g. {enable_thinking = false}.",
    )
    cache_dir: LocalPath | None = Field(
        None,
        description="Where tokenized data is cached, one folder per data fingerprint (default: ~/.cache/ftcore/data).",
    )


def _steps_or_epochs(value: int) -> int:
    if value < 1 and value != -1:
        raise ValueError("at least 1, or -1 to train for train.epochs")
    return value


class TrainSection(Section):
    """``[train]``: the method and its optimisation settings."""

    method: str = Field(
        "sft", description="Training method name (sft is built in; dpo, grpo... come from plugins)."
    )
    output_dir: LocalPath = Field(description="Where checkpoints, metrics and the final model go.")
    sequence_len: int = Field(
        2048, gt=0, description="Maximum tokens per row (packed row length when packing)."
    )
    packing: bool = Field(False, description="Bin-pack rows into sequence_len rows without cross-attention.")
    micro_batch_size: int = Field(1, gt=0, description="Rows per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(
        2e-5, gt=0, le=1, description="Peak learning rate (above 1 every optimizer diverges)."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when max_steps > 0).")
    max_steps: Annotated[int, AfterValidator(_steps_or_epochs)] = Field(
        -1, description="Stop after this many optimizer steps, at least 1 (-1: use epochs)."
    )
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N steps (default: only at the end)."
    )
    save_total_limit: int | None = Field(
        None, gt=0, description="Keep at most N checkpoints (oldest pruned after a new one completes)."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (needs an eval split).")
    seed: int = Field(42, description="Seed for init, shuffling and dropout.")
    optimizer: str = Field(
        "adamw_torch_fused",
        description="An HF Trainer optimizer name (adamw_torch_fused: one fused kernel for all parameters; adamw_torch, "
        f"adamw_8bit, ...), or {COMPILED_ADAMW} (AdamW as one torch.compile'd step; single process or DDP).",
    )
    scheduler: str = Field(
        "cosine", description="An HF scheduler name (linear, cosine, constant_with_warmup, ...)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps for linear warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    divergence: Literal["stop", "skip_step"] = Field(
        "stop",
        description="On a non-finite loss or gradient norm: stop (exit code 3; nothing non-finite is saved), "
        "or skip_step: skip that update and stop after max_skipped_steps in a row.",
    )
    max_skipped_steps: int = Field(
        5, ge=1, description="With divergence = skip_step: stop after this many skipped updates in a row."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto = bf16 where supported, else fp32."
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Optional trackers; none by default (no telemetry)."
    )


class DistributedSection(Section):
    """``[distributed]``: how ``ftcore run --nproc N`` trains on several GPUs (through torchrun)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="ddp: a full model copy per GPU; fsdp2: parameters, gradients and optimizer state sharded across GPUs.",
    )
    find_unused_parameters: bool = Field(
        False,
        description="DDP: allow parameters without gradients in a step (slower; some MoE models need it).",
    )
    reshard_after_forward: bool = Field(
        True,
        description="FSDP2: free gathered parameters after the forward (less memory, one more all-gather in backward).",
    )
    nnodes: int = Field(1, gt=0, description="Nodes in the job; 1 = this machine (torchrun --standalone).")
    node_rank: int = Field(
        0, ge=0, description="This node's index (multi-node; passed to torchrun --node-rank)."
    )
    master_addr: str = Field(
        "127.0.0.1", description="Address of node 0 (multi-node; torchrun --master-addr)."
    )
    master_port: int = Field(
        29500, gt=0, lt=65536, description="Port on node 0 (multi-node; torchrun --master-port)."
    )


CORE_TABLES = {
    "model": ModelSection,
    "adapter": AdapterSection,
    "datasets": DatasetSection,
    "data": DataSection,
    "train": TrainSection,
    "distributed": DistributedSection,
}


class ConfigBase(BaseModel):
    """The validated config of a run; plugin tables are attributes named after the plugin."""

    model_config = ConfigDict(extra="forbid", strict=True)
    plugins: list[str] = Field(
        default_factory=list, description="Plugins to enable, by entry-point name or dotted module path."
    )
    model: ModelSection
    adapter: AdapterSection | None = Field(None, description="Absent: full fine-tune.")
    datasets: list[DatasetSection] = Field(default_factory=list)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str | None:
        """The config file this came from (None when built in code)."""
        return self._source

    def references(self) -> list[tuple[str, str]]:
        """``(key, value)`` of every model, tokenizer, adapter and dataset path or hub id set."""
        refs = [("model.base", self.model.base), ("model.tokenizer", self.model.tokenizer)]
        if self.adapter is not None:
            refs.append(("adapter.init_from", self.adapter.init_from))
        refs += [(f"datasets.{i}.path", d.path) for i, d in enumerate(self.datasets)]
        return [(key, value) for key, value in refs if value]

    def hub_ids(self) -> list[str]:
        """The references that name the Hugging Face hub (local paths are absolute once resolved)."""
        return list(dict.fromkeys(value for _, value in self.references() if not Path(value).is_absolute()))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def fingerprint(self, exclude: tuple[str, ...] = ("train.output_dir",)) -> str:
        """A stable hash of the settings, ignoring ``exclude`` and the tables' ``result_neutral`` keys."""
        data = self.model_dump(mode="json")
        for dotted in (*exclude, *result_neutral_keys(self)):
            *parents, last = dotted.split(".")
            node = data
            for part in parents:
                node = node.get(part) or {}
            node.pop(last, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


Config = ConfigBase


def build_config_model(sections: dict[str, type[BaseModel]]) -> type[ConfigBase]:
    """The Config class with one optional-or-required field per plugin table."""
    fields: dict[str, Any] = {}
    for name, model in sections.items():
        if not (isinstance(model, type) and issubclass(model, Section)):
            expected = "return a subclass of ftcore.config.Section (or None)"
            raise PluginError(f"config_section() returned {model!r}; {expected}", plugin=name)
        if name in ConfigBase.model_fields:
            raise PluginError(f"its table [{name}] clashes with the core table of that name", plugin=name)
        try:
            default = model()
            fields[name] = (model, Field(default=default))
        except ValidationError:
            fields[name] = (model, ...)
    return create_model("Config", __base__=ConfigBase, **fields)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}", file=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", file=str(path)) from None


def parse_override(value: str) -> Any:
    """A TOML literal (number, bool, array, inline table, quoted string) or a plain string."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.path=VALUE`` overrides in place.

    Items of an array of tables are addressed by index; the index one past the end appends a
    new table (``datasets.0.path=x`` on a config without datasets creates the first one).
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    raise ConfigError(
                        f"--set: {part!r} is not an index of this {len(node)}-item array", key=here
                    )
                part = int(part)
                if part == len(node):
                    node.append({})
            elif not isinstance(node, dict):
                raise ConfigError(f"--set: {'.'.join(parts[:i])} is a value, not a table", key=key)
            if i == len(parts) - 1:
                node[part] = parse_override(value.strip())
            elif isinstance(node, list) or part in node:
                node = node[part]
            else:
                node = node.setdefault(part, [] if parts[i + 1].isdigit() else {})
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[ConfigBase, Plugins]:
    """Read, override, enable plugins, validate. Returns the config and its plugins."""
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides)
    config, plugins = validate_config(raw, base_dir=path.resolve().parent, source=str(path))
    check_local_paths(config)
    return config, plugins


def validate_config(raw: dict[str, Any], *, base_dir: str | Path = ".", source: str | None = None):
    """Validate a raw dict (as read from TOML) into a config and its enabled plugins."""
    names = raw.get("plugins", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"expected a list of plugin names, got {names!r}", file=source, key="plugins")
    plugins = Plugins(names)
    model = build_config_model(plugins.config_sections())
    _check_disabled_tables(raw, model, source)
    try:
        config = model.model_validate(raw, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, model), file=source) from None
    config._source = source
    try:
        _check_registered_names(config, plugins)
        _check_eval(config)
        _check_optimizer(config)
        plugins.hook.validate_config(config=config)
    except ConfigError as exc:
        if exc.file is None and source:
            raise ConfigError(exc.message, file=source, key=exc.key) from None
        raise
    return config, plugins


def check_local_paths(config: ConfigBase) -> None:
    """Every local model, tokenizer, adapter and dataset path of a config file must exist, so that
    ``validate`` reports what ``run`` would. Local values are absolute once resolved; hub ids stay
    as written. (Configs built in code skip this: the loaders check their paths when they read.)"""
    for key, value in config.references():
        if Path(value).is_absolute() and not Path(value).exists():
            raise ConfigError(
                f"{value}: no such file or folder (relative paths resolve from the config file's folder)",
                file=config.source,
                key=key,
            )


def _check_optimizer(config: ConfigBase) -> None:
    if config.train.optimizer == COMPILED_ADAMW and config.distributed.strategy == "fsdp2":
        raise ConfigError(
            f'train.optimizer = "{COMPILED_ADAMW}" steps whole parameters, not FSDP2\'s shards; use '
            '"adamw_torch_fused" with strategy = "fsdp2"',
            key="train.optimizer",
        )


def _check_eval(config: ConfigBase) -> None:
    if config.train.eval_steps and not (config.data.val_fraction or any(d.eval for d in config.datasets)):
        raise ConfigError(
            "eval_steps needs an eval split: set data.val_fraction (e.g. 0.05) or add a dataset with eval = true, "
            "or remove eval_steps",
            key="train.eval_steps",
        )
    if config.datasets and all(d.eval for d in config.datasets):
        raise ConfigError("every dataset has eval = true: nothing is left to train on", key="datasets")


def _check_registered_names(config: ConfigBase, plugins: Plugins) -> None:
    """The method and every dataset format must be registered by an enabled plugin."""
    names = [("method", "train.method", config.train.method)]
    names += [("format", f"datasets.{i}.format", d.format) for i, d in enumerate(config.datasets)]
    for kind, key, name in names:
        registry = plugins.registry(kind)  # a name two plugins register is an error of its own
        try:
            registry.owner(name)
        except PluginError as exc:
            raise ConfigError(str(exc), key=key) from None


def _check_disabled_tables(raw: dict[str, Any], model: type[BaseModel], source: str | None) -> None:
    installed = installed_plugins()
    for key in raw:
        if key not in model.model_fields and key in installed:
            raise ConfigError(
                f'table [{key}] belongs to the plugin "{key}", which is not enabled: add it to plugins, '
                f'e.g. plugins = ["{key}"]',
                file=source,
                key=key,
            )


def _explain(exc: ValidationError, model: type[BaseModel]) -> str:
    problems: dict[str, list[dict]] = {}
    for err in exc.errors():
        problems.setdefault(_key_path(model, err), []).append(err)
    lines = []
    for key, errs in problems.items():
        first = errs[0]
        if first["type"] == "extra_forbidden":
            choices = _fields_at(model, first["loc"][:-1])
            new_name = getattr(_table_at(model, first["loc"][:-1]), "renamed", {}).get(first["loc"][-1])
            if new_name:
                lines.append(
                    f"key {key!r} was renamed: use {new_name!r} (see its description in docs/config.md)"
                )
                continue
            suggestions = choices + (list(installed_plugins()) if len(first["loc"]) == 1 else [])
            lines.append(
                f"unknown {'table' if isinstance(first['input'], dict) else 'key'} {key!r}"
                f"{did_you_mean(str(first['loc'][-1]), suggestions)}; valid keys here: {', '.join(sorted(choices))}"
            )
        elif first["type"] == "missing":
            is_table = _fields_at(model, first["loc"]) != []
            lines.append(f"missing required {'table [' + key + ']' if is_table else 'key ' + repr(key)}")
        else:
            got = first.get("input")
            expected = " or ".join(
                dict.fromkeys(
                    e["msg"].removeprefix("Input should be ").removeprefix("Value error, ") for e in errs
                )
            )
            lines.append(f"key {key!r}: got {got!r} ({type(got).__name__}); expected {expected}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _key_path(model: type[BaseModel], err: dict) -> str:
    """The dotted config key of a pydantic error, without pydantic's union-member tags."""
    annotation: Any = model
    parts: list[str] = []
    for i, part in enumerate(err["loc"]):
        target = _unwrap(annotation)
        if isinstance(part, int):
            pass
        elif isinstance(target, type) and issubclass(target, BaseModel):
            if part in target.model_fields:
                annotation = target.model_fields[part].annotation
            elif not (err["type"] == "extra_forbidden" and i == len(err["loc"]) - 1):
                break
        elif typing.get_origin(target) is dict:
            annotation = typing.get_args(target)[1]
        else:
            break
        parts.append(str(part))
    return ".".join(parts)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the table at ``loc`` (list indices are stepped through)."""
    table = _table_at(model, loc)
    return list(table.model_fields) if table else []


def _table_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class of the table at ``loc``, or None."""
    annotation: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = _unwrap(annotation)
        if (
            not (isinstance(annotation, type) and issubclass(annotation, BaseModel))
            or part not in annotation.model_fields
        ):
            return None
        annotation = annotation.model_fields[part].annotation
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...]."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        for inner in typing.get_args(arg):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def installed_config_model(on_error) -> type[ConfigBase]:
    """The Config model with the table of every installed plugin (for ``ftcore schema``).

    A plugin that fails to load is handed to ``on_error`` (a ``PluginError``) and left out.
    """
    return build_config_model(load_installed(on_error).config_sections())


def config_reference(model: type[ConfigBase], only: str | None = None) -> str:
    """The Markdown config reference: every table, key, type, default and description."""
    lines = [
        "# Config reference",
        "",
        "Generated by `ftcore schema --markdown` from the config models of the core and of the plugins",
        "installed when it ran; do not edit by hand. Relative paths resolve from the config file's folder.",
        "",
    ]
    top = {
        name: field for name, field in model.model_fields.items() if _table_model(field.annotation) is None
    }
    if only is None:
        lines += ["## Top level", "", *_key_table(top)]
    for name, field in model.model_fields.items():
        table = _table_model(field.annotation)
        if table is None or only not in (None, name):
            continue
        is_array = typing.get_origin(field.annotation) is list
        heading = f"[[{name}]]" if is_array else f"[{name}]"
        core = name in ConfigBase.model_fields
        summary = re.sub(r"^``[^`]*``:\s*", "", " ".join((table.__doc__ or "").split()))
        lines += [f"## `{heading}`", "", summary[:1].upper() + summary[1:]]
        if not core:
            lines.append(f'Added by the plugin `{name}`: enable it with `plugins = ["{name}"]`.')
        if field.is_required():
            lines.append("This table is required.")
        elif field.description:
            lines.append(field.description)
        lines += ["", *_key_table(table.model_fields, name)]
        for sub, sub_field in table.model_fields.items():  # nested tables of a plugin table: [grpo.vllm]
            nested = _nested_section(sub_field.annotation)
            if nested is not None:
                summary = re.sub(r"^``[^`]*``:\s*", "", " ".join((nested.__doc__ or "").split()))
                lines += [f"## `[{name}.{sub}]`", "", summary[:1].upper() + summary[1:], ""]
                lines += _key_table(nested.model_fields, f"{name}.{sub}")
    return "\n".join(lines).rstrip() + "\n"


def _nested_section(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _key_table(fields: dict[str, Any], table: str = "") -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields.items():
        if _nested_section(field.annotation) is not None:
            description = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{name}` | table `[{table}.{name}]` (below) | | {description} |")
            continue
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = "not set" if value is None else f"`{json.dumps(value)}`"
        description = (field.description or "").replace("|", "\\|")
        annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        rows.append(f"| `{name}` | {_type_name(annotation)} | {default} | {description} |")
    return rows + [""]


def _type_name(annotation: Any) -> str:
    """A short human name of a field type: "integer", "path or hub id", "list of string"..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    validators = {getattr(m, "func", None) for m in getattr(annotation, "__metadata__", ())}
    if _resolve_path in validators:
        return "path"
    if _resolve_ref in validators:
        return "path or hub id"
    if origin is Annotated:
        bounds = [
            f"{op} {getattr(m, attr)}"
            for m in args[1:]
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if getattr(m, attr, None) is not None
        ]
        return _type_name(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return "one of " + ", ".join(f'`"{a}"`' for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    if args:  # a union
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _table_model(annotation: Any) -> type[BaseModel] | None:
    model = _unwrap(annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
