"""Strided mode: the block mask against a brute-force construction, one strided forward against
generating each block alone (stories260K), and short runs that raise alignment and resume."""

import json
import shutil

import pytest
import torch
from ftcore_ebft.strided import Layout, anchors, generate_blocks, sample
from pydantic import BaseModel
from transformers import AutoModelForCausalLM


class Strided(BaseModel):
    stride: int = 4
    anchor_offset: int = 0
    min_completion_prefix: int = 0
    generate_max_len: int = 3
    temperature: float = 1.0
    top_p: float = 1.0


def brute_force_mask(S, points, n, G, C):
    """allowed[q][kv], written out rule by rule."""
    T = S + len(points) * n * G
    owner = {}  # generated position -> (block, anchor)
    for k, a in enumerate(points):
        for j in range(n):
            b = k * n + j
            for t in range(G):
                owner[S + b * G + t] = (b, a)
    allowed = [[False] * T for _ in range(T)]
    for q in range(T):
        for kv in range(T):
            if q < S:
                allowed[q][kv] = kv <= q
            else:
                block, a = owner[q]
                in_window = kv < S and a - C <= kv < a
                own_earlier = kv >= S and owner[kv][0] == block and kv <= q
                allowed[q][kv] = in_window or own_earlier
    return torch.tensor(allowed)


@pytest.mark.parametrize("context", [1, 3, 100])
def test_the_dense_mask_equals_a_brute_force_construction(context):
    layout = Layout(length=12, anchors=[2, 6, 9], samples=2, block=3, context=context)
    mask = layout.dense_mask()[0, 0]
    assert mask.shape == (30, 30)
    assert torch.equal(mask == 0, brute_force_mask(12, [2, 6, 9], 2, 3, context))


def test_padding_is_seen_by_nothing_real():
    layout = Layout(length=12, anchors=[2, 6, 9], samples=2, block=3, context=3, pad_to=16)
    mask = layout.dense_mask()[0, 0]
    assert layout.used == 30 and mask.shape == (32, 32)
    assert torch.equal(mask[:30, :30] == 0, brute_force_mask(12, [2, 6, 9], 2, 3, 3))
    assert (mask[:30, 30:] != 0).all()  # no real token attends to padding
    assert (mask[30:] == 0).any(-1).all()  # every pad row attends somewhere (no empty softmax)


def test_anchors_follow_offset_stride_prompt_and_room():
    assert anchors(20, 0, Strided()) == [4, 8, 12, 16]  # 0 skipped: a block needs a token before it
    assert anchors(20, 0, Strided(anchor_offset=2)) == [2, 6, 10, 14]
    assert anchors(20, 7, Strided()) == [8, 12, 16]
    assert anchors(20, 7, Strided(min_completion_prefix=3)) == [12, 16]
    assert anchors(18, 0, Strided(generate_max_len=3)) == [4, 8, 12]  # 16 + 3 > 18
    assert anchors(3, 0, Strided()) == []


@pytest.fixture(scope="module")
def stories(ftcore_stories_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ftcore_stories_model)
    text = "Once upon a time, there was a little cat. The cat liked to play in the park with a ball."
    return ftcore_stories_model, torch.tensor(tokenizer(text)["input_ids"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_strided_forward_equals_each_block_alone(stories, attention):
    path, ids = stories
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attention
    ).eval()
    points, n, G = [5, 11, 17], 2, 4
    layout = Layout(len(ids), points, n, G, context=len(ids))  # the whole prefix as context
    mask = layout.dense_mask()
    generator = torch.Generator().manual_seed(0)
    sequence = generate_blocks(model, ids, layout, mask, Strided(generate_max_len=G), generator)
    _, _, positions = layout.tensors()
    with torch.no_grad():
        logits = model(input_ids=sequence[None], position_ids=positions[None], attention_mask=mask).logits[0]
        where = layout.logit_positions()
        S = len(ids)
        for b in range(layout.blocks):
            a, block = points[b // n], sequence[S + b * G : S + (b + 1) * G]
            alone = model(input_ids=torch.cat([ids[:a], block])[None]).logits[0]
            torch.testing.assert_close(logits[where[b]], alone[a - 1 : a - 1 + G], atol=1e-4, rtol=1e-4)
    # each block sampled its own tokens: some samples of an anchor differ
    blocks = sequence[S:].reshape(len(points), n, G)
    assert any(not torch.equal(pair[0], pair[1]) for pair in blocks)


def test_block_parallel_greedy_generation_equals_generating_each_block_alone(stories):
    path, ids = stories
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    points, G, C = [6, 12], 5, 4
    layout = Layout(len(ids), points, 1, G, context=C)
    greedy = Strided(generate_max_len=G, temperature=1e-6)
    sequence = generate_blocks(
        model, ids, layout, layout.dense_mask(), greedy, torch.Generator().manual_seed(0)
    )
    for b, a in enumerate(points):
        # alone: the anchor's window of C original tokens (states computed over the whole prefix), then the block
        tokens = ids[:a].tolist()
        for _ in range(G):
            T = len(tokens)
            allowed = torch.ones(T, T).tril().bool()
            allowed[a:, : a - C] = False  # generated tokens see only the window of original tokens
            mask = torch.zeros(T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokens]), attention_mask=mask).logits[0, -1]
            tokens.append(int(sample(logits[None], 1e-6, 1.0, None)[0]))
        assert sequence[len(ids) + b * G : len(ids) + (b + 1) * G].tolist() == tokens[a:]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="flex attention on the CPU compiles C++ (needs g++)")
