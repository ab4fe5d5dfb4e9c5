"""qwen3.kernels against their references.

CPU int8 GEMV (cpu_gemv): against a float64 computation on random shapes (in_features not a multiple of 16,
odd out_features, 1-8 rows, fp32 and bf16 x), in every instruction-set variant this CPU runs; Int8Linear's
"auto" takes it for few rows, and where it cannot be built (simulated) falls back to PyTorch's kernels with
the same results as before. The kernel is built once per test session (a few seconds; cached on disk).

Rounding bound, as in test_quantize.py: the kernel accumulates in fp32, so for y_n = s_n sum_k x_k q_nk
|y - y_exact| <= (K + 2) 2^-24 s_n sum_k |x_k q_nk|, plus one rounding to bf16 (2^-8 |y|) for bf16 x.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from conftest import fix_triton_interpreter_scalars, run_in_triton_interpreter
from qwen3.kernels import cpu_gemv
from qwen3.quantize import CPU_GEMV_MAX_ROWS, Int8Linear, quantize_per_row

FP32_U = 2.0**-24
BF16_U = 2.0**-8


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def isas() -> list[str]:
    """The kernel variants this machine builds and runs (AVX-512 CPUs run the AVX2 one too)."""
    best = cpu_gemv.cpu_isa()
    if best is None or cpu_gemv.compiler() is None:
        pytest.skip("no x86 CPU with AVX2, or no C++ compiler")
    variants = ["avx512", "avx2"] if best == "avx512" else ["avx2"]
    for isa in variants:
        assert cpu_gemv.library(isa) is not None, f"the {isa} kernel did not build"
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
            y = cpu_gemv.int8_gemv(x, q, s, isa=isa)
            assert y.dtype == dtype and y.shape == (rows, out_features)
            check_against_float64(y, x, q, s)


def test_int8_gemv_keeps_leading_dimensions_and_mixed_scale_dtype(isas):
    q, s = random_int8(45, 70, seed=1, scale_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 70, generator=generator(2))  # fp32 x, bf16 scales
    y = cpu_gemv.int8_gemv(x, q, s)
    assert y.shape == (2, 3, 45) and y.dtype == torch.float32
    check_against_float64(y, x, q, s)
    x_view = torch.randn(70, 6, generator=generator(3)).T[:4]  # not contiguous
    check_against_float64(cpu_gemv.int8_gemv(x_view, q, s), x_view, q, s)


def test_int8_gemv_rejects_bad_operands(isas):
    q, s = random_int8(8, 32, seed=4)
    with pytest.raises(ValueError, match="x: expected"):
        cpu_gemv.int8_gemv(torch.randn(1, 31), q, s)
    with pytest.raises(ValueError, match="x: expected"):
        cpu_gemv.int8_gemv(torch.randn(1, 32).half(), q, s)
    with pytest.raises(ValueError, match="q: expected"):
        cpu_gemv.int8_gemv(torch.randn(1, 32), q.T.contiguous().T, s)
    with pytest.raises(ValueError, match="s: expected"):
        cpu_gemv.int8_gemv(torch.randn(1, 32), q, s[:7])


def test_build_is_cached_and_announced(isas, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = cpu_gemv.build(isas[-1])
    assert path.parent == tmp_path and path.exists()
    assert capsys.readouterr().err.strip() == cpu_gemv.BUILD_NOTICE
    assert cpu_gemv.build(isas[-1]) == path  # the second process finds it
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
        assert torch.equal(module(few), cpu_gemv.int8_gemv(few, module.weight, module.weight_scale))
        check_against_float64(module(few), few, module.weight, module.weight_scale)
        module.kernel = "cpu_gemv"  # explicit: any number of rows
        assert torch.equal(module(many), cpu_gemv.int8_gemv(many, module.weight, module.weight_scale))
        module.kernel = "auto"
        assert torch.equal(module(many), module.forward_plain(many))  # prefill: as before
    x = few.clone().requires_grad_()
    module(x).float().sum().backward()  # gradients flow: the plain path
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_where_the_kernel_cannot_be_built(monkeypatch, capsys, dtype):
    """No compiler (simulated): one line on stderr, and auto computes what it computed before the kernel."""

    def no_compiler(isa: str):
        raise cpu_gemv.KernelBuildError("no C++ compiler found (set CXX or install g++)")

    monkeypatch.setattr(cpu_gemv, "_libraries", {})
    monkeypatch.setattr(cpu_gemv, "build", no_compiler)
    module = int8_linear(64, 24, dtype, seed=8)
    x = torch.randn(1, 2, 64, generator=generator(9)).to(dtype)
    with torch.no_grad():
        y = module(x)
        if cpu_gemv.cpu_isa() is not None:
            assert "CPU GEMV kernel unavailable (no C++ compiler found" in capsys.readouterr().err
        assert not cpu_gemv.available()
        expected = module.forward_int8pack(x.bfloat16()).to(dtype)  # the previous rule: int8pack in bf16
        assert torch.equal(y, expected)
        with pytest.raises(RuntimeError, match="not available"):
            module.kernel = "cpu_gemv"
            module(x)


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("QWEN3_CPU_KERNEL", "0")
    assert cpu_gemv.library() is None and not cpu_gemv.available()


# ----------------------------------------------------------------------------------------------------------------------
# Triton: split-K GEMV and fused add + RMSNorm, on CUDA or (without a GPU) under TRITON_INTERPRET=1


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # must be set before triton is first imported
TRITON_DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
RUN_TRITON = CUDA or INTERPRETED
triton_test = pytest.mark.skipif(not RUN_TRITON, reason="runs in the TRITON_INTERPRET=1 subprocess (test below)")
# (x dtype, weight dtype): Triton 3.6's interpreter mishandles bf16 (garbage), so on the CPU only fp32 x runs
GEMV_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.int8),
               (torch.float32, torch.int8)] if TRITON_DEVICE == "cuda" else [(torch.float32, torch.float32),
                                                                          (torch.float32, torch.int8)]  # fmt: skip


@pytest.fixture(scope="module")
def gt():
    """qwen3.kernels.gemv_triton (imports triton)."""
    pytest.importorskip("triton")
    if INTERPRETED:
        fix_triton_interpreter_scalars()
    return importlib.import_module("qwen3.kernels.gemv_triton")


@pytest.mark.skipif(RUN_TRITON, reason="the Triton kernels run in this process")
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    run_in_triton_interpreter(__file__, select="triton and not in_interpreter", no_skips=True)


def gemv_bound(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, exact: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation of K products (each rounded once for fp32 inputs), times the scale, then one rounding
    to x's dtype."""
    K = w.shape[1]
    x64, w64 = x.double().reshape(-1, K), w.double()
    bound = (K + 3) * FP32_U * (x64.abs() @ w64.abs().T)
    if s is not None:
        bound = bound * s.double().abs() + FP32_U * exact.abs()
    return bound + UNIT_ROUNDOFF[x.dtype] * (exact.abs() + bound)


