"""The fast path on a CUDA GPU: torch's flash varlen kernel and the compiled decoder layers against
plain SDPA, in bf16, on mid-sized random-init Llama and Qwen3 shapes (head_dim 64 and 128, GQA)."""

import pytest
import torch
from ftcore.speed import VARLEN, compile_decoder_layers, packed_attention_kwargs, register_varlen_attention
from ftcore.testing import tiny_model

pytestmark = pytest.mark.gpu

SHAPES = {
    "llama": dict(
        hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64
    ),
    "qwen3": dict(
        hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128
    ),
}
LENGTHS = [300, 41, 700, 1, 129, 877]


def model(architecture, attention):
    built = tiny_model(architecture, vocab_size=2048, num_hidden_layers=2, **SHAPES[architecture])
    built.set_attn_implementation(attention)
    return built.to("cuda", torch.bfloat16).train()


def packed_batch(lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 2048, (n,), generator=generator) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), doc[1:]]) for doc in docs])[None]
    return docs, torch.cat(docs)[None], position_ids, labels


def loss_and_grads(built, **inputs):
    built.zero_grad()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    loss = built(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach().float(), [p.grad.float() for p in built.parameters()]


def assert_close_bf16(loss, grads, reference_loss, reference_grads):
    assert abs(loss - reference_loss) / reference_loss < 5e-3
    for got, expected in zip(grads, reference_grads, strict=True):
        error = (got - expected).norm() / expected.norm().clamp_min(1e-12)
        assert error < 3e-2, f"gradient relative error {error:.3g}"


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_flash_varlen_matches_sdpa_document_by_document(architecture):
    docs, input_ids, position_ids, labels = packed_batch()
    reference = model(architecture, "sdpa")
    # SDPA on each document alone, summed like one packed batch: the masked-attention ground truth
    reference.zero_grad()
    total = sum(
        torch.nn.functional.cross_entropy(
            reference(input_ids=doc[None].cuda(), use_cache=False).logits[0, :-1].float(),
            doc[1:].cuda(),
            reduction="sum",
        )
        for doc in docs
        if len(doc) > 1
    )
    trained = sum(len(doc) - 1 for doc in docs)
    (total / trained).backward()
    reference_grads = [p.grad.float() for p in reference.parameters()]

    fast = model(architecture, register_varlen_attention())
    fast.load_state_dict(reference.state_dict())
    for boundaries in (
        packed_attention_kwargs(position_ids),
        {},
    ):  # from the collator, then from position_ids
        loss, grads = loss_and_grads(
            fast, input_ids=input_ids, position_ids=position_ids, labels=labels, **boundaries
        )
        assert_close_bf16(loss, grads, (total / trained).float(), reference_grads)


def test_auto_picks_varlen_for_packed_rows_on_this_gpu():
    from ftcore.config import validate_config
    from ftcore.speed import auto_attention

    raw = {"model": {"base": "org/model"}, "train": {"output_dir": "/tmp/unused", "packing": True}}
    assert auto_attention(validate_config(raw)[0]) == VARLEN


def test_compiled_layers_match_eager_and_do_not_recompile_for_new_lengths():
    import torch._dynamo

    torch._dynamo.reset()
    eager = model("llama", register_varlen_attention())
    compiled = model("llama", VARLEN)
    compiled.load_state_dict(eager.state_dict())
    compile_decoder_layers(compiled)
    for seed, lengths in enumerate((LENGTHS, [1000, 24, 500], [64] * 20)):
        _, input_ids, position_ids, labels = packed_batch(lengths, seed)
        boundaries = packed_attention_kwargs(position_ids)
        inputs = dict(input_ids=input_ids, position_ids=position_ids, labels=labels, **boundaries)
        assert_close_bf16(*loss_and_grads(compiled, **inputs), *loss_and_grads(eager, **inputs))
        if seed == 0:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # new lengths reuse the graph
