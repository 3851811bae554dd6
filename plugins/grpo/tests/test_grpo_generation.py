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


SETTINGS = {
    "sampled": SamplingParams(temperature=0.8, max_tokens=10, seed=5),
    "greedy": SamplingParams(temperature=0, max_tokens=10),
    "filtered": SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.3, max_tokens=12, seed=7),
    "stop strings": SamplingParams(max_tokens=40, stop=["."], seed=0),
}  # fmt: skip


def sampled(out):
    return [[(c.token_ids, c.text, c.finish_reason, c.policy_version) for c in group] for group in out]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_static_decode_loop_samples_what_generate_does(policy, setting):
    model, tokenizer = policy
    sampling = SETTINGS[setting]
    prompts = prompt_ids(tokenizer)  # of different lengths: left padding
    reference = HFGenerator(model, tokenizer).generate(prompts, 3, sampling)
    loop = HFGenerator(model, tokenizer, decode="static").generate(prompts, 3, sampling)
    assert sampled(loop) == sampled(reference)
    for group_loop, group_reference in zip(loop, reference, strict=True):
        for a, b in zip(group_loop, group_reference, strict=True):
            torch.testing.assert_close(
                torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4
            )


def test_the_static_decode_loop_samples_from_a_lora_policy_what_generate_does(policy):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = policy
    torch.manual_seed(1)
    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    sampling = SETTINGS["sampled"]
    reference = HFGenerator(lora, tokenizer).generate(prompt_ids(tokenizer), 2, sampling)
    assert sampled(
        HFGenerator(lora, tokenizer, decode="static").generate(prompt_ids(tokenizer), 2, sampling)
    ) == sampled(reference)
    assert sampled(reference) != sampled(
        HFGenerator(model, tokenizer).generate(prompt_ids(tokenizer), 2, sampling)
    )


def test_the_static_decode_loop_stops_when_every_row_has_ended(policy):
    model, tokenizer = policy
    period = tokenizer.convert_tokens_to_ids(".")
    sampling = SamplingParams(temperature=0, max_tokens=64)
    generators = [HFGenerator(model, tokenizer, decode=decode) for decode in ("generate", "static")]
    for generator in generators:
        generator.eos_token_ids = sorted({*generator.eos_token_ids, period})  # every story sentence ends
    reference, loop = (generator.generate(prompt_ids(tokenizer), 1, sampling) for generator in generators)
    assert sampled(loop) == sampled(reference)
    assert all(group[0].finish_reason == "stop" and len(group[0].token_ids) < 64 for group in loop)


def test_a_cuda_graph_decode_that_fails_falls_back_to_generate(policy, caplog, monkeypatch):
    model, tokenizer = policy
    sampling = SamplingParams(temperature=0.8, max_tokens=6, seed=5)
    generator = HFGenerator(model, tokenizer, decode="cuda_graph")
    generator.generate(prompt_ids(tokenizer), 2, sampling)
    assert generator.decode == "generate" and not caplog.text  # no CUDA here: never attempted
    generator.decode = "cuda_graph"
    monkeypatch.setattr(generator, "_graphable", lambda: True)  # attempted anyway: capturing on the CPU fails
    out = generator.generate(prompt_ids(tokenizer), 2, sampling)
    assert "the CUDA-graphed decode failed" in caplog.text
    assert generator.decode == "generate"
    assert out == HFGenerator(model, tokenizer).generate(prompt_ids(tokenizer), 2, sampling)


@pytest.mark.gpu
def test_the_cuda_graph_decode_equals_the_eager_loop_on_a_gpu():
    from transformers import AutoConfig

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    config = AutoConfig.for_model(
        "qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    prompts = prompt_ids(tokenizer)
    for sampling in (SETTINGS["greedy"], SETTINGS["sampled"]):
        graphed = HFGenerator(model.cpu(), tokenizer, decode="cuda_graph")
        model.cuda()  # as the trainer does: the policy reaches the GPU after the generator is made
        out = graphed.generate(prompts, 4, sampling)
        assert graphed.decode == "cuda_graph"  # no fallback happened
        eager = HFGenerator(model, tokenizer, decode="static").generate(prompts, 4, sampling)
        assert sampled(out) == sampled(eager)


def test_the_static_decode_loop_leaves_the_global_generator_to_other_threads(policy):
    """Async prefetch generates in a background thread while the trainer draws from torch's global
    generator: a seeded loop must neither reseed nor restore that generator under it."""
    import threading

    model, tokenizer = policy
    sampling = SamplingParams(temperature=0.8, max_tokens=24, seed=5)
    generator = HFGenerator(model, tokenizer, decode="static")
    alone = generator.generate(prompt_ids(tokenizer), 4, sampling)
    out = []
    background = threading.Thread(
        target=lambda: out.append(generator.generate(prompt_ids(tokenizer), 4, sampling))
    )
    torch.manual_seed(11)
    background.start()
    draws = []
    while background.is_alive() or len(draws) < 10:  # the trainer's draws, all through the generation
        draws.append(torch.rand(1).item())
    background.join()
    torch.manual_seed(11)
    assert draws == [torch.rand(1).item() for _ in draws]
    assert out[0] == alone