# (M, N, K): decode (M = 1) and small M, K split into several parts or not, N and K not multiples of the tiles
GEMV_SHAPES = [(1, 96, 512), (1, 33, 200), (3, 70, 384), (16, 48, 256), (1, 257, 1100), (20, 40, 96)]


@triton_test
@pytest.mark.parametrize("M, N, K", GEMV_SHAPES)
@pytest.mark.parametrize("dtype, weight_dtype", GEMV_DTYPES)
def test_triton_gemv_matches_float64_reference(gt, M, N, K, dtype, weight_dtype):
    device = TRITON_DEVICE
    seed = M * 100_000 + N * 1000 + K
    x = torch.randn(M, K, generator=generator(seed)).to(dtype).to(device)
    if weight_dtype == torch.int8:
        q, s = random_int8(N, K, seed=seed, scale_dtype=torch.bfloat16)
        w, s = q.to(device), s.to(device)
    else:
        w, s = (torch.randn(N, K, generator=generator(seed + 1)) / K**0.5).to(dtype).to(device), None
    exact = x.double() @ w.double().T * (s.double() if s is not None else 1.0)
    configs = [None, gt.gemv_config(M, N, K, w.element_size(), num_sms=2, block_k=64, split_k=3)]
    if M > 1:  # row blocks wider than 16 (the small-M matmul sweep's shapes), deeper pipelining
        configs.append(gt.gemv_config(M, N, K, w.element_size(), num_sms=2, block_k=64, split_k=2, block_m=32,
                                      num_stages=4))  # fmt: skip
    else:  # one row through tl.dot (rows padded to 16), as a large int8 matrix takes it by default
        configs.append(gt.gemv_config(M, N, K, w.element_size(), num_sms=2, block_k=64, split_k=2, block_m=16))
    for config in configs:
        y = gt.gemv(x, w, s, config=config)
        assert y.dtype == dtype and y.shape == (M, N)
        assert ((y.double() - exact).abs() <= gemv_bound(x, w, s, exact)).all()
    reference = gt.gemv_reference(x, w, s)
    assert ((reference.double() - exact).abs() <= gemv_bound(x, w, s, exact)).all()


