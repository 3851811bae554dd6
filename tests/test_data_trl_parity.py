"""ftcore's tokens and labels equal TRL SFTTrainer's own preparation of the same rows."""

import json

import datasets
import pytest
from ftcore.chat_templates import CHATML
from ftcore.data import prepare_sft_data
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.testing import asset, stories_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer


def alpaca(count):
    with open(asset("data/instructions/instructions_2000.jsonl"), encoding="utf-8") as lines:
        rows = [json.loads(next(lines)) for _ in range(count)]
    return [(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), r["output"]) for r in rows]


@pytest.mark.parametrize("mode", ["messages", "prompt_completion"])
def test_same_tokens_and_labels_as_trl(tmp_path, mode):
    tokenizer = stories_tokenizer(CHATML)  # its {% generation %} blocks let TRL mask the assistant turns
    pairs = alpaca(100)
    if mode == "messages":
        records = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
            for p, c in pairs
        ]
        source = {"format": "messages"}
    else:
        records = [{"prompt": p + "\n", "completion": c} for p, c in pairs]
        source = {"format": "prompt_completion"}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config, plugins = data_config(
        tmp_path, [{"path": str(path), **source}], data={"shuffle": False}, sequence_len=4096
    )
    ours = prepare_sft_data(config, plugins, tokenizer).train
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_length=4096, assistant_only_loss=mode == "messages",
        report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(stories_model())
    theirs = SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer
    )
    theirs = theirs.train_dataset
    assert ours["input_ids"] == theirs["input_ids"]
    for mine, trl_labels in zip(ours["labels"], theirs["labels"], strict=True):
        assert mine[0] == -100 and mine[1:] == trl_labels[1:]  # the first label is never used by the loss
