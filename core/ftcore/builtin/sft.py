"""The built-in ``sft`` method (a light module: ``ftcore validate`` and ``ftcore preprocess`` read its
``row_schemas``)."""

from ftcore.hookspecs import hookimpl


class SFTMethod:
    """Supervised fine-tuning on chat, prompt/completion, text or pre-tokenized rows."""

    row_schemas = ("messages", "prompt_completion", "text", "tokens")

    def build_trainer(self, run):
        from transformers import TrainingArguments

        from ftcore.data import prepare_sft_data
        from ftcore.data.collate import SFTCollator
        from ftcore.speed import with_document_boundaries
        from ftcore.train import FtcoreTrainer, one_gpu_per_process, training_arguments

        bundle = prepare_sft_data(run.config, run.plugins, run.tokenizer)
        run.data_fingerprint = bundle.fingerprint
        args = one_gpu_per_process(
            TrainingArguments(
                **training_arguments(run.config, run.output_dir, has_eval=bundle.eval is not None)
            )
        )
        return FtcoreTrainer(
            model=run.model,
            args=args,
            train_dataset=bundle.train,
            eval_dataset=bundle.eval,
            data_collator=with_document_boundaries(
                SFTCollator(run.tokenizer.pad_token_id, packed=run.config.train.packing), run.model
            ),
            processing_class=run.tokenizer,
            callbacks=run.callbacks,
            ftcore_run=run,
        )


@hookimpl
def register_methods(register):
    register("sft", "ftcore.builtin.sft:SFTMethod")
