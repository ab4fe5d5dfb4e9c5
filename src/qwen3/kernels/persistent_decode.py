"""A persistent decode step for one sequence (batch 1): all decoder layers of one token in a single Triton launch.

A prototype for issue 13, not wired into the engine yet. At batch 1 each of the engine's ~9 kernels per layer sits at
a floor of a few microseconds (launch, ramp, tail), so a token costs ~1.1 ms on the H200 where its 1.19 GB of weights
need 0.28 ms (benchmarks/NOTES.md). Here one program per SM walks a fixed list of tasks, layer by layer:

    phase 1  RMSNorm of the residual (each program recomputes it) and a slice of the qkv projection's rows
    phase 2  one KV head and a split of its context: QK-norm + RoPE of its query heads and its key, the key and
             value stored at `position` (by the split that holds it), attention of those query heads over the
             split's keys, written as a partial result (running max, sum, unnormalised output)
    phase 2b one query head: its splits' partial results merged into the attention output
    phase 3  a slice of o_proj's rows, added to the residual
    phase 4  RMSNorm of the residual and a slice of gate/up rows: SiLU(gate) x up
    phase 5  a slice of down_proj's rows, added to the residual

A phase's tasks wait, through a counter in global memory per (layer, phase), until every task of the phase before
has published its stores (release / acquire atomics at GPU scope, a CTA barrier on each side). Counters, not a
grid-wide barrier: a program with no task in a phase does not wait for it, and a task loads its slice of weights
before it waits, so the weights stream while the phase before finishes. Every program must be resident at once
(grid <= SMs), or a wait could deadlock.

Testing without a GPU: the Triton interpreter runs programs one after another, so with several programs the first
wait would never end. With one program the same kernel walks every task in order and each wait finds its counter
complete: that run checks the arithmetic against the model (tests/test_persistent_decode.py). The GPU adds only the
synchronisation between programs, which the benchmark checks against the one-program result.

Numerics follow model.py: RMSNorm in fp32 rounded to the model dtype, then times the weight; RoPE in fp32; matrix
products accumulate in fp32 and round to the model dtype; the residual stream stays in the model dtype. The
attention's softmax runs in fp32 over scores of fp32 products (the model's SDPA may round differently).
Key/value cache: KVCache's layout for one sequence, (layers, nkv, max_length, D) for keys and for values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..model import Qwen3ForCausalLM, RMSNorm

PHASES = 6  # counters per layer: qkv, attention splits, merge, o_proj, gate/up, down


@dataclass
class StackedWeights:
    """The decoder layers' weights stacked over layers, as the kernel reads them (one copy of the weights)."""

    input_norm: Tensor  # (L, H)
    qkv: Tensor  # (L, (nh + 2 nkv) D, H)
    q_norm: Tensor  # (L, D)
    k_norm: Tensor  # (L, D)
    o_proj: Tensor  # (L, H, nh D)
    post_norm: Tensor  # (L, H)
    gate_up: Tensor  # (L, 2 I, H): gate rows, then up rows
    down: Tensor  # (L, H, I)
    eps: float

    @classmethod
    def from_model(cls, model: Qwen3ForCausalLM) -> StackedWeights:
        layers = model.model.layers
        first = layers[0]
        for name, norm in (("input_layernorm", first.input_layernorm), ("self_attn.q_norm", first.self_attn.q_norm),
                           ("self_attn.k_norm", first.self_attn.k_norm)):  # fmt: skip
            if not isinstance(norm, RMSNorm):
                raise ValueError(f"persistent decode: {name} is {type(norm).__name__}; the kernel computes RMSNorm")
        if first.post_norm or not hasattr(first.mlp, "gate_up_proj"):
            raise ValueError("persistent decode: needs Qwen3's pre-norm SwiGLU layers (norm_position 'pre', "
                             "mlp_type 'swiglu')")

        def stack(get) -> Tensor:  # noqa: ANN001
            return torch.stack([get(layer).detach() for layer in layers]).contiguous()

        return cls(
            input_norm=stack(lambda m: m.input_layernorm.weight),
            qkv=stack(lambda m: m.self_attn.qkv_proj.weight),
            q_norm=stack(lambda m: m.self_attn.q_norm.weight),
            k_norm=stack(lambda m: m.self_attn.k_norm.weight),
            o_proj=stack(lambda m: m.self_attn.o_proj.weight),
            post_norm=stack(lambda m: m.post_attention_layernorm.weight),
            gate_up=stack(lambda m: m.mlp.gate_up_proj.weight),
            down=stack(lambda m: m.mlp.down_proj.weight),
            eps=first.input_layernorm.eps,
        )