class Launches:
    """Counts the launches of a Triton kernel (stands in for it in the module: `kernel[grid](...)`)."""

    def __init__(self, kernel) -> None:  # noqa: ANN001
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        self.count += 1
        return self.kernel[grid]


@triton_test
@pytest.mark.parametrize("dtype, weight_dtype", GEMV_DTYPES)
def test_triton_gemv_one_launch_is_bit_identical_to_two(gt, monkeypatch, dtype, weight_dtype):
    """With counters the split programs reduce in the GEMV's own launch (the reduce kernel never runs): y equal
    bit for bit to the two-kernel path's, within the fp32 bound of float64, the counters all zero after every
    call (the same buffer twice in a row), on random shapes (N, K not multiples of the blocks), forced splits,
    one split, and the default launch shape."""
    gemv_launches = Launches(gt._gemv_kernel)
    reduce_launches = Launches(gt._splitk_reduce_kernel)
    monkeypatch.setattr(gt, "_gemv_kernel", gemv_launches)
    monkeypatch.setattr(gt, "_splitk_reduce_kernel", reduce_launches)
    device, gen = TRITON_DEVICE, generator(31)
    for trial in range(4):
        M = int(torch.randint(1, 17, (1,), generator=gen))
        N = int(torch.randint(1, 80, (1,), generator=gen))
        K = int(torch.randint(100, 400, (1,), generator=gen))
        x = torch.randn(M, K, generator=gen).to(dtype).to(device)
        if weight_dtype == torch.int8:
            q, s = random_int8(N, K, seed=trial, scale_dtype=torch.bfloat16)
            w, s = q.to(device), s.to(device)
        else:
            w, s = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype).to(device), None
        exact = x.double() @ w.double().T * (s.double() if s is not None else 1.0)
        block_n = (16, 32)[trial % 2]
        split_k = int(torch.randint(2, 6, (1,), generator=gen))
        forced = gt.gemv_config(M, N, K, w.element_size(), 2, block_n=block_n, block_k=32, split_k=split_k)
        one_split = gt.gemv_config(M, N, K, w.element_size(), 2, block_n=block_n, block_k=64, split_k=1)
        assert forced.split_k > 1 and one_split.split_k == 1
        for config in (forced, one_split, None):
            launched = config or gt.gemv_config(M, N, K, w.element_size(), num_sms=4)  # gemv's default on the CPU
            counters = torch.zeros(gt.gemv_tiles(M, N, launched), dtype=torch.int32, device=device)
            launches = gemv_launches.count, reduce_launches.count
            two = gt.gemv(x, w, s, config=config)
            split = reduce_launches.count > launches[1]
            assert split == (launched.split_k > 1)
            for _ in range(2):
                one = gt.gemv(x, w, s, config=config, counters=counters)
                assert torch.equal(one, two), (M, N, K, config)
                assert not counters.any(), "counters left non-zero"
            assert gemv_launches.count - launches[0] == 3 and reduce_launches.count - launches[1] == int(split)
            assert ((one.double() - exact).abs() <= gemv_bound(x, w, s, exact)).all()
            reference = gt.gemv_reference(x, w, s)
            assert ((reference.double() - exact).abs() <= gemv_bound(x, w, s, exact)).all()


