"""The ``dpo`` method (a light module: ``ftcore validate`` reads its ``row_schemas``; the trainer is
in ``ftcore_dpo.trainer``)."""

from __future__ import annotations


class DPOMethod:
    """Direct Preference Optimization on ``preference`` rows (TRL ``DPOTrainer``, every TRL loss type)."""

    row_schemas = ("preference",)

    def build_trainer(self, run):
        from ftcore.train import one_gpu_per_process, remove_default_printer, training_arguments
        from trl import DPOConfig

        from ftcore_dpo.pairs import prepare_pairs
        from ftcore_dpo.trainer import FtcoreDPOTrainer, dpo_arguments, reference_model

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
        from ftcore_dpo.pairs import prepare_pairs, preview_lines

        return preview_lines(tokenizer, prepare_pairs(config, plugins, tokenizer), n, color=color)
