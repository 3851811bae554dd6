"""The trainer pieces every HF-Trainer-based method shares (the built-in ``sft`` method: ftcore.builtin.sft)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments

from ftcore.checkpoint import (
    CheckpointCallback,
    DivergenceCallback,
    StopSignalCallback,
    checkpoints_dir,
    fused_optimizer,
)
from ftcore.config import COMPILED_ADAMW
from ftcore.distributed import distributed_arguments
from ftcore.loss import ChunkedLoss, LogitsChanged
from ftcore.metrics import LoggedMetricsCallback, MetricsCallback, ReportCallback, RichProgressCallback


def mixed_precision(config) -> str:
    """ "bf16", "fp16" or "fp32" for this config on this machine."""
    import torch

    if config.train.precision != "auto":
        return config.train.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def training_arguments(config, output_dir: Path, *, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments keyword arguments from the ``[train]`` table (methods may extend them)."""
    import torch

    train = config.train
    precision = mixed_precision(config)
    return dict(
        output_dir=str(checkpoints_dir(output_dir)),
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_steps or train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim="adamw_torch" if train.optimizer == COMPILED_ADAMW else train.optimizer,  # the class: attach()
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        eval_strategy="steps" if (has_eval and train.eval_steps) else "no",
        eval_steps=train.eval_steps,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to=list(train.report_to) or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        # the model loader already set checkpointing up (before adapters); stated here too so a TRL
        # config's own default (TRL turns it on) never overrides [model] gradient_checkpointing
        activation_checkpointing=config.model.gradient_checkpointing,
        activation_checkpointing_kwargs={
            "use_reentrant": config.model.use_reentrant,
            "every_n_layers": config.model.checkpoint_every_n_layers,
        },
        dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config={"non_blocking": torch.cuda.is_available()},  # pinned batches copy without a sync
        # its isnan check syncs host and device every micro-batch; skip_step needs it to log finite losses
        logging_nan_inf_filter=train.divergence == "skip_step",
        save_only_model=False,
        **distributed_arguments(config),
    )


def one_gpu_per_process(args: TrainingArguments) -> TrainingArguments:
    """Train on one GPU in a process started without ``--nproc``.

    With several GPUs visible, the Trainer would otherwise wrap the model in
    ``torch.nn.DataParallel`` over all of them: slower than DDP, and a different global batch than
    the config states. ``ftcore run --nproc N`` is the multi-GPU path.
    """
    if args.n_gpu > 1:
        print(
            f"ftcore: {args.n_gpu} GPUs visible; this process trains on one (use ftcore run --nproc "
            f"{args.n_gpu} CONFIG for data parallel)"
        )
        args._n_gpu = 1  # as Trainer itself does for model-parallel models
    return args


def run_callbacks(run) -> list:
    """The core callbacks (metrics, progress, report, checkpoints, signals), then the plugins' ones in
    the order the config lists the plugins, and the divergence guard last (it cancels saves the others
    asked for)."""
    callbacks = [
        MetricsCallback(run.output_dir),
        RichProgressCallback(),
        ReportCallback(run.output_dir),
        CheckpointCallback(run),
        StopSignalCallback(),
    ]
    for extra in reversed(run.plugins.hook.trainer_callbacks(config=run.config, run=run)):  # pluggy: LIFO
        callbacks.extend(extra or [])
    train = run.config.train
    return [*callbacks, DivergenceCallback(train.divergence, train.max_skipped_steps)]