def test_triton_gemv_rejects_bad_counters(gt):
    device = TRITON_DEVICE
    x, w = torch.randn(3, 256, device=device), torch.randn(70, 256, device=device)
    config = gt.gemv_config(3, 70, 256, 4, num_sms=2, block_k=64, split_k=2)
    assert gt.gemv_tiles(3, 70, config) == 3  # one 16-row block times three 32-row blocks of the weight
    with pytest.raises(ValueError, match="counters: 2 elements, fewer than the 3 output tiles"):
        gt.gemv(x, w, config=config, counters=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="counters: expected a contiguous int32 tensor"):
        gt.gemv(x, w, config=config, counters=torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="counters: expected a contiguous int32 tensor"):
        gt.gemv(x, w, config=config, counters=torch.zeros(6, dtype=torch.int32, device=device)[::2])


def test_triton_gemv_max_tiles_fits_every_default_launch(gt):
    """A module's counters (gemv_max_tiles for its max_rows) fit the launch gemv_config picks for any row count
    up to max_rows, whatever the K, dtype and SM count."""
    for max_rows in (1, 2, 16, 17, 40):
        for N in (1, 31, 32, 33, 1000):
            for K, weight_bytes, num_sms in ((64, 2, 132), (3072, 1, 132), (1024, 4, 4)):
                tiles = [gt.gemv_tiles(M, N, gt.gemv_config(M, N, K, weight_bytes, num_sms))
                         for M in range(1, max_rows + 1)]  # fmt: skip
                assert max(tiles) == gt.gemv_max_tiles(max_rows, N)


def test_triton_gemv_config_splits_k_to_fill_the_gpu(gt):
    # Qwen3-0.6B's o projection at batch 1 on 132 SMs: 64 row blocks, so K is split to reach ~2 programs per SM
    config = gt.gemv_config(1, 1024, 2048, 2, num_sms=132)
    assert config.block_n == gt.BLOCK_N_GEMV
    assert config.split_k > 1 and config.split_k * config.k_per_split >= 2048
    assert 64 * config.split_k <= gt.PROGRAMS_PER_SM * 132 + 64
    # the LM head has 4,748 row blocks already: no split
    assert gt.gemv_config(1, 151936, 1024, 2, num_sms=132).split_k == 1


def test_triton_gemv_config_takes_tensor_cores_for_one_row_of_a_large_int8_matrix(gt):
    """At M = 1 an int8 matrix of at least INT8_DOT_MIN_WEIGHTS weights (the LM head) goes through tl.dot; the
    layers' int8 matrices, bf16 ones of any size, and an explicit block_m = 1 stay on the CUDA cores."""
    lm_head = gt.gemv_config(1, 151936, 1024, 1, num_sms=132)
    assert 151936 * 1024 >= gt.INT8_DOT_MIN_WEIGHTS and lm_head.block_m == gt.BLOCK_M_DOT
    assert lm_head.block_n == gt.BLOCK_N and lm_head.block_k == 128
    assert gt.gemv_config(1, 151936, 1024, 1, num_sms=132, block_m=1).block_m == 1
    assert gt.gemv_config(1, 151936, 1024, 2, num_sms=132).block_m == 1
    for N, K in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)):  # Qwen3-0.6B's fused projections
        assert gt.gemv_config(1, N, K, 1, num_sms=132).block_m == 1
    with pytest.raises(ValueError, match="block_m=8 must be a power of two >= 16 or 1"):
        gt.gemv_config(1, 64, 64, 1, num_sms=2, block_m=8)
    with pytest.raises(ValueError, match="block_m=1 must be a power of two >= 16$"):
        gt.gemv_config(2, 64, 64, 1, num_sms=2, block_m=1)


