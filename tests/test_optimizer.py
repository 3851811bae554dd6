"""``train.optimizer = "adamw_compiled"`` (ftcore.optimizer.CompiledAdamW) against torch's AdamW, on CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch
from ftcore.config import validate_config
from ftcore.errors import ConfigError
from ftcore.optimizer import CompiledAdamW

LEARNING_RATES = (1e-2, 5e-3, 2e-3, 1e-3)  # a schedule: a new rate every step


def parameters(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 4), (4,), (3, 8))]


def groups(params):
    return [
        {"params": params[:1] + params[2:], "weight_decay": 0.1},
        {"params": params[1:2], "weight_decay": 0.0},
    ]


def gradients(step, params):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) for p in params]


def train(optimizer, params, steps=LEARNING_RATES, *, before_step=None):
    for step, lr in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for param, grad in zip(params, gradients(step, params), strict=True):
            param.grad = grad
        if before_step:
            before_step(step, optimizer)
        optimizer.step()


def assert_same(params, expected, **tolerance):
    for param, other in zip(params, expected, strict=True):
        torch.testing.assert_close(param.detach(), other.detach(), **tolerance)


def test_updates_as_torch_adamw_over_a_changing_learning_rate():
    params, expected = parameters(), parameters()
    compiled = CompiledAdamW(groups(params), betas=(0.9, 0.95), eps=1e-8)
    reference = torch.optim.AdamW(groups(expected), betas=(0.9, 0.95), eps=1e-8, foreach=False)
    train(compiled, params)
    train(reference, expected)
    assert_same(params, expected, rtol=1e-5, atol=1e-6)
    for param, other in zip(params, expected, strict=True):
        state, reference_state = compiled.state[param], reference.state[other]
        assert state.keys() == reference_state.keys()
        for key in state:
            torch.testing.assert_close(state[key].float(), reference_state[key].float(), rtol=1e-5, atol=1e-7)


def test_grad_scale_divides_the_gradients():
    params, expected = parameters(), parameters()
    compiled = CompiledAdamW(groups(params))
    reference = torch.optim.AdamW(groups(expected), foreach=False)
    scale = torch.tensor(4.0)

    def scaled(step, optimizer):  # None: fp16's gradient scaler after it unscaled the gradients itself
        optimizer.grad_scale = scale if step % 2 == 0 else None

    def divided(step, optimizer):
        for param in expected:
            param.grad /= scale if step % 2 == 0 else 1.0

    train(compiled, params, before_step=scaled)
    train(reference, expected, before_step=divided)
    assert_same(params, expected, rtol=1e-5, atol=1e-6)


def test_found_inf_skips_the_step_even_with_non_finite_gradients():
    params, expected = parameters(), parameters()
    compiled = CompiledAdamW(groups(params))
    reference = torch.optim.AdamW(groups(expected), foreach=False)

    def poison_step_1(step, optimizer):
        optimizer.found_inf = torch.tensor(float(step == 1))
        if step == 1:
            params[0].grad[0, 0] = float("nan")

    train(compiled, params, before_step=poison_step_1)
    # the reference never sees step 1 (its gradients nor its learning rate)
    train(reference, expected, steps=LEARNING_RATES[:1])
    for step, lr in list(enumerate(LEARNING_RATES))[2:]:
        for group in reference.param_groups:
            group["lr"] = lr
        for param, grad in zip(expected, gradients(step, expected), strict=True):
            param.grad = grad
        reference.step()
    assert_same(params, expected, rtol=1e-5, atol=1e-6)
    assert all(compiled.state[p]["step"].item() == 3 for p in params)


def test_a_saved_state_resumes_where_it_left_off():
    params, expected = parameters(), parameters()
    compiled = CompiledAdamW(groups(params), lr=1e-2)
    reference = torch.optim.AdamW(groups(expected), lr=1e-2, foreach=False)
    train(compiled, params, steps=LEARNING_RATES[:2])
    train(reference, expected, steps=LEARNING_RATES[:2])
    resumed = CompiledAdamW(groups(params), lr=1e-2)
    resumed.load_state_dict(compiled.state_dict())
    assert all(resumed.state[p]["step"].device == p.device for p in params)
    for optimizer, ps in ((resumed, params), (reference, expected)):
        for param, grad in zip(ps, gradients(7, ps), strict=True):
            param.grad = grad
        optimizer.step()
    assert_same(params, expected, rtol=1e-5, atol=1e-6)


def test_fsdp2_is_refused_with_the_fix():
    tables = {
        "model": {"base": "org/model"},
        "train": {"output_dir": "/tmp/unused", "optimizer": "adamw_compiled"},
        "distributed": {"strategy": "fsdp2"},
    }
    with pytest.raises(ConfigError, match="adamw_torch_fused") as error:
        validate_config(tables)
    assert error.value.key == "train.optimizer"


def test_the_optimizer_step_benchmark_runs_on_the_cpu(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"
    spec = importlib.util.spec_from_file_location("optimizer_step", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    results = benchmark.main(["--smoke"])
    assert [r["optimizer"] for r in results] == ["foreach", "compiled", "compiled+scale+flag"]
    assert all(r["ms"] > 0 and r["tb_per_s"] > 0 for r in results)
    assert "| compiled+scale+flag |" in capsys.readouterr().out
