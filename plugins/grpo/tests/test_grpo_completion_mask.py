"""``Completion.mask``: tokens a producer marks 0 (context, e.g. a tool's output) are out of the loss."""

from __future__ import annotations

import torch
from ftcore.config import load_config
from ftcore.pipeline import run_training
from ftcore.testing import stories_model
from transformers import AutoModelForCausalLM

PRODUCER_PLUGIN = """
from ftcore.hookspecs import hookimpl
from ftcore_grpo.rollout import RolloutProducer

name = "masked_env"


class FirstTokenOnly(RolloutProducer):
    \"\"\"Trains on the first token of each completion: by a mask (MODE = "mask") or by cutting the rest ("cut").\"\"\"

    MODE = "mask"

    def produce(self, rows, index):
        rollout = super().produce(rows, index)
        for completion in rollout.completions:
            if self.MODE == "mask":
                completion.mask = [1] + [0] * (len(completion.token_ids) - 1)
            else:
                completion.token_ids = completion.token_ids[:1]
                completion.logprobs = completion.logprobs[:1] if completion.logprobs else None
        rollout.rewards = [[float(c.token_ids[0] % 2)] for c in rollout.completions]
        return rollout


@hookimpl(optionalhook=True)
def grpo_rollout_producer(run, generator, scorer, sampling):
    return FirstTokenOnly(generator, scorer, sampling, seed=run.config.train.seed)
"""


def train_first_tokens(tmp_path, monkeypatch, stories_config, mode: str):
    folder = tmp_path / mode
    package = f"grpo_first_token_{mode}"
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text("")
    (folder / package / "env.py").write_text(PRODUCER_PLUGIN.replace('MODE = "mask"', f"MODE = {mode!r}"))
    monkeypatch.syspath_prepend(str(folder))
    path = stories_config(
        folder,
        [f"Once upon a time, there was a {animal} who" for animal in ("cat", "dog")],
        plugins=f'"grpo", "{package}.env"',
        train="micro_batch_size = 4\ngradient_accumulation_steps = 2\nsequence_len = 64\nmax_steps = 1\n"
        "learning_rate = 0.5\n"
        'optimizer = "sgd"  # Adam would blow rounding noise in near-zero gradients up to lr-sized steps\n'
        "weight_decay = 0.0\nseed = 5",
        grpo='rewards = ["length_penalty"]',
    )
    config, plugins = load_config(path)
    return run_training(config, plugins).model


def test_masked_tokens_train_like_tokens_that_are_not_there(tmp_path, monkeypatch, stories_config):
    masked = train_first_tokens(tmp_path, monkeypatch, stories_config, "mask")
    cut = train_first_tokens(tmp_path, monkeypatch, stories_config, "cut")
    base = AutoModelForCausalLM.from_pretrained(stories_model())
    changed = False
    for (name, a), (_, b), (_, c) in zip(
        masked.named_parameters(), cut.named_parameters(), base.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), name
        changed = changed or not torch.allclose(a, c)
    assert changed  # the step trained