def test_the_flex_block_mask_gives_the_dense_masks_logits_and_samples_on_cpu(ftcore_tiny_model_dir):
    """The GPU path (a flex-attention BlockMask) on the CPU: same logits, same greedy blocks."""
    from ftcore_ebft.strided import attention_mask

    path = ftcore_tiny_model_dir("llama")
    flex = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="flex_attention"
    )
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(3, 500, (150,), generator=torch.Generator().manual_seed(0))
    layout = Layout(150, list(range(8, 144, 8)), 3, 6, context=12, pad_to=128)
    block_mask, dense_mask = (
        attention_mask(flex.eval(), layout, "cpu"),
        attention_mask(dense.eval(), layout, "cpu"),
    )
    assert type(block_mask).__name__ == "BlockMask" and dense_mask.shape == (1, 1, 512, 512)
    greedy = Strided(generate_max_len=6, temperature=1e-6)
    sequence = generate_blocks(flex, ids, layout, block_mask, greedy, torch.Generator().manual_seed(0))
    assert torch.equal(sequence, generate_blocks(dense, ids, layout, dense_mask, greedy, None))
    _, _, positions = layout.tensors()
    with torch.no_grad():
        left = flex(input_ids=sequence[None], position_ids=positions[None], attention_mask=block_mask).logits
        right = dense(
            input_ids=sequence[None], position_ids=positions[None], attention_mask=dense_mask
        ).logits
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_documents_without_an_anchor_are_dropped_and_none_left_is_an_error(
    stories_file, story_texts, tmp_path
):
    from ftcore.config import validate_config
    from ftcore.errors import DataError
    from ftcore.testing import stories_model
    from ftcore_ebft.strided import prepare_documents
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())

    def documents(rows):
        raw = strided_config(stories_file(rows))
        raw["model"] = {"base": str(stories_model())}
        raw["train"].update(output_dir=str(tmp_path / "out"), sequence_len=32)
        raw["data"] = {"cache_dir": str(tmp_path / "cache"), "shuffle": False}
        config, plugins = validate_config(raw)
        return prepare_documents(config, plugins, tokenizer)[0]

    rows = documents([{"text": "The end."}, *story_texts])
    assert len(rows) == len(story_texts) and all(len(ids) == 32 for ids in rows["input_ids"])
    assert rows[0]["prompt_length"] == 0
    with pytest.raises(DataError, match="no document is long enough for an anchor"):
        documents([{"text": "The end."}])


def strided_config(path, **ebft):
    return {
        "plugins": ["ebft"],
        "datasets": [{"path": path, "format": "ebft_strided"}],
        "train": {"method": "ebft", "micro_batch_size": 2, "learning_rate": 1e-3, "scheduler": "constant",
                  "seed": 0, "save_steps": 4},
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4,
                 "n_samples_per_prompt": 4, "temperature": 1.0, "embed_method": "last_token", "diversity_coef": 0.0,
                 **ebft},
    }  # fmt: skip


@pytest.mark.slow
def test_a_strided_run_raises_alignment_and_resumes_identically(run_ftcore, stories_file, story_texts):
    config = strided_config(stories_file(story_texts))
    full = run_ftcore(config, steps=10)
    rows = {row["step"]: row for row in full.metrics if "ebft/alignment" in row}
    assert sorted(rows) == list(range(1, 11))
    for key in ("ebft/diversity", "ebft/cfm_loss", "ebft/reward", "ebft/rl_loss"):
        assert key in rows[1]
    first = sum(rows[s]["ebft/alignment"] for s in (1, 2, 3)) / 3
    last = sum(rows[s]["ebft/alignment"] for s in (8, 9, 10)) / 3
    assert last > first + 0.05, (first, last)

    # resume from the step-4 checkpoint (later ones removed, as if the run had stopped there)
    for later in sorted((full.output_dir / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    resumed = run_ftcore(config, steps=10, resume=True)
    assert resumed.result.global_step == 10
    again = {row["step"]: row for row in resumed.metrics if "ebft/alignment" in row}
    for step in (5, 10):
        assert again[step]["ebft/alignment"] == pytest.approx(rows[step]["ebft/alignment"], abs=1e-4)


@pytest.mark.slow
def test_strided_with_ce_and_lora_logs_both_losses(run_ftcore, stories_file, story_texts):
    config = strided_config(
        stories_file(story_texts), ce_coef=0.1, n_samples_per_prompt=1, use_whitening=False
    )
    config["adapter"] = {"kind": "lora", "r": 8}
    run = run_ftcore(config, steps=2)
    row = next(r for r in run.metrics if r.get("step") == 2 and "ebft/ce_loss" in r)
    assert row["ebft/diversity"] == 0 and row["ebft/ce_loss"] > 0
    assert json.loads((run.output_dir / "adapter_config.json").read_text())["r"] == 8


def test_a_strided_run_trains_bf16_weights_under_mixed_precision(
    run_ftcore, ftcore_tiny_model_dir, stories_file, story_texts
):
    """Mixed precision returns the model's hidden states in float32; the bf16 output layer still applies."""
    config = {
        "plugins": ["ebft"],
        "model": {
            "base": str(ftcore_tiny_model_dir("llama")),
            "dtype": "bfloat16",
            "gradient_checkpointing": False,
        },
        "datasets": [{"path": stories_file(story_texts), "format": "ebft_strided"}],
        "train": {"method": "ebft", "precision": "bf16", "micro_batch_size": 2, "learning_rate": 1e-3},
        "ebft": {"mode": "strided", "stride": 8, "generate_max_len": 4, "ce_coef": 0.1},
    }
    run = run_ftcore(config, steps=2)
    rows = [row for row in run.metrics if "ebft/alignment" in row]
    assert len(rows) == 2 and all(0 < row["ebft/ce_loss"] < 20 for row in rows)
