"""CPU tests of the liger plugin: discovery, config, patch selection and verification, error paths,
and the kernels that run under Triton's interpreter (rope, fused linear cross-entropy)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ftcore.config import validate_config
from ftcore.errors import ConfigError, PluginError
from ftcore.plugins import Plugins
from ftcore.testing import tiny_config, tiny_model

ARCHITECTURES = ("llama", "qwen3", "qwen3_moe", "mixtral")


def liger_config(**liger):
    raw = {"plugins": ["liger"], "model": {"base": "tiny"}, "train": {"output_dir": "unused"}, "liger": liger}
    return validate_config(raw)


@pytest.fixture
def restore_transformers():
    """liger-kernel's apply functions also replace names in the modelling modules (rope, norm and
    MLP classes) for the whole process: put them back so that other tests see stock transformers."""
    modules = [importlib.import_module(f"transformers.models.{a}.modeling_{a}") for a in ARCHITECTURES]
    saved = {module: dict(vars(module)) for module in modules}
    yield
    for module, attributes in saved.items():
        for name, value in attributes.items():
            setattr(module, name, value)


def test_plugin_is_discovered_and_imports_no_torch():
    assert "liger" in Plugins(["liger"]).enabled
    code = "import sys, ftcore_liger.plugin; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_table_defaults_to_liger_kernels_own_defaults():
    config, _ = liger_config()
    assert config.liger.model_dump() == dict.fromkeys(
        ("rms_norm", "rope", "swiglu", "layer_norm", "fused_linear_cross_entropy", "rms_norm_gated")
    ) | {"chunk_mem_const": 8}


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match='did you mean "rms_norm"'):
        liger_config(rmsnorm=True)


def test_fused_linear_cross_entropy_and_cce_together_is_an_error():
    raw = {"plugins": ["liger", "cce"], "model": {"base": "tiny"}, "train": {"output_dir": "unused"}}
    with pytest.raises(ConfigError, match="fused_linear_cross_entropy = false"):
        validate_config(raw)
    config, _ = validate_config({**raw, "liger": {"fused_linear_cross_entropy": False}})
    assert config.liger.fused_linear_cross_entropy is False


def test_unsupported_architecture_lists_the_supported_ones():
    config, plugins = liger_config()
    from transformers import AutoConfig

    with pytest.raises(PluginError, match=r"no kernels for model type 'gpt2'.*llama.*qwen3"):
        plugins.hook.before_model_load(config=config, model_config=AutoConfig.for_model("gpt2"), run=None)


def test_kernel_the_architecture_lacks_is_an_error():
    config, plugins = liger_config(layer_norm=True)
    with pytest.raises(
        PluginError, match=r"no layer_norm kernel for model type 'llama'.*rms_norm, rope, swiglu"
    ):
        plugins.hook.before_model_load(config=config, model_config=tiny_config("llama"), run=None)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs kernels on the CPU"
)
def test_no_gpu_is_an_error_before_loading(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    config, plugins = liger_config()
    with pytest.raises(PluginError, match="no GPU"):
        plugins.hook.before_model_load(config=config, model_config=tiny_config("llama"), run=None)


def test_swiglu_key_selects_geglu_for_gemma():
    from ftcore_liger.plugin import LigerSection, enabled_kernels, kernel_arguments
    from liger_kernel.transformers.monkey_patch import apply_liger_kernel_to_gemma

    assert kernel_arguments(apply_liger_kernel_to_gemma, LigerSection(swiglu=False), "gemma") == {
        "geglu": False
    }
    assert "swiglu" in enabled_kernels(apply_liger_kernel_to_gemma, LigerSection())


EXPECTED_MODULES = {
    "llama": {"LigerRMSNorm", "LigerSwiGLUMLP"},
    "qwen3": {"LigerRMSNorm", "LigerSwiGLUMLP"},
    "qwen3_moe": {"LigerRMSNorm", "LigerExperts"},
    "mixtral": {"LigerRMSNorm", "LigerExperts"},
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_patch_takes_effect_per_architecture(architecture, restore_transformers):
    import peft

    config, plugins = liger_config()
    model = tiny_model(architecture)
    with pytest.raises(
        PluginError, match="rms_norm, rope, swiglu, fused_linear_cross_entropy are not active"
    ):
        plugins.hook.after_model_load(config=config, model=model, run=None)
    plugins.hook.patch_model(config=config, model=model, run=None)
    names = {module._get_name() for module in model.modules() if module._get_name().startswith("Liger")}
    assert names == EXPECTED_MODULES[architecture]
    assert model.forward.__func__.__module__ == f"liger_kernel.transformers.model.{architecture}"
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    plugins.hook.after_model_load(config=config, model=model, run=None)


def test_kernels_set_to_false_stay_off(restore_transformers):
    config, plugins = liger_config(rms_norm=False, fused_linear_cross_entropy=False)
    model = tiny_model("llama")
    forward = model.forward
    plugins.hook.patch_model(config=config, model=model, run=None)
    assert not any(module._get_name() == "LigerRMSNorm" for module in model.modules())
    assert model.forward == forward
    plugins.hook.after_model_load(config=config, model=model, run=None)


def test_loss_and_grads_match_plain_model_under_triton_interpreter():
    """Rope + fused linear cross-entropy through the compute_loss hook, Llama and Qwen3, full and LoRA,
    packed rows, accumulation; ``chunk_mem_const`` (default 8) reaches the kernel: 32 tokens of a
    512-token vocabulary, 64 wide, make one chunk instead of liger's default eight."""
    script = Path(__file__).with_name("liger_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cases = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(c["arch"], c["lora"]) for c in cases] == [
        (a, lora) for a in ("llama", "qwen3") for lora in (False, True)
    ]
    for case in cases:
        assert case["loss"] == pytest.approx(case["reference"], rel=1e-5), case
        assert case["max_rel_grad_error"] < 1e-4, case
        assert (case["chunks"], case["liger_default_chunks"]) == (1, 8), case
