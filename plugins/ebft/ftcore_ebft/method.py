"""The ``ebft`` method (a light module: ``ftcore validate`` reads its ``row_schemas``)."""

from __future__ import annotations


class EBFTMethod:
    """Energy-based fine-tuning: structured mode on ``prompt_only`` rows with a ``ground_truth`` column
    (through grpo), strided mode on ``prompt_completion`` or ``text`` rows."""

    row_schemas = ("prompt_only", "prompt_completion", "text")

    def build_trainer(self, run):
        if run.config.ebft.mode == "structured":
            from ftcore_ebft.structured import StructuredEBFT

            return StructuredEBFT().build_trainer(run)
        from ftcore_ebft.strided import build_trainer

        return build_trainer(run)

    def preview(self, config, plugins, tokenizer, n: int, *, color: bool = False) -> list[str]:
        """``ftcore preprocess --show N``: the prompts (structured) or token rows (strided) as trained."""
        if config.ebft.mode == "structured":
            from ftcore_ebft.structured import StructuredEBFT

            return StructuredEBFT().preview(config, plugins, tokenizer, n, color=color)
        from ftcore_ebft.strided import preview_lines

        return preview_lines(config, plugins, tokenizer, n, color=color)