# ---------------------------------------------------------------------------------------------------------------------
# synchronisation


@triton.jit
def _wait(counter_ptr, target):
    # Spin until `target` tasks have signalled; then every thread of the program may read what they stored.
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _signal(counter_ptr):
    tl.debug_barrier()  # every thread's stores of this task are done before one thread releases them
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


# ---------------------------------------------------------------------------------------------------------------------
# pieces


@triton.jit
def _rms_norm(x_ptr, weight_ptr, eps, H: tl.constexpr, BLOCK_H: tl.constexpr):
    # The residual (H,) normalised as model.RMSNorm: fp32 statistics, rounded to the model dtype, times the weight,
    # rounded again. Returned in fp32 registers, (BLOCK_H,), zero beyond H.
    cols = tl.arange(0, BLOCK_H)
    keep = cols < H
    x = tl.load(x_ptr + cols, mask=keep, other=0.0, cache_modifier=".cg")
    dtype = x.dtype
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(weight_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    return (w * (xf * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _rows(w_ptr, row0, num_rows, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows row0.. of the row-major (num_rows, K) matrix at w_ptr, (ROWS, BLOCK_K) in its dtype, zero outside. Issued
    # before a task waits: the weights do not depend on the activations, so their bytes stream during the wait.
    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    keep = (rows[:, None] < num_rows) & (cols[None, :] < K)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=keep, other=0.0)


@triton.jit
def _dot(w, vec):
    # (ROWS,) fp32: the rows w (ROWS, BLOCK_K) times vec (BLOCK_K,) fp32, accumulated in fp32.
    return tl.sum(w.to(tl.float32) * vec[None, :], 1)


@triton.jit
def _add_rows(x_ptr, w, vec_ptr, n, row0, H, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # The residual's rows row0.. += the rows w (ROWS, BLOCK_K) times the vector of n values at vec_ptr (another
    # phase's output: read past L1), the product rounded to the model dtype first, as x + proj(...) in model.py.
    cols = tl.arange(0, BLOCK_K)
    vec = tl.load(vec_ptr + cols, mask=cols < n, other=0.0, cache_modifier=".cg").to(tl.float32)
    rows = row0 + tl.arange(0, ROWS)
    keep = rows < H
    x = tl.load(x_ptr + rows, mask=keep, other=0.0, cache_modifier=".cg")
    tl.store(x_ptr + rows, x + _dot(w, vec).to(x.dtype), mask=keep)


# ---------------------------------------------------------------------------------------------------------------------
# the kernel


@triton.jit(do_not_specialize=["position"])  # one compile for every position (not one more per multiple of 16)
def _decode_step_kernel(
    x_ptr, qkv_buf_ptr, part_ptr, attn_ptr, act_ptr, counters_ptr,
    in_norm_ptr, qkv_w_ptr, qn_ptr, kn_ptr, o_w_ptr, post_norm_ptr, gu_w_ptr, down_w_ptr,
    cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
    position, num_layers, max_length, eps, num_programs,
    H: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, I: tl.constexpr,  # noqa: E741 - intermediate_size
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr,
    ROWS_QKV: tl.constexpr, ROWS_O: tl.constexpr, ROWS_GU: tl.constexpr, ROWS_DOWN: tl.constexpr,
    BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PHASES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    G: tl.constexpr = NH // NKV
    HALF: tl.constexpr = D // 2
    QKV: tl.constexpr = (NH + 2 * NKV) * D
    tasks_qkv = tl.cdiv(QKV, ROWS_QKV)
    tasks_o = tl.cdiv(H, ROWS_O)
    tasks_gu = tl.cdiv(I, ROWS_GU)
    tasks_down = tl.cdiv(H, ROWS_DOWN)
    dtype = x_ptr.dtype.element_ty
    cache_stride_layer = NKV * max_length * D
    halves = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + position * HALF + halves)  # (D/2,) fp32
    sin = tl.load(sin_ptr + position * HALF + halves)

    for layer in range(num_layers):
        counters = counters_ptr + layer * PHASES
        # -- phase 1: qkv rows of the normed residual ------------------------------------------------------------
        w_layer = qkv_w_ptr + tl.cast(layer, tl.int64) * QKV * H
        for task in range(pid, tasks_qkv, num_programs):
            w = _rows(w_layer, task * ROWS_QKV, QKV, H, ROWS_QKV, BLOCK_H)
            if layer > 0:
                _wait(counters + 5 - PHASES, tasks_down)  # the layer before: all of phase 5
            y = _rms_norm(x_ptr, in_norm_ptr + layer * H, eps, H, BLOCK_H)
            out = _dot(w, y)
            rows = task * ROWS_QKV + tl.arange(0, ROWS_QKV)
            tl.store(qkv_buf_ptr + rows, out.to(dtype), mask=rows < QKV)
            _signal(counters + 0)

        # -- phase 2: one (KV head, split of the context) per task ---------------------------------------------
        chunk = tl.cdiv(position + 1, SPLITS)  # keys per split; the split holding `position` stores the new key
        for task in range(pid, NKV * SPLITS, num_programs):
            head = task // SPLITS
            first = (task % SPLITS) * chunk
            last = tl.minimum(first + chunk, position + 1)  # keys first..last-1 (none for a split past the end)
            _wait(counters + 0, tasks_qkv)
            # the key: QK-norm + RoPE, stored with the value at `position` by the split that holds it
            k1 = tl.load(qkv_buf_ptr + NH * D + head * D + halves, cache_modifier=".cg").to(tl.float32)
            k2 = tl.load(qkv_buf_ptr + NH * D + head * D + HALF + halves, cache_modifier=".cg").to(tl.float32)
            rstd = tl.rsqrt((tl.sum(k1 * k1, 0) + tl.sum(k2 * k2, 0)) / D + eps)
            kw1 = tl.load(kn_ptr + layer * D + halves).to(tl.float32)
            kw2 = tl.load(kn_ptr + layer * D + HALF + halves).to(tl.float32)
            k1 = (kw1 * (k1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            k2 = (kw2 * (k2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            base = tl.cast(layer, tl.int64) * cache_stride_layer + head * max_length * D
            holds = (first <= position) & (position < last)
            dims = tl.arange(0, D)
            tl.store(k_cache_ptr + base + position * D + halves, (k1 * cos - k2 * sin).to(dtype), mask=holds)
            tl.store(k_cache_ptr + base + position * D + HALF + halves, (k2 * cos + k1 * sin).to(dtype), mask=holds)
            v = tl.load(qkv_buf_ptr + (NH + NKV) * D + head * D + dims, cache_modifier=".cg")
            tl.store(v_cache_ptr + base + position * D + dims, v, mask=holds)
            # its query heads (G of them, padded to BLOCK_G)
            g = tl.arange(0, BLOCK_G)
            gq = (g < G)[:, None]
            q_src = qkv_buf_ptr + (head * G + g)[:, None] * D + halves[None, :]
            q1 = tl.load(q_src, mask=gq, other=0.0, cache_modifier=".cg").to(tl.float32)
            q2 = tl.load(q_src + HALF, mask=gq, other=0.0, cache_modifier=".cg").to(tl.float32)
            rstd = tl.rsqrt((tl.sum(q1 * q1, 1) + tl.sum(q2 * q2, 1)) / D + eps)[:, None]
            qw1 = tl.load(qn_ptr + layer * D + halves).to(tl.float32)[None, :]
            qw2 = tl.load(qn_ptr + layer * D + HALF + halves).to(tl.float32)[None, :]
            q1 = (qw1 * (q1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            q2 = (qw2 * (q2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            qa = (q1 * cos[None, :] - q2 * sin[None, :]).to(dtype).to(tl.float32)  # (BLOCK_G, D/2)
            qb = (q2 * cos[None, :] + q1 * sin[None, :]).to(dtype).to(tl.float32)
            tl.debug_barrier()  # this program's key store is read back below
            # attention over keys first..last-1, online softmax in base 2
            scale = 1.4426950408889634 / tl.sqrt(D * 1.0)
            m = tl.full((BLOCK_G,), -1e30, tl.float32)
            l_sum = tl.zeros((BLOCK_G,), tl.float32)
            acc_a = tl.zeros((BLOCK_G, HALF), tl.float32)
            acc_b = tl.zeros((BLOCK_G, HALF), tl.float32)
            for t0 in range(first, last, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                live = t < last
                kp = k_cache_ptr + base + t[:, None] * D + halves[None, :]
                ka = tl.load(kp, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                kb = tl.load(kp + HALF, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                vp = v_cache_ptr + base + t[:, None] * D + halves[None, :]
                va = tl.load(vp, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                vb = tl.load(vp + HALF, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                s = tl.sum(qa[:, None, :] * ka[None, :, :], 2) + tl.sum(qb[:, None, :] * kb[None, :, :], 2)
                s = tl.where(live[None, :], s * scale, float("-inf"))  # (BLOCK_G, BLOCK_T)
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_sum = l_sum * alpha + tl.sum(p, 1)
                acc_a = acc_a * alpha[:, None] + tl.sum(p[:, :, None] * va[None, :, :], 1)
                acc_b = acc_b * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], 1)
                m = m_new
            # the split's partial result: (m, l) and the unnormalised sum, per query head (an empty split: -1e30, 0, 0)
            rows = (head * SPLITS + task % SPLITS) * G + g  # (BLOCK_G,): rows of part (NKV * SPLITS * G, D + 2)
            dst = part_ptr + rows[:, None] * (D + 2) + halves[None, :]
            tl.store(dst, acc_a, mask=gq)
            tl.store(dst + HALF, acc_b, mask=gq)
            tl.store(part_ptr + rows * (D + 2) + D, m, mask=g < G)
            tl.store(part_ptr + rows * (D + 2) + D + 1, l_sum, mask=g < G)
            _signal(counters + 1)

        # -- phase 2b: each query head's splits merged ----------------------------------------------------------
        for hq in range(pid, NH, num_programs):
            _wait(counters + 1, NKV * SPLITS)
            splits = tl.arange(0, BLOCK_S)
            live = splits < SPLITS
            rows = ((hq // G) * SPLITS + splits) * G + hq % G  # (BLOCK_S,)
            ms = tl.load(part_ptr + rows * (D + 2) + D, mask=live, other=-1e30, cache_modifier=".cg")
            ls = tl.load(part_ptr + rows * (D + 2) + D + 1, mask=live, other=0.0, cache_modifier=".cg")
            dims = tl.arange(0, D)
            accs = tl.load(part_ptr + rows[:, None] * (D + 2) + dims[None, :], mask=live[:, None], other=0.0,
                           cache_modifier=".cg")  # (BLOCK_S, D)  # fmt: skip
            weight = tl.exp2(ms - tl.max(ms, 0))  # (BLOCK_S,)
            out = tl.sum(accs * weight[:, None], 0) / tl.sum(ls * weight, 0)
            tl.store(attn_ptr + hq * D + dims, out.to(dtype))
            _signal(counters + 2)

        # -- phase 3: o_proj rows, added to the residual --------------------------------------------------------
        w_layer = o_w_ptr + tl.cast(layer, tl.int64) * H * NH * D
        for task in range(pid, tasks_o, num_programs):
            w = _rows(w_layer, task * ROWS_O, H, NH * D, ROWS_O, BLOCK_Q)
            _wait(counters + 2, NH)
            _add_rows(x_ptr, w, attn_ptr, NH * D, task * ROWS_O, H, ROWS_O, BLOCK_Q)
            _signal(counters + 3)

        # -- phase 4: SiLU(gate) x up of the normed residual ------------------------------------------------------
        w_layer = gu_w_ptr + tl.cast(layer, tl.int64) * 2 * I * H
        for task in range(pid, tasks_gu, num_programs):
            w_gate = _rows(w_layer, task * ROWS_GU, I, H, ROWS_GU, BLOCK_H)
            w_up = _rows(w_layer + I * H, task * ROWS_GU, I, H, ROWS_GU, BLOCK_H)
            _wait(counters + 3, tasks_o)
            y = _rms_norm(x_ptr, post_norm_ptr + layer * H, eps, H, BLOCK_H)
            gate = _dot(w_gate, y).to(dtype).to(tl.float32)
            up = _dot(w_up, y).to(dtype)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            rows = task * ROWS_GU + tl.arange(0, ROWS_GU)
            tl.store(act_ptr + rows, silu * up, mask=rows < I)
            _signal(counters + 4)

        # -- phase 5: down_proj rows, added to the residual -----------------------------------------------------
        w_layer = down_w_ptr + tl.cast(layer, tl.int64) * H * I
        for task in range(pid, tasks_down, num_programs):
            w = _rows(w_layer, task * ROWS_DOWN, H, I, ROWS_DOWN, BLOCK_I)
            _wait(counters + 4, tasks_gu)
            _add_rows(x_ptr, w, act_ptr, I, task * ROWS_DOWN, H, ROWS_DOWN, BLOCK_I)
            _signal(counters + 5)


# ---------------------------------------------------------------------------------------------------------------------
# the launch


@dataclass
class Launch:
    """Rows of each projection per task, and keys per attention tile: the work of one task (data, to sweep)."""

    rows_qkv: int = 32
    rows_o: int = 8
    rows_gate_up: int = 16
    rows_down: int = 8
    block_t: int = 32
    splits: int = 16  # of each KV head's context: NKV x splits attention tasks (8 x 16 = 128 for Qwen3-0.6B)
    num_warps: int = 8


def decode_step(weights: StackedWeights, x: Tensor, position: int, k_cache: Tensor, v_cache: Tensor, cos: Tensor,
                sin: Tensor, num_programs: int, launch: Launch | None = None) -> Tensor:  # fmt: skip
    """Run every decoder layer on one token: x (H,) the token's embedding, in the model dtype, becomes the last
    layer's output (before the final norm), in place; its key and value are written at `position` of k_cache,
    v_cache (layers, nkv, max_length, D), which must hold the sequence's keys at 0..position-1. cos, sin: the
    model's rotary tables (positions, D/2) fp32. num_programs: at most the number of SMs (all must be resident);
    1 walks every task in order (the Triton interpreter's case). Returns x."""
    launch = launch or Launch()
    L, qkv_rows, H = weights.qkv.shape
    D = weights.q_norm.shape[1]
    nkv, max_length = k_cache.shape[1], k_cache.shape[2]
    nh = qkv_rows // D - 2 * nkv
    I = weights.down.shape[2]  # noqa: E741 - the config's letter for intermediate_size
    if x.shape != (H,) or not x.is_contiguous():
        raise ValueError(f"decode_step: x must be a contiguous ({H},) tensor, got {tuple(x.shape)}")
    if k_cache.shape != (L, nkv, max_length, D) or v_cache.shape != k_cache.shape or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous():  # fmt: skip
        raise ValueError(f"decode_step: k_cache and v_cache must be contiguous ({L}, nkv, max_length, {D}), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not 0 <= position < max_length or position >= cos.shape[0]:
        raise ValueError(f"decode_step: position {position} is outside the cache ({max_length}) or the rotary table "
                         f"({cos.shape[0]})")
    if num_programs < 1:
        raise ValueError(f"decode_step: num_programs must be at least 1, got {num_programs}")
    device, dtype = x.device, x.dtype
    qkv_buf = torch.empty(qkv_rows, dtype=dtype, device=device)
    part = torch.empty(nkv * launch.splits * (nh // nkv), D + 2, dtype=torch.float32, device=device)
    attn = torch.empty(nh * D, dtype=dtype, device=device)
    act = torch.empty(I, dtype=dtype, device=device)
    counters = torch.zeros(L * PHASES, dtype=torch.int32, device=device)
    _decode_step_kernel[(num_programs,)](
        x, qkv_buf, part, attn, act, counters,
        weights.input_norm, weights.qkv, weights.q_norm, weights.k_norm, weights.o_proj, weights.post_norm,
        weights.gate_up, weights.down, cos, sin, k_cache, v_cache,
        position, L, max_length, weights.eps, num_programs,
        H=H, NH=nh, NKV=nkv, D=D, I=I,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_Q=triton.next_power_of_2(nh * D), BLOCK_I=triton.next_power_of_2(I),
        BLOCK_G=triton.next_power_of_2(nh // nkv),
        ROWS_QKV=launch.rows_qkv, ROWS_O=launch.rows_o, ROWS_GU=launch.rows_gate_up, ROWS_DOWN=launch.rows_down,
        BLOCK_T=launch.block_t, SPLITS=launch.splits, BLOCK_S=triton.next_power_of_2(launch.splits),
        PHASES=PHASES, num_warps=launch.num_warps,
    )  # fmt: skip
    return x