def attach(trainer, run):
    """Make ``trainer`` the run's: ``run.trainer``, the ``log_metrics`` route before every callback
    (the ``report_to`` trackers Hugging Face puts first included), and ``train.optimizer`` where the
    Trainer does not know its name (``adamw_compiled``)."""
    run.trainer = trainer
    trainer.callback_handler.callbacks.insert(0, LoggedMetricsCallback(run))
    if run.config.train.optimizer == COMPILED_ADAMW:  # the Trainer's parameter groups, this class
        from ftcore.optimizer import CompiledAdamW

        args = trainer.args
        trainer.optimizer_cls_and_kwargs = (
            CompiledAdamW,
            {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
        )
    return trainer


def remove_default_printer(trainer: Trainer) -> None:
    """Drop HF's own log printer: the rich progress callback shows the same numbers."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


class FtcoreTrainer(Trainer):
    """HF Trainer whose loss comes from a plugin's ``compute_loss`` hook (fused losses), else from the
    model's forward with the output layer and cross-entropy chunked (``ftcore.loss``)."""

    def __init__(self, *args, ftcore_run, **kwargs):
        super().__init__(*args, **kwargs)
        self.ftcore_run = ftcore_run
        self.default_loss = ChunkedLoss()
        self._pending_tokens = None
        self._grad_scale_cleared: set = set()
        """Fused optimizers whose ``grad_scale`` a step post-hook removes (``_clip_grad_norm``)."""
        remove_default_printer(self)

    def _track_num_input_tokens(self, inputs):
        """Count tokens on the device; ``state`` gets the count when a log or checkpoint reads it.

        The Trainer's own version calls ``.item()`` (a host-device sync) on every micro-batch.
        """
        if self.args.include_num_input_tokens_seen == "no" or "input_ids" not in inputs:
            return
        input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        pad = getattr(self.processing_class, "pad_token_id", None)
        non_padding = self.args.include_num_input_tokens_seen == "non_padding"
        if non_padding and mask is not None:
            count = mask.sum()
        elif non_padding and pad is not None:
            count = (input_ids != pad).sum()
        else:
            count = input_ids.new_tensor(input_ids.numel())
        self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

    def _flush_token_count(self):
        pending, self._pending_tokens = self._pending_tokens, None
        if pending is not None:
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending.reshape(1)).sum().item())

    def log(self, logs, start_time=None):
        self._flush_token_count()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._flush_token_count()
        super()._save_checkpoint(model, trial)

    def _clip_grad_norm(self, model):
        """Gradient clipping folded into a fused optimizer's step.

        The Trainer's clipping reads every gradient for the norm, then reads and writes every one
        again to scale it. Here the norm is the only pass: the fused step divides each gradient by
        ``max(norm / max_grad_norm, 1)`` as it reads it (its ``grad_scale``, as for fp16's loss
        scale), which is the same update, and the divergence check takes this norm instead of a pass
        of its own. The Trainer's clipping runs where that does not hold: an optimizer that is not a
        fused torch one, fp16 (its scaler owns ``grad_scale``), DeepSpeed, FSDP (sharded gradients),
        and gradients off the GPU (on the CPU the extra pass costs little, and CPU runs keep the
        Trainer's rounding, step for step).
        """
        fused = fused_optimizer(self.optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if (
            fused is None
            or not grads
            or self.args.fp16
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or any(hasattr(grad, "to_local") or not grad.is_cuda for grad in grads)
        ):
            return super()._clip_grad_norm(model)
        import torch

        norm = torch.nn.utils.get_total_norm(grads)
        fused.grad_scale = ((norm.float() + 1e-6) / self.args.max_grad_norm).clamp(min=1.0)
        if fused not in self._grad_scale_cleared:  # for one step only, never left for a later one
            fused.register_step_post_hook(_clear_grad_scale)
            self._grad_scale_cleared.add(fused)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, DivergenceCallback):
                callback.gradient_norm = norm
        return norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs:
            run = self.ftcore_run
            loss = run.plugins.hook.compute_loss(
                config=run.config, model=model, batch=inputs, num_items_in_batch=num_items_in_batch, run=run
            )
            if loss is not None:
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
                return loss
            try:
                with self.default_loss.applied(model):
                    return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            except LogitsChanged:
                pass  # found on the first step; from now on the model's own loss
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def _clear_grad_scale(optimizer, args, kwargs):
    if hasattr(optimizer, "grad_scale"):
        del optimizer.grad_scale
