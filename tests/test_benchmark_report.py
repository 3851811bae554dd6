"""The SFT benchmark's headline (benchmarks/sft_throughput.py): ftcore's fastest configuration against
the fastest TRL one by the mean, and the fastest ftcore configuration within issue 20's memory bound."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("sft_throughput", REPO / "benchmarks" / "sft_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def result(config: str, mean: float, median: float, gib: float) -> dict:
    return {
        "model": "qwen3-0.6b", "config": config, "device": "H200", "mean_tokens_per_second": mean,
        "tokens_per_second": median, "peak_allocated_gib": gib, "mfu": 0.2, "first_step_s": 10.0,
        "step_seconds": [0.1, 0.3], "compiles_in_timed_steps": 0,
        "triton_compiles_in_timed_steps": ["liger_cross_entropy_kernel"],
    }  # fmt: skip


def test_headline_is_the_fastest_by_the_mean_and_the_lean_line_respects_the_memory_bound():
    bench = load_benchmark()
    results = [
        result("trl-bf16-packed-liger-flex-nockpt", 40_000, 39_000, 14.0),
        result("trl-packed-liger-flex", 30_000, 45_000, 10.0),  # faster median step, slower mean
        result("ftcore-liger-compile", 66_000, 70_000, 13.6),
        result("ftcore-liger-compile-ckpt4", 64_000, 68_000, 11.2),  # 0.80x of 14.0 GiB
        result("ftcore-default", 50_000, 50_000, 5.0),
        {"model": "qwen3-0.6b", "config": "exp-gone", "error": "exit 1"},  # from another version
    ]
    text = bench.report(results)
    assert "fastest TRL (mean): trl-bf16-packed-liger-flex-nockpt, 40,000" in text
    assert "ftcore best / fastest TRL: 1.65x tokens/s (mean), 1.79x (median step), 0.97x peak memory" in text
    assert (
        "ftcore's fastest within 0.85x its memory: ftcore-liger-compile-ckpt4, 1.60x tokens/s (mean), "
        "1.74x (median step), 0.80x peak memory"
    ) in text
    assert "0.300 (0 frames, 1 Triton kernels)" in text
    assert "(not a configuration of this version of the benchmark)" in text


def test_lean_line_says_so_when_no_configuration_fits():
    bench = load_benchmark()
    peer = result("trl-bf16-packed-liger-flex-nockpt", 40_000, 39_000, 14.0)
    line = bench.lean_line([result("ftcore-liger-compile", 66_000, 70_000, 13.6)], peer)
    assert line == "- no ftcore configuration of this run peaked at or below 0.85x the fastest TRL's memory"


def test_define_adds_a_configuration_from_a_base_and_dotted_keys():
    bench = load_benchmark()
    name = bench.define('chunk16=ftcore-liger-compile+liger.chunk_mem_const=16+model.attention="sdpa"')
    assert name == "chunk16"
    assert bench.FTCORE["chunk16"]["liger"]["chunk_mem_const"] == 16
    assert bench.FTCORE["chunk16"]["model"] == {
        "compile": True,
        "gradient_checkpointing": False,
        "attention": "sdpa",
    }
    assert "chunk_mem_const" not in bench.FTCORE["ftcore-liger-compile"]["liger"]  # the base is untouched
    for bad in ("x=no-such-base+a.b=1", "y=ftcore-default+model=1", "ftcore-default=ftcore-default"):
        try:
            bench.define(bad)
        except ValueError as error:
            assert bad in str(error)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_kernel_time_by_kind_groups_cuda_kernel_names_and_reports_the_busy_share():
    bench = load_benchmark()
    kernels = {
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": 0.060,
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>": 0.008,
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<...>>": 0.006,
        "void at::native::multi_tensor_apply_kernel<at::native::LpNormFunctor<float>>": 0.002,
        "liger_cross_entropy_kernel": 0.001,
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": 0.010,
        "Memset (Device)": 0.001,
        "void at::native::vectorized_elementwise_kernel<4, ...>": 0.002,
    }
    summary = bench.kernel_time_by_kind(kernels, wall_seconds=0.1)
    assert summary["kinds"] == {
        "matmul": 0.06, "compiled (inductor)": 0.01, "attention": 0.008, "optimizer": 0.006,
        "grad norm/clip": 0.002, "eager elementwise": 0.002, "loss (liger)": 0.001, "memcpy/memset": 0.001,
    }  # fmt: skip
    assert summary["busy"] == 0.9 and summary["gpu_s"] == 0.09
    results = [result("ftcore-liger-compile", 66_000, 70_000, 13.6) | {"profile": summary}]
    assert "GPU busy 90% of 100 ms; kernel time: matmul 67%, compiled (inductor) 11%" in bench.report(results)


def test_idle_gaps_sum_the_gpu_waits_between_kernels_and_name_the_longest():
    bench = load_benchmark()
    timeline = [  # (start us, end us, kernel): "b" overlaps "c" on another stream, then 80 us idle
        (0, 10, "gemm"), (12, 20, "b"), (15, 30, "c"), (110, 120, "liger_cross_entropy_kernel"),
    ]  # fmt: skip
    text = bench.idle_gaps(timeline)
    assert text.splitlines()[0] == "idle 0.08 ms in 2 gaps over 0.1 ms; gaps over 50 us: 0.08 ms"
    longest = text.splitlines()[1].split()
    assert longest == ["0.080", "ms", "after", "c", "before", "liger_cross_entropy_kernel"]
    assert bench.idle_gaps([(0, 10, "gemm")]) == "none\n"
