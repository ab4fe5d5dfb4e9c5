"""Triton kernels for batch-1 decode on GPUs: a split-K GEMV / small-M matmul and a fused residual-add + RMSNorm.

`gemv(x, weight, scale=None)` computes y (M, N) = (x (M, K) @ weight (N, K)^T) * scale (N) for a few rows of x
(decode: M = 1; made for M <= 16, any M works), with weight in x's float dtype or int8 weight-only with one
scale per row. At M = 1 the product reads every weight byte once and does 2 flops per weight, so its speed is
the memory bandwidth it reaches; cuBLAS keeps too few bytes in flight on the small decode matrices (a 1024 x
3072 bf16 GEMV moves 6 MB in ~7 us, a sixth of the H200's bandwidth; benchmarks/NOTES.md). Here:
- the grid is (row blocks, K splits, M blocks): each program streams a tile of BLOCK_N rows x BLOCK_K columns
  per step over its slice of K (rows are contiguous in memory, so the loads are 16-byte vectors), and the
  number of K splits is chosen so that the grid covers every SM several times (`gemv_config`);
- with one split the program scales and stores y itself; with several, each writes an fp32 partial
  (SPLIT_K, M, N), and the partials are summed in split order k = 0, 1, ..., then scaled and cast: by a second
  kernel, or, given `counters`, by the last program of each output tile to arrive, in the same launch (the
  "last program reduces" fix-up of split-K GEMMs). At decode a second launch costs as much as the sum (2 us of
  latency in a CUDA graph, against 3.7 us for the GEMV itself on the H200), hence the one-launch path. The
  protocol: each split program stores its partial, a barrier orders the program's stores before its atomic
  add (acq_rel, GPU scope) on the tile's int32 counter, and the program that reads SPLIT_K - 1 reads all
  partials (bypassing L1) in split order, stores y and sets the counter back to 0. The sum is therefore
  bit-identical to the two-kernel path's and independent of arrival order, and the counters are all zero
  between calls, so one buffer serves every call of a module and CUDA graph replays;
- M = 1 runs on CUDA cores: each thread keeps its share of a (BLOCK_N, BLOCK_K) fp32 sum of products and
  the sum over K is taken once, after the loop; M > 1 pads the rows to 16 and uses tl.dot (tensor cores;
  fp32 x uses exact fp32 products, input_precision "ieee"), and so does M = 1 on a large int8 matrix (the LM
  head: INT8_DOT_MIN_WEIGHTS);
- int8 weights are converted to x's dtype in registers (exact for |q| <= 127), so int8 reads half the bytes
  of bf16; the per-row scale is applied once, to the fp32 sum.

`add_rmsnorm(x, residual, weight, eps)` fuses `h = x + residual` (rounded to the model dtype, as the model's
residual stream is) with Qwen3's RMSNorm of h (statistics in fp32, the normalised row rounded to the dtype,
then multiplied by the weight), one program per row: (normed, h) in one read and two writes.

`torch.ops.qwen3.gemv(x (M, K), weight, scale, counters=None)` is `gemv` as a custom op with a fake impl
(`gemv_op`): opaque to torch.compile, captured by CUDA graphs like any launch; gemv_linear.py puts it behind the
model's projections, each module with counters of its own (`gemv_max_tiles`).

Each kernel has a PyTorch reference beside it (`gemv_reference`, `add_rmsnorm_reference`, the latter with the
model's own RMSNorm); tests/test_kernels.py compares them, on CUDA or under TRITON_INTERPRET=1 on the CPU.
This module imports triton at its top; nothing in qwen3 imports it at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_M_DOT = 16  # tl.dot needs at least 16 rows: M > 1 is padded to it
# gemv_config's defaults, from the H200 sweep of every Qwen3-0.6B projection in one CUDA graph (`python
# benchmarks/decode.py --gemv --gemv-sweep`, benchmarks/logs/h200_gemv_sweep_2026-12-02.log): at M = 1, 16 rows per
# program and about 2 programs per SM were the fastest launch for q/k/v, o, gate/up and the LM head (a step's
# GEMVs 1.03 ms with 32 rows and 4 per SM, 0.85 ms with the best of each); at M = 16 (the tl.dot path, which also
# serves the compiled engine's batch 1: it replays a 2-row bucket) the best splits, 2 / 8 / 1 / 6 for q/k/v, o,
# gate/up, down, lie nearer to what 2 programs per SM give (3 / 8 / 2 / 8) than 4 (4 / 16 / 3 / 12).
BLOCK_N = 32  # rows of the weight per program, M > 1 (tl.dot)
# int8 weights at M = 1: the CUDA-core path converts every weight to fp32 on the CUDA cores, which caps it near
# 1.7 TB/s once a matrix is large enough to stream; tl.dot converts to bf16 for the tensor cores and streams 3.3-3.5
# TB/s. Same sweep: Qwen3-0.6B's int8 LM head (155.6M weights) 90 us at M = 1 on the CUDA cores, 46-49 us at 16
# rows through tl.dot (same bytes); the layers' int8 matrices (4.2-6.3M weights) stay near their ~5-7 us launch
# floor either way, slightly faster on the CUDA cores. So M = 1 takes tl.dot for int8 matrices of at least this
# many weights (16 MiB: ~10 us at 1.7 TB/s).
INT8_DOT_MIN_WEIGHTS = 1 << 24
BLOCK_N_GEMV = 16  # rows of the weight per program, M = 1
PROGRAMS_PER_SM = 2  # split K until the grid has about this many programs per SM


# ----------------------------------------------------------------------------------------------------------------------
# split-K GEMV / small-M matmul


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int  # a multiple of block_k; split s covers columns [s * k_per_split, (s + 1) * k_per_split)
    num_warps: int = 4
    num_stages: int = 3  # Triton's software pipelining depth of the K loop (its default)


def gemv_config(
    M: int,
    N: int,
    K: int,
    weight_bytes: int,
    num_sms: int,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    block_m: int | None = None,
    num_stages: int = 3,
) -> GemvConfig:
    """The launch shape: a tile of block_n rows x block_k columns moves about 8 KB per step; K is split until
    the grid has PROGRAMS_PER_SM programs per SM (or each split is one step). M > 1 takes tl.dot on blocks of
    block_m rows (a power of two >= 16; default 16); so does M = 1 with int8 weights of at least
    INT8_DOT_MIN_WEIGHTS, or with block_m given (1 there is the CUDA-core path)."""
    if block_m is not None and (block_m < BLOCK_M_DOT or block_m & (block_m - 1)) and not (M == 1 and block_m == 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= {BLOCK_M_DOT}" + (" or 1" if M == 1 else ""))
    if block_m is None:
        int8_dot = weight_bytes == 1 and N * K >= INT8_DOT_MIN_WEIGHTS
        block_m = BLOCK_M_DOT if M > 1 or int8_dot else 1
    block_n = block_n or (BLOCK_N_GEMV if block_m == 1 else BLOCK_N)
    if block_k is None:
        block_k = (512 // weight_bytes) if block_m == 1 else 128  # 512 bytes of each row per step (M = 1)
    if num_warps is None:  # M = 1 keeps a (block_n, block_k) fp32 sum in registers: 64 per thread
        num_warps = max(4, min(16, block_n * block_k // (64 * 32))) if block_m == 1 else 4
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    steps = triton.cdiv(K, block_k)
    row_blocks = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    if split_k is None:
        split_k = max(1, min(steps, triton.cdiv(PROGRAMS_PER_SM * num_sms, row_blocks)))
    split_k = max(1, min(split_k, steps))
    k_per_split = triton.cdiv(steps, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty split
    return GemvConfig(block_m, block_n, block_k, split_k, k_per_split, num_warps, num_stages)


@triton.jit
def _scale_and_store(acc, s_ptr, y_ptr, offs_m, offs_n, M, N, HAS_SCALE: tl.constexpr):
    """y[m block, n block] = acc (fp32) times the row scale, cast to y's dtype."""
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, k_per_split,
    HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr, LAST_REDUCES: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x[m block] @ w[n block, k split]^T: the scaled y if SPLIT is False, else the fp32 partial of split k, and
    with LAST_REDUCES the last split program of the tile to arrive sums the SPLIT_K partials into y."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1) row starts
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    if USE_DOT:  # rows padded to BLOCK_M: tensor cores
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = w.to(x.dtype)  # int8 -> float is exact
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    else:  # one row: CUDA cores; products summed elementwise in the loop, reduced across K once at the end
        acc2d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            acc2d += w.to(tl.float32) * x.to(tl.float32)  # (BLOCK_N, BLOCK_K) * (1, BLOCK_K)
        acc = tl.sum(acc2d, axis=1)[None, :]  # (1, BLOCK_N)
    if not SPLIT:
        _scale_and_store(acc, s_ptr, y_ptr, offs_m, offs_n, M, N, HAS_SCALE)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tile = offs_m[:, None] * N + offs_n[None, :]  # (BLOCK_M, BLOCK_N) offsets in one (M, N) partial
        tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=mask)
        if LAST_REDUCES:
            # every thread's partial stores happen before the release below; the acquire of the last arrival
            # then sees every split's partial (read past L1: .cg)
            tl.debug_barrier()
            counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k in tl.static_range(SPLIT_K):  # unrolled, loads in flight together; summed in split order
                    total += tl.load(partial_ptr + k * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                _scale_and_store(total, s_ptr, y_ptr, offs_m, offs_n, M, N, HAS_SCALE)
                tl.store(counter, 0)  # all SPLIT_K programs have arrived: zero again for the next call


@triton.jit
def _splitk_reduce_kernel(partial_ptr, s_ptr, y_ptr, M, N, split_k, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """y (M, N) = sum over the splits of partial (SPLIT_K, M, N), times the row scale, in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(split_k):
        acc += tl.load(partial_ptr + k * M * N + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv_tiles(M: int, N: int, config: GemvConfig) -> int:
    """How many output tiles (block_m x block_n blocks of y) a launch with `config` has: the counters it needs."""
    return triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)


def gemv_max_tiles(max_rows: int, N: int) -> int:
    """The most output tiles `gemv_config`'s default launch shapes have for at most `max_rows` rows of y (M, N):
    a counters size that fits every call of a module (M = 1 on the CUDA cores: 1 x BLOCK_N_GEMV tiles; tl.dot,
    M > 1 or one row of a large int8 matrix: 16 x BLOCK_N, no more at M = 1 than the CUDA cores' count)."""
    dot = triton.cdiv(N, BLOCK_N) * triton.cdiv(max_rows, BLOCK_M_DOT) if max_rows > 1 else 0
    return max(triton.cdiv(N, BLOCK_N_GEMV), dot)


def gemv(
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    config: GemvConfig | None = None,
    counters: Tensor | None = None,
) -> Tensor:
    """y (..., N) = (x (..., K) @ weight (N, K)^T) * scale (N,), in x's dtype, accumulated in fp32.

    weight is in x's dtype (bf16, fp16, fp32; scale optional) or int8 (scale required, any float dtype).
    `config` overrides the launch shape (`gemv_config`). `counters`, an all-zero int32 tensor of at least
    `gemv_tiles` elements on x's device, makes a split-K launch reduce in its last program (one launch; the
    counters are all zero again after it); without it a second kernel sums the partials. The output and the
    split-K partials are allocated per call (from the caching allocator, so also inside CUDA graph capture); a
    2-D x gives y itself, not a view.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: expected one of {FLOAT_DTYPES}, found {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected (N, {x.shape[-1]}), found {tuple(weight.shape)}")
    if weight.dtype == torch.int8:
        if scale is None:
            raise ValueError("scale: required with int8 weights (one per row)")
    elif weight.dtype != x.dtype:
        raise ValueError(f"weight: expected int8 or x's dtype {x.dtype}, found {weight.dtype}")
    N, K = weight.shape
    if scale is not None and (scale.shape != (N,) or scale.dtype not in FLOAT_DTYPES):
        raise ValueError(f"scale: expected a float ({N},) vector, found {scale.dtype} {tuple(scale.shape)}")
    if x.device != weight.device or (scale is not None and scale.device != x.device):
        raise ValueError(f"x, weight, scale: expected one device, found {x.device} and {weight.device}")
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    x2d = x.reshape(-1, K)
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    M = x2d.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        config = gemv_config(M, N, K, weight.element_size(), num_sms)
    if counters is not None:
        tiles = gemv_tiles(M, N, config)
        if counters.dtype != torch.int32 or counters.device != x.device or not counters.is_contiguous():
            raise ValueError(f"counters: expected a contiguous int32 tensor on {x.device}, found {counters.dtype} "
                             f"on {counters.device}")  # fmt: skip
        if counters.numel() < tiles:
            raise ValueError(f"counters: {counters.numel()} elements, fewer than the {tiles} output tiles of "
                             f"({M}, {N}) in blocks of ({config.block_m}, {config.block_n})")  # fmt: skip
    split = config.split_k > 1
    last_reduces = split and counters is not None
    partial = torch.empty(config.split_k, M, N, dtype=torch.float32, device=x.device) if split else y
    grid = (triton.cdiv(N, config.block_n), config.split_k, triton.cdiv(M, config.block_m))
    s = scale if scale is not None else y  # a placeholder pointer when there is no scale
    _gemv_kernel[grid](
        x2d, weight, s, y, partial, counters if last_reduces else y, M, N, K, x2d.stride(0), weight.stride(0),
        config.k_per_split, HAS_SCALE=scale is not None, SPLIT=split, LAST_REDUCES=last_reduces,
        SPLIT_K=config.split_k if last_reduces else 1, USE_DOT=config.block_m > 1, IEEE=x.dtype == torch.float32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if split and not last_reduces:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
            partial, s, y, M, N, config.split_k, HAS_SCALE=scale is not None, BLOCK=block, num_warps=4
        )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def gemv_reference(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
    """What `gemv` computes, in PyTorch: (x @ dequantised weight^T) in fp32, times the scale, in x's dtype."""
    y = x.float() @ weight.float().T
    if scale is not None:
        y = y * scale.float()
    return y.to(x.dtype)


# The op is declared as mutating nothing although the kernel writes `counters`: every call leaves them all zero, as
# it found them, and nothing else reads them (each GemvLinear owns its own), so no caller can observe a write, and
# dynamo, functionalization and inductor may treat the op as pure (no copies, no reordering hazard on one stream).
@torch.library.custom_op(
    "qwen3::gemv", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? scale, Tensor? counters=None) -> Tensor"
)
def gemv_op(x: Tensor, weight: Tensor, scale: Tensor | None, counters: Tensor | None = None) -> Tensor:
    """`gemv` as the custom op torch.ops.qwen3.gemv, x (M, K) -> y (M, N): one opaque node for dynamo and inductor
    (its fake impl gives only the output's shape), so a compiled forward calls the same kernels as eager, and a
    CUDA graph captures its launches like any other op's (with counters: one launch)."""
    if x.dim() != 2:
        raise ValueError(f"qwen3::gemv: x must be 2-D (rows, in_features), found shape {tuple(x.shape)}")
    return gemv(x, weight, scale, counters=counters)


@gemv_op.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor | None, counters: Tensor | None = None) -> Tensor:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"qwen3::gemv: expected x (M, K) and weight (N, K), found {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    return x.new_empty(x.shape[0], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# fused residual add + RMSNorm


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, H, stride_x, stride_r, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
    h = x + r  # rounded to the dtype, as the model's residual stream is
    tl.store(h_ptr + row * H + offs, h, mask=mask)
    h32 = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h32 * h32, axis=0) / H + eps)
    normed = (h32 * rstd).to(h.dtype)  # RMSNorm rounds the normalised row to the dtype, then scales it
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * H + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for rows of x (..., H); the weight is (H,)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"residual: expected {x.dtype} {tuple(x.shape)}, found {residual.dtype} "
                         f"{tuple(residual.shape)}")  # fmt: skip
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight: expected ({H},), found {tuple(weight.shape)}")
    x2d, r2d = x.reshape(-1, H), residual.reshape(-1, H)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    r2d = r2d if r2d.stride(-1) == 1 else r2d.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # as `weight * normed` in the model
    y = torch.empty(x2d.shape, dtype=out_dtype, device=x.device)
    h = torch.empty_like(x2d)
    if x2d.shape[0]:
        block = triton.next_power_of_2(H)
        _add_rmsnorm_kernel[(x2d.shape[0],)](
            x2d, r2d, weight, y, h, H, x2d.stride(0), r2d.stride(0), eps, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return y.view(x.shape), h.view(x.shape)


def add_rmsnorm_reference(x: Tensor, residual: Tensor, norm: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """The model's own formula: h = x + residual, then its RMSNorm module (qwen3.model.RMSNorm)."""
    h = x + residual
    return norm(h), h
