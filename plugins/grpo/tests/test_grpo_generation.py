"""The hf generation backend on the real pretrained stories260K: the Generator contract."""

import pytest
import torch
from ftcore.testing import stories_model
from ftcore_grpo.generation import HFGenerator, SamplingParams
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["Once upon a time, there was a little", "The dog ran to the"]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories_model(), dtype=torch.float32).train()
    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    return model, tokenizer


def prompt_ids(tokenizer):
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def forward_logprobs(model, prompt, tokens, temperature):
    """Log-probs of ``tokens`` after ``prompt`` under logits / temperature (what the trainer computes)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_n_completions_per_prompt_in_order_with_the_policys_logprobs(policy):
    model, tokenizer = policy
    generator = HFGenerator(model, tokenizer)
    generator.sync_weights(model, 3)
    sampling = SamplingParams(temperature=0.7, max_tokens=12, seed=1)
    prompts = prompt_ids(tokenizer)
    out = generator.generate(prompts, 3, sampling)
    assert [len(group) for group in out] == [3, 3]
    for prompt, group in zip(prompts, out, strict=True):
        for completion in group:
            assert 1 <= len(completion.token_ids) <= 12 and completion.policy_version == 3
            ends_in_eos = completion.token_ids[-1] == tokenizer.eos_token_id
            assert completion.finish_reason == ("stop" if ends_in_eos else "length")
            assert ends_in_eos or len(completion.token_ids) == 12
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            expected = forward_logprobs(model, prompt, completion.token_ids, 0.7)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # sampled, not greedy
    assert model.training  # the model's mode is restored
    assert generator.generate(prompts, 3, sampling) == out  # the seed fixes the draw
    assert generator.generate(prompts, 3, SamplingParams(temperature=0.7, max_tokens=12, seed=2)) != out


def test_filters_change_sampling_but_not_the_logprobs_definition(policy):
    model, tokenizer = policy
    generator = HFGenerator(model, tokenizer, batch_size=2)  # 2 sequences per generate call
    prompts = prompt_ids(tokenizer)
    greedy = generator.generate(prompts, 2, SamplingParams(temperature=0, max_tokens=8))
    top1 = generator.generate(prompts, 2, SamplingParams(temperature=0.5, top_k=1, max_tokens=8, seed=3))
    assert [[c.token_ids for c in g] for g in top1] == [[c.token_ids for c in g] for g in greedy]
    completion = top1[0][0]
    expected = forward_logprobs(model, prompts[0], completion.token_ids, 0.5)  # unfiltered, at temperature
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)
    model.generation_config.top_k = 1  # the model's own generation settings are not inherited
    try:
        sampled = generator.generate(prompts[:1], 4, SamplingParams(max_tokens=8, seed=4))
    finally:
        model.generation_config.top_k = None
    assert len({tuple(c.token_ids) for c in sampled[0]}) > 1


def test_stop_strings_end_a_completion_with_the_token_that_completes_them(policy):
    model, tokenizer = policy
    generator = HFGenerator(model, tokenizer)
    out = generator.generate(prompt_ids(tokenizer), 2, SamplingParams(max_tokens=48, stop=["."], seed=0))
    stopped = [c for group in out for c in group if c.finish_reason == "stop"]
    assert stopped
    for completion in stopped:
        decoded = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        if completion.token_ids[-1] != tokenizer.eos_token_id:
            assert "." in decoded and "." not in tokenizer.decode(completion.token_ids[:-1])
        assert "." not in completion.text and decoded.startswith(completion.text)
        assert len(completion.logprobs) == len(completion.token_ids)


def test_the_static_cache_path_samples_what_the_dynamic_cache_does(policy):
    model, tokenizer = policy
    prompts = prompt_ids(tokenizer)
    sampling = SamplingParams(temperature=0.8, max_tokens=10, seed=5)
    dynamic = HFGenerator(model, tokenizer).generate(prompts, 2, sampling)
    static = HFGenerator(model, tokenizer, static_cache=True).generate(
        prompts, 2, sampling
    )  # prompts padded to 64 tokens
    assert [[c.token_ids for c in g] for g in static] == [[c.token_ids for c in g] for g in dynamic]
    for group_static, group_dynamic in zip(static, dynamic, strict=True):
        for a, b in zip(group_static, group_dynamic, strict=True):
            torch.testing.assert_close(
                torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4
            )


def test_a_compiled_decode_that_fails_falls_back_to_uncompiled(policy, caplog):
    from transformers import CompileConfig

    model, tokenizer = policy
    broken = CompileConfig(backend="no_such_backend")
    broken._compile_all_devices = True  # compile on the CPU too, with a backend that does not exist
    model.generation_config.compile_config = broken
    try:
        generator = HFGenerator(model, tokenizer)
        generator.compile = generator.static_cache = True  # what compile=True gives on a CUDA GPU
        sampling = SamplingParams(temperature=0.8, max_tokens=6, seed=5)
        out = generator.generate(prompt_ids(tokenizer), 2, sampling)
    finally:
        model.generation_config.compile_config = None
    assert "the compiled decode step failed" in caplog.text
    assert not generator.compile and out == HFGenerator(model, tokenizer).generate(
        prompt_ids(tokenizer), 2, sampling
    )
