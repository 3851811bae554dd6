"""TRL's ``DPOTrainer`` on ftcore's model, adapter, data and callbacks (imported when the ``dpo`` method trains)."""

from __future__ import annotations

from trl import DPOTrainer

from ftcore_dpo.pairs import TOKEN_COLUMNS


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