def test_triton_gemv_rejects_bad_operands(gt):
    device = TRITON_DEVICE
    x = torch.randn(1, 32, device=device).bfloat16()
    with pytest.raises(ValueError, match="scale: required"):
        gt.gemv(x, torch.zeros(8, 32, dtype=torch.int8, device=device))
    with pytest.raises(ValueError, match="weight: expected"):
        gt.gemv(x, torch.zeros(8, 31, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="weight: expected int8 or x's dtype"):
        gt.gemv(x, torch.zeros(8, 32, dtype=torch.float16, device=device))


@triton_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if TRITON_DEVICE == "cuda" else [torch.float32])
@pytest.mark.parametrize("rows, hidden", [(1, 1024), (5, 96)])
def test_triton_add_rmsnorm_matches_the_model(gt, dtype, rows, hidden):
    """Against the model's own RMSNorm after x + residual: h exactly; the normed row within what the order of
    the fp32 sum of squares can change (it may move a rounding to the dtype by one ulp, then the product)."""
    from qwen3.model import RMSNorm

    device = TRITON_DEVICE
    norm = RMSNorm(hidden, eps=1e-6)
    norm.weight.data = 1 + 0.1 * torch.randn(hidden, generator=generator(rows))
    norm = norm.to(device=device, dtype=dtype)
    x = torch.randn(rows, hidden, generator=generator(hidden)).to(device=device, dtype=dtype)
    residual = (3 * torch.randn(rows, hidden, generator=generator(hidden + 1))).to(device=device, dtype=dtype)
    y, h = gt.add_rmsnorm(x, residual, norm.weight, norm.eps)
    with torch.no_grad():
        y_ref, h_ref = gt.add_rmsnorm_reference(x, residual, norm)
    assert torch.equal(h, h_ref)
    assert y.dtype == y_ref.dtype
    ulp = 2 * UNIT_ROUNDOFF[dtype]
    bound = (2 * ulp + (hidden + 4) * FP32_U) * y_ref.double().abs()
    assert ((y.double() - y_ref.double()).abs() <= bound).all()


@triton_test
@pytest.mark.parametrize("M", [1, 3])
def test_triton_gemv_custom_op(gt, M):
    """torch.ops.qwen3.gemv: the kernel's result exactly, and torch.library.opcheck (schema, fake impl's shapes and
    dtypes against the real output, dynamo and aot_autograd tracing) on float and int8 weights, without and with
    counters (K = 512: the default launch splits K; the op leaves the counters as it found them, all zero)."""
    device = TRITON_DEVICE
    x = torch.randn(M, 512, generator=generator(M)).to(device)
    q, s = random_int8(40, 512, seed=M)
    w = torch.randn(40, 512, generator=generator(M + 1)).to(device)
    counters = torch.zeros(gt.gemv_max_tiles(M, 40), dtype=torch.int32, device=device)
    for weight, scale in ((w, None), (q.to(device), s.to(device))):
        assert torch.equal(torch.ops.qwen3.gemv(x, weight, scale), gt.gemv(x, weight, scale))
        assert torch.equal(torch.ops.qwen3.gemv(x, weight, scale, counters), gt.gemv(x, weight, scale))
        assert not counters.any()
        for args in ((x, weight, scale), (x, weight, scale, counters)):
            torch.library.opcheck(torch.ops.qwen3.gemv.default, args)
        assert not counters.any()
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.qwen3.gemv(x[None], w, None)


