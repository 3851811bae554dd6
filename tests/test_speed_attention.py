"""The packed-row attention path (``varlen``), the ``attention = "auto"`` choice and regional compile, on CPU.

On CPU ``varlen`` runs its SDPA-per-document form; the flash kernel itself is checked by
tests/test_speed_gpu.py on a GPU. Both share the plumbing tested here: document boundaries from
the collator or from position_ids, token-major layouts, GQA, and the fallbacks.
"""

import pytest
import torch
from ftcore.config import validate_config
from ftcore.errors import ConfigError
from ftcore.speed import (
    VARLEN,
    DocumentBoundaries,
    auto_attention,
    compile_decoder_layers,
    decoder_layers,
    packed_attention_kwargs,
    register_varlen_attention,
    resolve_attention,
    with_document_boundaries,
)
from ftcore.testing import tiny_model

LENGTHS = [5, 11, 3, 13]


def config(**tables):
    tables.setdefault("model", {"base": "org/model"})
    tables.setdefault("train", {"output_dir": "/tmp/unused"})
    return validate_config(tables)[0]


def packed_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 512, (n,), generator=generator) for n in LENGTHS]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return docs, torch.cat(docs)[None], position_ids


def test_document_boundaries_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    kwargs = packed_attention_kwargs(position_ids)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 15, 18]  # a row start always begins a document
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 6
    assert packed_attention_kwargs(torch.tensor([[3, 4, 5, 9, 10]]))["cu_seq_lens_q"].tolist() == [0, 3, 5]


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("boundaries", ["collator", "position_ids"])
def test_varlen_equals_each_document_alone(architecture, boundaries):
    """Packed rows through varlen give every document the logits and gradients it has alone (GQA model)."""
    docs, input_ids, position_ids = packed_batch()
    alone = tiny_model(architecture)
    alone.set_attn_implementation("sdpa")
    expected = torch.cat([alone(input_ids=doc[None]).logits for doc in docs], dim=1)
    expected.float().pow(2).mean().backward()

    packed = tiny_model(architecture)
    packed.set_attn_implementation(register_varlen_attention())
    extra = packed_attention_kwargs(position_ids) if boundaries == "collator" else {}
    logits = packed(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
    logits.float().pow(2).mean().backward()

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(packed.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_without_positions_is_causal_per_row():
    model = tiny_model("llama")
    reference = tiny_model("llama")
    model.set_attn_implementation(register_varlen_attention())
    reference.set_attn_implementation("sdpa")
    input_ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_varlen_decoding_with_a_cache_falls_back_to_sdpa():
    model, reference = tiny_model("llama"), tiny_model("llama")
    model.set_attn_implementation(register_varlen_attention())
    reference.set_attn_implementation("sdpa")
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    got = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert (
        got.tolist() == reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0).tolist()
    )


def test_varlen_refuses_what_it_cannot_compute():
    model = tiny_model("llama", attention_dropout=0.1)
    model.set_attn_implementation(register_varlen_attention())
    model.train()
    with pytest.raises(ConfigError, match="attention dropout") as error:
        model(input_ids=torch.zeros((1, 4), dtype=torch.long))
    assert error.value.key == "model.attention"


def test_auto_attention_on_cpu_and_explicit_choices():
    assert auto_attention(config(train={"output_dir": "/tmp/x", "packing": True})) == "sdpa"  # no GPU here
    assert resolve_attention(config()) == "sdpa"
    assert resolve_attention(config(model={"base": "org/model", "attention": "varlen"})) == VARLEN
    assert resolve_attention(config(model={"base": "org/model", "attention": "eager"})) == "eager"
    with pytest.raises(ConfigError, match="varlen"):
        config(model={"base": "org/model", "attention": "varlen2"})


def test_collator_gets_boundaries_only_for_packed_rows_and_attention_that_reads_them():
    class Collator:
        packed = True

        def __call__(self, features):
            return {"position_ids": torch.tensor([[0, 1, 0, 1, 2]])}

    varlen_model, sdpa_model = tiny_model("llama"), tiny_model("llama")
    varlen_model.set_attn_implementation(register_varlen_attention())
    sdpa_model.set_attn_implementation("sdpa")
    wrapped = with_document_boundaries(Collator(), varlen_model)
    assert isinstance(wrapped, DocumentBoundaries)
    assert wrapped([])["cu_seq_lens_q"].tolist() == [0, 2, 5]
    assert not isinstance(with_document_boundaries(Collator(), sdpa_model), DocumentBoundaries)
    unpacked = Collator()
    unpacked.packed = False
    assert not isinstance(with_document_boundaries(unpacked, varlen_model), DocumentBoundaries)


def test_compile_marks_every_decoder_layer_and_nothing_else():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("qwen3", num_hidden_layers=3), LoraConfig(r=4, target_modules="all-linear")
    )
    assert compile_decoder_layers(model) == 3
    layers = decoder_layers(model)
    assert {type(layer).__name__ for layer in layers} == {"Qwen3DecoderLayer"}
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert model.get_base_model().model.norm._compiled_call_impl is None


def test_compile_without_decoder_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="no decoder layers") as error:
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert error.value.key == "model.compile"
