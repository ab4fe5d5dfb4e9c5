"""One Triton pass for the engine's commonest sampling step: temperature (or greedy) rows, no filters, no penalties.

The sampler's plain path (sampler.py) computes, per row, probs = softmax(logits / T), Exp(1) noise E, and
argmax(probs / E): the exponential race, one draw from probs. Taking logs changes no argmax, and the softmax's
normaliser is the same for every column of a row, so the same draw is

    argmax_j  logits_j / T - log(E_j)          (greedy rows: argmax_j logits_j)

which needs no softmax, no (S, V) float32 copy of the logits and no (S, V) noise tensor: each program reads a
chunk of one row once (bf16: 2 bytes per logit), makes its noise in registers from the row's 32-bit key and the
column (the same murmur3 hash and uniforms as sampler.seeded_exponential), and writes its chunk's best score and
column; a tiny second pass picks each row's best chunk. On the H200 the plain path's ~10 passes over 256 x 151,936
float32 values took ~0.8 ms per step; this reads the 78 MB of bf16 logits once.

The pass is bound by instructions, not bytes (~130 us for 256 rows on the H200, with two precise logarithms per
logit: ~60% of its instructions). On a GPU it takes the hardware's logarithm instead, with a series where u is near
1 (see the kernel): the scores then differ from the plain path's by < 3e-6, so a seeded row draws the same token as
the plain path except where its two best scores lie that close. Under the Triton interpreter (the CPU tests) the
logs are the precise ones.

Ties go to the lowest column, as torch.argmax. Unseeded rows get keys from torch's global generator.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096  # columns per program: 38 chunks for Qwen3's 151,936


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _fast_ln(x):
    # ln(x) through the hardware's base-2 logarithm (lg2.approx.f32: one instruction, absolute error ~2**-22 in
    # log2 for x in [0.5, 2], the same relative error beyond): what the precise libdevice log costs ~20 FMAs for.
    return 0.6931471805599453 * tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                                           is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _sample_chunk_kernel(logits_ptr, temperature_ptr, keys_ptr, best_ptr, best_col_ptr, V, stride_row, num_chunks,
                         BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < V
    x = tl.load(logits_ptr + row * stride_row + cols, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(temperature_ptr + row)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    h = _fmix32(key ^ (cols.to(tl.uint32) * 0x27D4EB2F))
    h = _fmix32(h ^ 0x165667B1)
    bits = (h >> 9).to(tl.float32)  # 23 bits: k + 0.5 is exact
    uniform = (bits + 0.5) * (1.0 / 8388608.0)  # in (2**-24, 1 - 2**-24), as seeded_exponential
    if FAST_LOG:
        # The hardware logarithm's error is absolute near 1, so where u is near 1 (the smallest Exp(1) draws, the
        # ones that win the race in flat rows) -ln(u) = -ln(1 - w) comes from its series in w = 1 - u, which is
        # exact here: w < 1/16 makes the series' remainder < w**5 / 5 relative, below float32's precision.
        # Elsewhere -ln(u) >= 0.0645 and the hardware log's relative error stays < 3e-6; ln(noise) then has an
        # absolute error of the same size, a change in the score that flips a draw only at such near-ties.
        w = (8388607.5 - bits) * (1.0 / 8388608.0)  # 1 - u
        series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * 0.2))))
        noise = tl.where(w < 0.0625, series, -_fast_ln(uniform))
        log_noise = _fast_ln(noise)
    else:  # the precise logs (the Triton interpreter has no inline assembly)
        noise = -tl.log(uniform)  # Exp(1) >= 6e-8: its log is finite
        log_noise = tl.log(noise)
    inverse_t = 1.0 / tl.where(t > 0.0, t, 1.0)  # once per program: a multiply per logit, not a divide
    score = tl.where(t > 0.0, x * inverse_t - log_noise, x)
    score = tl.where(valid, score, float("-inf"))
    best = tl.max(score, 0)
    col = tl.min(tl.where(score == best, cols, V), 0)  # the lowest column among equals
    tl.store(best_ptr + row * num_chunks + chunk, best)
    tl.store(best_col_ptr + row * num_chunks + chunk, col)


def fast_log() -> bool:
    """The hardware logarithm on a GPU; the precise one under the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def sample(logits: Tensor, temperature: Tensor, keys: Tensor) -> Tensor:
    """Next ids (S,) int64 from logits (S, V) (any float dtype), temperature (S,) float32 (0: greedy) and row
    keys (S,) int64 holding 32-bit values (sampler.row_key for a seeded row)."""
    S, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(V, BLOCK)
    best = torch.empty(S, num_chunks, dtype=torch.float32, device=logits.device)
    best_col = torch.empty(S, num_chunks, dtype=torch.int32, device=logits.device)
    if S:
        _sample_chunk_kernel[(S, num_chunks)](logits, temperature, keys, best, best_col, V, logits.stride(0),
                                              num_chunks, BLOCK=BLOCK, FAST_LOG=fast_log(), num_warps=8)  # fmt: skip
    return best_col.gather(1, best.argmax(1, keepdim=True))[:, 0].long()


def reference(logits: Tensor, temperature: Tensor, keys: Tensor) -> Tensor:
    """`sample` in float64 with the plain path's own noise (sampler.seeded_exponential): the test's yardstick."""
    from .sampler import seeded_exponential

    x = logits.double()
    noise = seeded_exponential(keys, logits.shape[1]).double()
    t = temperature.double()[:, None]
    score = torch.where(t > 0, x / t.clamp_min(1e-300) - noise.log(), x)
    return score.argmax(1)
