"""The ``dpo`` method: TRL's ``DPOTrainer`` on ftcore's model, adapter, data and callbacks."""

from __future__ import annotations

from ftcore.train import one_gpu_per_process, remove_default_printer, training_arguments
from trl import DPOConfig, DPOTrainer

from ftcore_dpo.pairs import TOKEN_COLUMNS, prepare_pairs


class FtcoreDPOTrainer(DPOTrainer):
    """``DPOTrainer`` that takes pairs ftcore already tokenized, and sends nothing anywhere."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(TOKEN_COLUMNS) <= set(dataset.column_names):
            return dataset  # tokenized and length-checked by ftcore_dpo.pairs
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _send_telemetry(self):
        """ftcore reports nothing by default; TRL's usage ping stays off."""

    def create_model_card(self, *args, **kwargs):
        """No README.md in checkpoints/: the output_dir layout is ftcore's."""


def dpo_arguments(config) -> dict:
    """``DPOConfig`` keyword arguments of the ``[dpo]`` table."""
    dpo = config.dpo
    return dict(
        beta=dpo.beta,
        loss_type=list(dpo.loss_type),
        loss_weights=list(dpo.loss_weights) if dpo.loss_weights else None,
        label_smoothing=dpo.label_smoothing,
        f_divergence_type=dpo.f_divergence_type,
        ld_alpha=dpo.ld_alpha,
        use_weighting=dpo.use_weighting,
        discopop_tau=dpo.discopop_tau,
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
        precompute_ref_batch_size=dpo.precompute_ref_batch_size,
        max_length=config.train.sequence_len,
    )


def reference_model(run):
    """The frozen reference for a full fine-tune, or None.

    None with an adapter (TRL disables the adapter to get the base model) and with
    ``precompute_ref_log_probs`` (TRL runs the untrained model over the data once, before training).
    A full fine-tune otherwise gets a frozen copy of the model as ftcore built it (patches,
    resized embeddings, random init included), not a reload from disk.
    """
    import copy

    from peft import PeftModel

    if isinstance(run.model, PeftModel) or run.config.dpo.precompute_ref_log_probs:
        return None
    return copy.deepcopy(run.model).requires_grad_(False).eval()


class DPOMethod:
    """Direct Preference Optimization on ``preference`` rows (TRL ``DPOTrainer``, every TRL loss type)."""

    row_schemas = ("preference",)

    def build_trainer(self, run):
        config = run.config
        data = prepare_pairs(config, run.plugins, run.tokenizer)
        run.data_fingerprint = data.fingerprint
        args = one_gpu_per_process(
            DPOConfig(
                **training_arguments(config, run.output_dir, has_eval=data.eval is not None),
                **dpo_arguments(config),
            )
        )
        trainer = FtcoreDPOTrainer(
            model=run.model,
            ref_model=reference_model(run),
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=run.tokenizer,
            callbacks=run.callbacks,
        )
        peft_config = getattr(trainer.model, "peft_config", {})
        if "ref" in peft_config and not config.adapter.init_from:
            # TRL copies a given adapter as the reference; a new adapter starts as the identity, so the
            # adapter-disabled base is the same reference without the copy (nor a ref/ folder in saves).
            trainer.model.delete_adapter("ref")
        remove_default_printer(trainer)
        return trainer

    def preview(self, config, plugins, tokenizer, n: int, *, color: bool = False) -> list[str]:
        """What ``ftcore preprocess --show N`` prints: N tokenized pairs, trained tokens marked, and a summary."""
        from ftcore_dpo.pairs import preview_lines

        return preview_lines(tokenizer, prepare_pairs(config, plugins, tokenizer), n, color=color)
