"""The [grpo] table: defaults, clear errors naming the key, reward resolution; no torch to validate."""

import subprocess
import sys

import pytest
from ftcore.config import load_config
from ftcore.errors import ConfigError, PluginError
from ftcore.testing import asset, stories_model
from ftcore_grpo.config import importance_sampling
from ftcore_grpo.scoring import resolve_rewards


def write(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f"""
plugins = ["grpo"]
[model]
base = "{stories_model()}"
[[datasets]]
path = "{asset("data/gsm8k/train_first300.jsonl")}"
format = "prompt"
fields = {{prompt = "question"}}
options = {{columns = ["answer"]}}
[train]
method = "grpo"
output_dir = "out"
micro_batch_size = 4
gradient_accumulation_steps = 2
sequence_len = 512
[grpo]
num_generations = 4
rewards = ["gsm8k_accuracy"]
""")
    return path


def test_defaults_and_spellings(tmp_path):
    config, _ = load_config(write(tmp_path), ["grpo.scale_rewards=false"])
    grpo = config.grpo
    assert (grpo.generation, grpo.loss_type, grpo.beta, grpo.scale_rewards) == ("hf", "dapo", 0.0, "none")
    assert (grpo.reward_aggregation, grpo.reward_workers, grpo.sync_interval) == ("sum_then_normalize", 0, 1)
    assert grpo.vllm.url is None
    assert (grpo.async_prefetch, grpo.prefetch_depth, grpo.streaming_groups, grpo.skip_zero_advantage_batches) == (
        False, 1, 0, True,
    )  # fmt: skip
    assert importance_sampling(grpo) == "off" and grpo.off_policy_mask_threshold is None
    config, _ = load_config(write(tmp_path), ["grpo.async_prefetch=true"])
    assert importance_sampling(config.grpo) == "token"  # on by default once batches may be stale
    assert (config.grpo.importance_sampling_mode, config.grpo.importance_sampling_cap) == ("truncate", 2.0)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["train.packing=true"], "train.packing", "cannot pack"),
        (["grpo.num_generations=3"], "grpo.num_generations", "must divide the generation batch"),
        (["grpo.rewards=[]"], "grpo.rewards", "name at least one reward"),
        (["grpo.reward_weights=[1.0, 2.0]"], "grpo.reward_weights", "2 weights for 1 rewards"),
        (["grpo.reward_kwargs={regex_format = {pattern = 'x'}}"], "grpo.reward_kwargs", "not in rewards"),
        (["grpo.max_completion_length=512"], "grpo.max_completion_length", "no room for a prompt"),
        (['grpo.rewards=["a:b:c"]'], "grpo.rewards", "neither a reward name"),
        (
            [
                "train.eval_steps=2",
                "data.val_fraction=0.1",
                "train.micro_batch_size=2",
                "train.gradient_accumulation_steps=4",
            ],
            "train.micro_batch_size",
            "multiple of num_generations",
        ),
        (['grpo.hf_device="cuda:1"'], "grpo.hf_device", "set async_prefetch = true"),
        (
            ['grpo.hf_device="cuda:1"', "grpo.async_prefetch=true", 'grpo.generation="vllm"'],
            "grpo.hf_device",
            'generation = "hf"',
        ),  # fmt: skip
    ],
)
def test_cross_table_errors_name_the_key(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path), overrides)
    assert error.value.key == key and words in str(error.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("grpo.num_generation=4", 'did you mean "num_generations"'),
        ('grpo.loss_type="ppo"', "grpo.loss_type"),
        ("grpo.num_generations=1", "grpo.num_generations"),
        ('grpo.generation="sglang"', "grpo.generation"),
        ('grpo.reward_aggregation="mean"', "grpo.reward_aggregation"),
        ('grpo.importance_sampling="tokens"', "grpo.importance_sampling"),
        ('grpo.importance_sampling_mode="clip"', "grpo.importance_sampling_mode"),
        ("grpo.importance_sampling_cap=0", "grpo.importance_sampling_cap"),
        ("grpo.prefetch_depth=-1", "grpo.prefetch_depth"),
        ("grpo.streaming_groups=-1", "grpo.streaming_groups"),
        ("grpo.hf_compile=true", "key 'grpo.hf_compile' was renamed: use 'hf_cuda_graph'"),
    ],
)
def test_bad_values_are_config_errors(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path), [override])


def test_rewards_resolve_from_the_registry_and_beside_the_config(tmp_path):
    (tmp_path / "grpo_config_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [1.0] * len(completions)\n"
    )
    path = write(tmp_path)
    config, plugins = load_config(path, ['grpo.rewards=["gsm8k_accuracy", "grpo_config_rewards:short"]'])
    rewards = resolve_rewards(config, plugins)
    assert [r.name for r in rewards] == ["gsm8k_accuracy", "grpo_config_rewards:short"]
    assert rewards[1](["a", "b"]) == [1.0, 1.0]
    config, plugins = load_config(path, ['grpo.rewards=["gsm8k_acuracy"]'])
    with pytest.raises(PluginError, match='unknown reward "gsm8k_acuracy" \\(did you mean "gsm8k_accuracy"'):
        resolve_rewards(config, plugins)
    config, plugins = load_config(path, ['grpo.rewards=["no_such_module:f"]'])
    with pytest.raises(ConfigError, match="cannot import the reward module 'no_such_module'"):
        resolve_rewards(config, plugins)


def test_validate_does_not_import_torch(tmp_path):
    code = (
        "import sys; from ftcore.config import load_config; "
        f"load_config({str(write(tmp_path))!r}); print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_preprocess_shows_the_prompts_as_tokenized(tmp_path):
    from ftcore.model import load_tokenizer
    from ftcore_grpo.method import GRPOMethod

    config, plugins = load_config(
        write(tmp_path), ["train.sequence_len=120", "grpo.max_completion_length=20"]
    )
    lines = GRPOMethod().preview(config, plugins, load_tokenizer(config), 1)
    assert lines[0].startswith("=== prompt 0 (") and lines[1].startswith("<s> ")  # a text prompt, with BOS
    assert lines[2].startswith("columns: {'answer': ") and "####" in lines[2]
    assert lines[-1].startswith("prompts          ") and "dropped as too long" in lines[-1]
    assert int(lines[-1].split("; ")[1].split()[0]) > 0  # gsm8k questions over 100 tokens are dropped


def test_the_servers_address_may_change_on_resume_the_method_may_not(tmp_path):
    """``result_neutral`` keys (the vLLM server's address and timeouts) leave the config fingerprint
    that ``--resume`` compares unchanged; any other key changes it."""
    from ftcore.checkpoint import RESULT_NEUTRAL_KEYS

    path = write(tmp_path)

    def fingerprint(*overrides):
        return load_config(path, list(overrides))[0].fingerprint(RESULT_NEUTRAL_KEYS)

    first = fingerprint('grpo.vllm.url="http://127.0.0.1:8000"')
    assert fingerprint('grpo.vllm.url="http://127.0.0.1:9000"', "grpo.vllm.request_timeout=5.0") == first
    assert fingerprint('grpo.vllm.url="http://127.0.0.1:8000"', "grpo.num_generations=2") != first
