"""The `scattermoe` plugin's hooks and its CPU path (the pure-torch reference) on tiny real MoEs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from ftcore.config import validate_config
from ftcore.errors import ConfigError, PluginError
from ftcore.testing import stories_model, tiny_model
from ftcore_scattermoe import experts
from ftcore_scattermoe.testing import EXPERT_PARAMETERS as EXPERTS
from ftcore_scattermoe.testing import compare_with_eager, tiny_moe


def load(tmp_path, **scattermoe):
    raw = {
        "plugins": ["scattermoe"],
        "model": {"base": str(stories_model())},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    if scattermoe:
        raw["scattermoe"] = scattermoe
    return validate_config(raw, base_dir=tmp_path)


def test_plugin_module_imports_no_torch():
    code = "import sys, ftcore_scattermoe.plugin; assert 'torch' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_table_defaults_and_unknown_key(tmp_path):
    config, _ = load(tmp_path)
    assert config.scattermoe.expert_lora and config.scattermoe.autotune
    config, _ = load(tmp_path, expert_lora=False)
    assert not config.scattermoe.expert_lora
    with pytest.raises(ConfigError, match='scattermoe.autotun.*did you mean "autotune"'):
        load(tmp_path, autotun=False)


def test_model_load_kwargs_selects_scattermoe(tmp_path):
    config, plugins = load(tmp_path)
    kwargs = {"dtype": torch.float32}
    plugins.hook.model_load_kwargs(config=config, kwargs=kwargs, run=None)
    assert kwargs["experts_implementation"] == "scattermoe"
    from ftcore.testing import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), **kwargs)
    assert model.config._experts_implementation == "scattermoe"
    with pytest.raises(PluginError, match="already set to 'grouped_mm'"):
        plugins.hook.model_load_kwargs(
            config=config, kwargs={"experts_implementation": "grouped_mm"}, run=None
        )


def test_dense_model_is_refused_naming_what_is_supported(tmp_path):
    config, plugins = load(tmp_path)
    with pytest.raises(PluginError, match=r"\(llama\) has no experts.*Supported: .*qwen3_moe.*mixtral"):
        plugins.hook.patch_model(config=config, model=tiny_model("llama"), run=None)


def test_quantized_or_expert_parallel_experts_are_refused():
    model = tiny_model("mixtral")
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(PluginError, match=r"layers\.1\.mlp\.experts .*expert parallelism"):
        experts.check_model(model)
    model = tiny_model("qwen3_moe")
    model.model.layers[0].mlp.experts.down_proj.data = model.model.layers[0].mlp.experts.down_proj.data.to(
        torch.float8_e4m3fn
    )
    with pytest.raises(PluginError, match=r"down_proj is not a 3-D float32/bfloat16/float16 tensor"):
        experts.check_model(model)


def test_hooks_route_expert_lora_through_the_kernels(tmp_path):
    config, plugins = load(tmp_path)
    model = tiny_moe("qwen3_moe", with_lora=True)
    plugins.hook.patch_model(config=config, model=model, run=None)
    plugins.hook.after_model_load(config=config, model=model, run=None)
    assert model.config._experts_implementation == "scattermoe"
    wrapped = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(wrapped) == 2 and all(m.parameter_name == "down_proj" for m in wrapped)

    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    fused = model(input_ids=ids).logits
    model.set_experts_implementation("eager")
    assert torch.allclose(fused, model(input_ids=ids).logits, atol=1e-5)  # peft's generic path
    model.set_experts_implementation("scattermoe")
    with model.disable_adapter():
        without_lora = model(input_ids=ids).logits
    assert not torch.allclose(fused, without_lora, atol=1e-3)
    model.set_experts_implementation("eager")
    with model.disable_adapter():
        assert torch.allclose(without_lora, model(input_ids=ids).logits, atol=1e-5)


def test_expert_lora_off_keeps_peft_path(tmp_path):
    config, plugins = load(tmp_path, expert_lora=False)
    model = tiny_moe("mixtral", with_lora=True)
    plugins.hook.patch_model(config=config, model=model, run=None)
    plugins.hook.after_model_load(config=config, model=model, run=None)
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_non_gated_experts_match_eager():
    """NemotronH experts: up_proj without a gate and a relu2 activation (run as the model defines it)."""
    from transformers import AutoConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    experts.register()
    config = AutoConfig.for_model(
        "nemotron_h", hidden_size=32, moe_intermediate_size=48, n_routed_experts=4, mlp_hidden_act="relu2"
    )
    generator = torch.Generator().manual_seed(0)
    module = NemotronHExperts(config)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    x = torch.randn(10, 32, generator=generator)
    top_k = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=generator)
    results = []
    for implementation in ("eager", "scattermoe"):
        config._experts_implementation = implementation
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        out = module(inputs, top_k, weights)
        out.square().sum().backward()
        results.append((out, inputs.grad, module.up_proj.grad.clone(), module.down_proj.grad.clone()))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_cpu_fallback_matches_eager(architecture, with_lora):
    compare_with_eager(architecture, with_lora, "cpu", torch.float32, tolerance=1e-5)


def test_core_loader_selects_kernels_and_fuses_expert_lora(tmp_path, ftcore_tiny_model_dir):
    from ftcore.model import load_model_and_tokenizer

    raw = {
        "plugins": ["scattermoe"],
        "model": {"base": str(ftcore_tiny_model_dir("qwen3_moe")), "dtype": "float32"},
        "adapter": {"r": 4, "alpha": 8, "target_parameters": list(EXPERTS)},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    config, plugins = validate_config(raw, base_dir=tmp_path)
    model, _ = load_model_and_tokenizer(config, plugins)
    assert model.config._experts_implementation == "scattermoe"
    assert len([m for m in model.modules() if "forward" in m.__dict__]) == 2


@pytest.mark.slow
def test_training_a_tiny_moe_with_expert_lora(run_ftcore, ftcore_tiny_model_dir, capsys):
    """A run with the plugin (in-process, as `ftcore run`): LoRA on the experts trains through the
    kernels and saves with peft."""
    from safetensors.torch import load_file

    config = {
        "model": {"base": str(ftcore_tiny_model_dir("qwen3_moe"))},
        "adapter": {"r": 4, "alpha": 8, "targets": ["q_proj"], "target_parameters": EXPERTS},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-2},
    }
    trained = run_ftcore(config, plugins=["scattermoe"], steps=4)
    printed = capsys.readouterr().out
    assert "scattermoe: 2 experts modules run on the ScatterMoE kernels" in printed
    assert "scattermoe: LoRA on 2 experts modules runs in the fused kernels" in printed
    losses = [row["loss"] for row in trained.metrics if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    adapter = load_file(trained.output_dir / "adapter_model.safetensors")
    expert_b = [t for name, t in adapter.items() if "experts" in name and "lora_B" in name]
    assert len(expert_b) == 4 and all(t.abs().sum() > 0 for t in expert_b)  # B starts at zero: dB trained it


def _autograd_ops(output) -> set[str]:
    """The names of the autograd nodes that made ``output``."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [parent for parent, _ in node.next_functions]
    return names


@pytest.mark.parametrize("mode", ["grouped_mm", "kernels"])
def test_full_finetuning_of_experts_runs_grouped_mm_unless_the_kernels_are_asked_for(tmp_path, mode):
    """Experts that train their own weights (no LoRA) run transformers' grouped_mm, faster on every
    measured shape; ``full_finetuning = "kernels"`` keeps the kernels. LoRA and frozen experts run the kernels."""
    config, plugins = load(tmp_path, full_finetuning=mode)
    model = tiny_moe("qwen3_moe", with_lora=False)
    plugins.hook.patch_model(config=config, model=model, run=None)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    ops = _autograd_ops(model(input_ids=ids).logits)
    assert any("GroupedMm" in name or "grouped_mm" in name.lower() for name in ops) is (
        mode == "grouped_mm"
    ), ops
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)
    frozen = _autograd_ops(model(input_ids=ids).logits)
    assert not any("grouped" in name.lower() for name in frozen), frozen