# ---------------------------------------------------------------------------------------------------------------
# float32 weights: float_gemv and CpuGemvLinear (cpu_linear.py)


def check_float_against_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    x64, w64 = x.double().reshape(-1, w.shape[1]), w.double()
    exact = x64 @ w64.T
    bound = (w.shape[1] + 2) * FP32_U * (x64.abs() @ w64.abs().T)  # float32 accumulation in any order
    if y.dtype == torch.bfloat16:
        bound = bound + BF16_U * (exact.abs() + bound)
    error = (y.double().reshape(exact.shape) - exact).abs()
    assert (error <= bound).all(), f"max error {error.max():.3e}"


def test_float_gemv_against_float64(isas):
    gen = generator(21)
    for isa in isas:
        for _ in range(6):
            out_features = int(torch.randint(1, 70, (1,), generator=gen))  # not a multiple of the 4-row tiles
            in_features = int(torch.randint(1, 300, (1,), generator=gen))  # nor of 16 (masked remainder)
            rows = int(torch.randint(1, 7, (1,), generator=gen))  # more than one pass of x rows
            w = torch.randn(out_features, in_features, generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, in_features, generator=gen).to(dtype)
                y = cpu_gemv.float_gemv(x, w, isa=isa)
                assert y.dtype == dtype and y.shape == (rows, out_features)
                check_float_against_float64(y, x.float() if dtype == torch.bfloat16 else x, w)
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="x: expected float32 or bfloat16"):
        cpu_gemv.float_gemv(torch.randn(1, 31), w)
    with pytest.raises(ValueError, match="w: expected a contiguous float32"):
        cpu_gemv.float_gemv(torch.randn(1, 32), w.T.contiguous().T)
    with pytest.raises(ValueError, match="w: expected a contiguous float32"):
        cpu_gemv.float_gemv(torch.randn(1, 32), w.bfloat16())


def test_cpu_gemv_linear_swaps_keep_parameters_and_outputs(isas, tmp_path):
    import qwen3
    from conftest import make_reference
    from qwen3.kernels.cpu_linear import CpuGemvLinear, use_cpu_gemv

    make_reference(tmp_path, seed=22)
    model = qwen3.load_model(tmp_path).float()
    plain = qwen3.load_model(tmp_path).float()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    swapped = use_cpu_gemv(model)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert swapped == linears and not any(type(m) is torch.nn.Linear for m in model.modules())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # the same tensors, same names
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying kept
    gen = generator(23)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=gen)
    with torch.no_grad():
        # prefill (9 rows) takes F.linear: identical; one-row decode steps take the kernel: float32-close
        assert torch.equal(model(prompt), plain(prompt))
        one = torch.randn(1, 1, model.config.hidden_size, generator=gen)
        layer = model.model.layers[0].mlp.gate_up_proj
        assert isinstance(layer, CpuGemvLinear)
        check_float_against_float64(layer(one), one, layer.weight)
    fast = qwen3.generate(model, prompt, max_new_tokens=12, temperature=0.0)
    reference = qwen3.generate(plain, prompt, max_new_tokens=12, temperature=0.0)
    assert torch.equal(fast, reference)  # greedy tokens identical (random-init logits: no near-ties here)
    x = torch.randn(1, 1, model.config.hidden_size, requires_grad=True)
    layer(x).sum().backward()  # a gradient to carry: F.linear
    assert x.grad is not None


def test_use_cpu_gemv_swaps_nothing_without_the_kernel(monkeypatch):
    from qwen3.kernels.cpu_linear import use_cpu_gemv

    monkeypatch.setenv("QWEN3_CPU_KERNEL", "0")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert use_cpu_gemv(model) == 0 and type(model[0]) is torch.nn.Linear
    with pytest.raises(ValueError, match="max_rows"):
        use_cpu_gemv(model, max_rows=0)
