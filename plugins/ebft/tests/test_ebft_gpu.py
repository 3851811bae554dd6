"""On a CUDA GPU: the flex-attention block mask gives what the dense mask gives, and a strided run
trains with it (scripts/gpu_tests.sh runs these)."""

import pytest
import torch
from ftcore_ebft.strided import Layout, attention_mask, generate_blocks
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.gpu


class Greedy:
    generate_max_len, temperature, top_p = 6, 1e-6, 1.0


def test_the_block_mask_matches_the_dense_mask_on_logits_and_generation(ftcore_tiny_model_dir):
    path = ftcore_tiny_model_dir("llama")
    flex = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="flex_attention"
    )
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    flex, dense = flex.cuda().eval(), dense.cuda().eval()
    ids = torch.randint(3, 500, (150,), generator=torch.Generator().manual_seed(0)).cuda()
    layout = Layout(150, list(range(8, 144, 8)), 3, Greedy.generate_max_len, context=12, pad_to=128)
    block_mask, dense_mask = attention_mask(flex, layout, "cuda"), attention_mask(dense, layout, "cuda")
    assert type(block_mask).__name__ == "BlockMask" and dense_mask.shape == (1, 1, layout.total, layout.total)
    a = generate_blocks(flex, ids, layout, block_mask, Greedy, torch.Generator("cuda").manual_seed(0))
    b = generate_blocks(dense, ids, layout, dense_mask, Greedy, torch.Generator("cuda").manual_seed(0))
    assert torch.equal(a, b)
    _, _, positions = layout.tensors("cuda")
    with torch.no_grad():
        left = flex(input_ids=a[None], position_ids=positions[None], attention_mask=block_mask).logits
        right = dense(input_ids=a[None], position_ids=positions[None], attention_mask=dense_mask).logits
    torch.testing.assert_close(left, right, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_strided_run_trains_with_flex_attention(
    checkpointing, run_ftcore, ftcore_tiny_model_dir, stories_file, story_texts
):
    config = {
        "plugins": ["ebft"],
        "model": {
            "base": str(ftcore_tiny_model_dir("llama")),
            "attention": "flex_attention",
            "dtype": "bfloat16",
            "gradient_checkpointing": checkpointing,
        },
        "datasets": [{"path": stories_file(story_texts), "format": "ebft_strided"}],
        "train": {"method": "ebft", "micro_batch_size": 2, "learning_rate": 1e-3},
        "ebft": {"mode": "strided", "stride": 8, "generate_max_len": 4, "ce_coef": 0.1},
    }
    run = run_ftcore(config, steps=3)
    rows = [row for row in run.metrics if "ebft/alignment" in row]
    assert len(rows) == 3 and all(0 < row["ebft/ce_loss"] < 20 for row in rows)


def test_the_frozen_feature_copy_follows_the_policy_to_its_gpu(ftcore_tiny_model_dir):
    from ftcore_ebft.features import FeatureNetwork

    policy = AutoModelForCausalLM.from_pretrained(ftcore_tiny_model_dir("llama"), dtype=torch.float32)
    network, pinned = FeatureNetwork(policy, [0.5, 1.0]), FeatureNetwork(policy, [1.0], device="cpu")
    policy.cuda()  # as the trainer does, after the method made the copy
    ids = torch.randint(3, 500, (2, 12), device="cuda")
    assert network.states(ids).device.type == "cuda" and network.device.type == "cuda"
    assert pinned.states(ids).device.type == "cpu"  # feature_device wins
