"""Packing: best-fit bins, restarting position ids, the collator, and packed == unpacked loss and gradients."""

import numpy as np
import pytest
import torch
from ftcore.data import prepare_sft_data
from ftcore.data.collate import SFTCollator
from ftcore.data.packing import best_fit_decreasing
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.testing import asset, tiny_model

ALPACA = {
    "path": str(asset("data/instructions/instructions_2000.jsonl")),
    "format": "prompt_completion",
    "fields": {"prompt": "instruction", "completion": "output"},
    "split": "train[:16]",
}


def test_best_fit_decreasing_fills_bins_without_overflow():
    lengths = np.random.default_rng(0).integers(1, 512, size=2000)
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert max(lengths[b].sum() for b in bins) <= 512
    assert len(bins) <= np.ceil(lengths.sum() / 512) * 11 / 9 + 1  # BFD's worst-case bound


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{packing: DataBundle} of the same alpaca rows (those that fit 256 tokens), packed and not."""
    out = {}
    for packing in (True, False):
        config, plugins = data_config(
            tmp_path_factory.mktemp("data"), [ALPACA], sequence_len=256, packing=packing
        )
        out[packing] = prepare_sft_data(config, plugins, stories_tokenizer())
    return out


def sequences_of(row):
    """Split a packed row at every position id 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [
        (tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b]))
        for a, b in zip(starts, starts[1:], strict=False)
    ]


def test_packed_rows_hold_the_same_sequences(bundles):
    packed, unpacked = bundles[True], bundles[False]
    assert packed.stats["sequences"] == unpacked.stats["rows"] == 16 - unpacked.stats["dropped"] >= 10
    assert packed.stats["rows"] < 8 and max(map(len, packed.train["input_ids"])) <= 256
    assert packed.stats["tokens"] == unpacked.stats["tokens"]
    assert packed.stats["packing_efficiency"] == pytest.approx(
        packed.stats["tokens"] / (packed.stats["rows"] * 256), abs=1e-4
    )
    found = [seq for row in packed.train for seq in sequences_of(row)]
    assert all(labels[0] == -100 for _, labels in found)  # nothing is trained to follow the previous sequence
    assert sorted(found) == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in unpacked.train)
    for row in packed.train:
        for a, b in zip(row["position_ids"], row["position_ids"][1:], strict=False):
            assert b == a + 1 or b == 0


def test_collator_pads_right_and_isolates_padding():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8], "labels": [-100], "position_ids": [0]},
    ]
    batch = SFTCollator(pad_token_id=2, packed=True)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]] and "attention_mask" not in batch
    plain = SFTCollator(pad_token_id=2, packed=False, pad_to_multiple_of=4)(
        [{k: f[k] for k in ("input_ids", "labels")} for f in features]
    )
    assert plain["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]] and "position_ids" not in plain


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(bundles, architecture, attention):
    packed, unpacked = bundles[True], bundles[False]
    model = tiny_model(architecture, attn_implementation=attention)
    model.config.use_cache = False  # as the HF Trainer runs it (TrainingArguments.use_cache = False)
    model.train()
    pad = stories_tokenizer().pad_token_id
    packed_loss, packed_grads = loss_and_grads(model, SFTCollator(pad, packed=True)(list(packed.train)))
    loss, grads = loss_and_grads(model, SFTCollator(pad, packed=False)(list(unpacked.train)))
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # without the restarting position ids the packed rows would attend across sequences
    contaminated = SFTCollator(pad, packed=True)(list(packed.train))
    contaminated["position_ids"] = torch.arange(contaminated["input_ids"].shape[1]).expand_as(
        contaminated["input_ids"]
    )
    contaminated_loss = loss_and_grads(model, contaminated)[0]
    assert (contaminated_loss - loss).abs() > max(1e-5, 20 * (packed_loss - loss).abs())
