"""qwen3.kernels against their references.

CPU int8 GEMV (int8_cpu): against a float64 computation on random shapes (in_features not a multiple of 16,
odd out_features, 1-8 rows, fp32 and bf16 x), in every instruction-set variant this CPU runs; Int8Linear's
"auto" takes it for few rows, and where it cannot be built (simulated) falls back to PyTorch's kernels with
the same results as before. The kernel is built once per test session (a few seconds; cached on disk).

Rounding bound, as in test_quantize.py: the kernel accumulates in fp32, so for y_n = s_n sum_k x_k q_nk
|y - y_exact| <= (K + 2) 2^-24 s_n sum_k |x_k q_nk|, plus one rounding to bf16 (2^-8 |y|) for bf16 x.
"""

from __future__ import annotations

import pytest
import torch

from qwen3.kernels import int8_cpu
from qwen3.quantize import CPU_GEMV_MAX_ROWS, Int8Linear, quantize_per_row

FP32_U = 2.0**-24
BF16_U = 2.0**-8


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def isas() -> list[str]:
    """The kernel variants this machine builds and runs (AVX-512 CPUs run the AVX2 one too)."""
    best = int8_cpu.cpu_isa()
    if best is None or int8_cpu.compiler() is None:
        pytest.skip("no x86 CPU with AVX2, or no C++ compiler")
    variants = ["avx512", "avx2"] if best == "avx512" else ["avx2"]
    for isa in variants:
        assert int8_cpu.library(isa) is not None, f"the {isa} kernel did not build"
    return variants


def random_int8(out_features: int, in_features: int, seed: int, scale_dtype=torch.float32):
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator(seed))
    s = (torch.rand(out_features, generator=generator(seed + 1)) / 127 + 1e-4).to(scale_dtype)
    return q, s


def check_against_float64(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    x64, q64, s64 = x.double().reshape(-1, q.shape[1]), q.double(), s.double()
    exact = (x64 @ q64.T) * s64  # (M, N)
    K = q.shape[1]
    bound = (K + 2) * FP32_U * (x64.abs() @ q64.abs().T) * s64
    if y.dtype == torch.bfloat16:
        bound = bound + BF16_U * (exact.abs() + bound)
    error = (y.double().reshape(exact.shape) - exact).abs()
    assert (error <= bound).all(), f"max error {error.max():.3e}, bound there {bound[error.argmax() // bound.shape[1]]}"


# (in_features, out_features): remainders of 16 and 64 along K, odd and tiny N, both tails of a 4-row tile
SHAPES = [(1, 1), (7, 3), (16, 4), (63, 5), (64, 9), (65, 33), (100, 7), (257, 130), (1000, 67), (1024, 256)]


@pytest.mark.parametrize("in_features, out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemv_matches_float64_reference(isas, in_features, out_features, dtype):
    q, s = random_int8(out_features, in_features, seed=in_features * 1000 + out_features, scale_dtype=dtype)
    for rows in range(1, 9):
        x = torch.randn(rows, in_features, generator=generator(rows)).to(dtype)
        for isa in isas:
            y = int8_cpu.int8_gemv(x, q, s, isa=isa)
            assert y.dtype == dtype and y.shape == (rows, out_features)
            check_against_float64(y, x, q, s)


def test_int8_gemv_keeps_leading_dimensions_and_mixed_scale_dtype(isas):
    q, s = random_int8(45, 70, seed=1, scale_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 70, generator=generator(2))  # fp32 x, bf16 scales
    y = int8_cpu.int8_gemv(x, q, s)
    assert y.shape == (2, 3, 45) and y.dtype == torch.float32
    check_against_float64(y, x, q, s)
    x_view = torch.randn(70, 6, generator=generator(3)).T[:4]  # not contiguous
    check_against_float64(int8_cpu.int8_gemv(x_view, q, s), x_view, q, s)


def test_int8_gemv_rejects_bad_operands(isas):
    q, s = random_int8(8, 32, seed=4)
    with pytest.raises(ValueError, match="x: expected"):
        int8_cpu.int8_gemv(torch.randn(1, 31), q, s)
    with pytest.raises(ValueError, match="x: expected"):
        int8_cpu.int8_gemv(torch.randn(1, 32).half(), q, s)
    with pytest.raises(ValueError, match="q: expected"):
        int8_cpu.int8_gemv(torch.randn(1, 32), q.T.contiguous().T, s)
    with pytest.raises(ValueError, match="s: expected"):
        int8_cpu.int8_gemv(torch.randn(1, 32), q, s[:7])


def test_build_is_cached_and_announced(isas, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = int8_cpu.build(isas[-1])
    assert path.parent == tmp_path and path.exists()
    assert capsys.readouterr().err.strip() == int8_cpu.BUILD_NOTICE
    assert int8_cpu.build(isas[-1]) == path  # the second process finds it
    assert capsys.readouterr().err == ""
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial files left


def int8_linear(in_features: int, out_features: int, dtype: torch.dtype, seed: int) -> Int8Linear:
    module = Int8Linear(in_features, out_features, dtype=dtype)
    w = torch.randn(out_features, in_features, generator=generator(seed)).to(dtype)
    module.weight.data, module.weight_scale.data = quantize_per_row(w)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_takes_the_cpu_kernel_for_few_rows(isas, dtype):
    module = int8_linear(80, 48, dtype, seed=5)  # in_features 80: int8pack could run too
    few = torch.randn(2, 3, 80, generator=generator(6)).to(dtype)
    many = torch.randn(1, CPU_GEMV_MAX_ROWS + 1, 80, generator=generator(7)).to(dtype)
    with torch.no_grad():
        assert torch.equal(module(few), int8_cpu.int8_gemv(few, module.weight, module.weight_scale))
        check_against_float64(module(few), few, module.weight, module.weight_scale)
        module.kernel = "cpu_gemv"  # explicit: any number of rows
        assert torch.equal(module(many), int8_cpu.int8_gemv(many, module.weight, module.weight_scale))
        module.kernel = "auto"
        assert torch.equal(module(many), module.forward_plain(many))  # prefill: as before
    x = few.clone().requires_grad_()
    module(x).float().sum().backward()  # gradients flow: the plain path
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_where_the_kernel_cannot_be_built(monkeypatch, capsys, dtype):
    """No compiler (simulated): one line on stderr, and auto computes what it computed before the kernel."""

    def no_compiler(isa: str):
        raise int8_cpu.KernelBuildError("no C++ compiler found (set CXX or install g++)")

    monkeypatch.setattr(int8_cpu, "_libraries", {})
    monkeypatch.setattr(int8_cpu, "build", no_compiler)
    module = int8_linear(64, 24, dtype, seed=8)
    x = torch.randn(1, 2, 64, generator=generator(9)).to(dtype)
    with torch.no_grad():
        y = module(x)
        if int8_cpu.cpu_isa() is not None:
            assert "int8 CPU kernel unavailable (no C++ compiler found" in capsys.readouterr().err
        assert not int8_cpu.available()
        expected = module.forward_int8pack(x.bfloat16()).to(dtype)  # the previous rule: int8pack in bf16
        assert torch.equal(y, expected)
        with pytest.raises(RuntimeError, match="not available"):
            module.kernel = "cpu_gemv"
            module(x)


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("QWEN3_CPU_KERNEL", "0")
    assert int8_cpu.library() is None and not int8_cpu.available()
