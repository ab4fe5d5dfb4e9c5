"""A persistent decode step for one sequence (batch 1): all decoder layers of one token in a single Triton launch.

At batch 1 each of the engine's ~9 kernels per layer sits at a floor of a few microseconds (launch, ramp, tail), so
a token costs ~1.1 ms on the H200 where its 1.19 GB of weights need 0.28 ms (benchmarks/NOTES.md). Here one program
per SM walks a fixed list of tasks, layer by layer:

    phase 1  RMSNorm of the residual (each program recomputes it) and a slice of the qkv projection's rows
    phase 2  one KV head and a split of its context: QK-norm + RoPE of its query heads and its key, the key and
             value stored at `position` (by the split that holds it), attention of those query heads over the
             split's keys, written as a partial result (running max, sum, unnormalised output); the split that
             finishes last (a counter per KV head) merges the head's partial results into the attention output
    phase 3  a slice of o_proj's rows, added to the residual
    phase 4  RMSNorm of the residual and a slice of gate/up rows: SiLU(gate) x up
    phase 5  a slice of down_proj's rows, added to the residual

A phase's tasks wait, through a counter in global memory per (layer, phase), until every task of the phase before
has published its stores (release / acquire at GPU scope, a CTA barrier on each side). Counters, not a grid-wide
barrier: a program with no task in a phase does not wait for it. The weights do not depend on the activations, so
a task loads its slice before it waits, and (on the GPU) each program asks L2 for its slices a few phases ahead
(`prefetch.global.L2`), so memory keeps streaming through the waits; an attention task likewise asks for its split's
cached keys and values before it waits. Every program must be resident at once (grid <= SMs), or a wait could
deadlock.

Rows per task spread each projection over the SMs (Qwen3-0.6B on 132 SMs: 128 tasks of 32, 8, 24 and 8 rows), the
same at any number of programs, so one program (which walks every task in order) computes exactly what 132 do.

Testing without a GPU: the Triton interpreter runs programs one after another, so with several programs the first
wait would never end. With one program the same kernel walks every task in order and each wait finds its counter
complete: that run checks the arithmetic against the model (tests/test_persistent_decode.py). The GPU adds the
synchronisation between programs and the prefetches (inline PTX, which the interpreter lacks), which the GPU test
checks against the one-program result.

Numerics follow model.py: RMSNorm in fp32 rounded to the model dtype, then times the weight; RoPE in fp32; matrix
products accumulate in fp32 and round to the model dtype; the residual stream stays in the model dtype. The
attention's softmax runs in fp32 over scores of fp32 products (the model's SDPA may round differently).
Keys and values: the engine's paged pool (2, layers, blocks, block_size, nkv, D), through the sequence's block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..model import Qwen3ForCausalLM, RMSNorm
from .triton_kernels import _rms_norm_rope


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

    @staticmethod
    def check(model: Qwen3ForCausalLM) -> None:
        """A ValueError naming what the kernel does not compute, if anything: it computes Qwen3's pre-norm layers
        with RMSNorms, SwiGLU and plain bias-free projections."""
        first = model.model.layers[0]
        head_dim = model.config.head_dim
        if head_dim < 4 or head_dim & (head_dim - 1):
            raise ValueError(f"persistent decode: head_dim {head_dim} is not a power of two (tiles hold whole heads)")
        for name, norm in (("input_layernorm", first.input_layernorm), ("self_attn.q_norm", first.self_attn.q_norm),
                           ("self_attn.k_norm", first.self_attn.k_norm)):  # fmt: skip
            if not isinstance(norm, RMSNorm):
                raise ValueError(f"persistent decode: {name} is {type(norm).__name__}; the kernel computes RMSNorm")
        if first.post_norm or not hasattr(first.mlp, "gate_up_proj"):
            raise ValueError("persistent decode: needs Qwen3's pre-norm SwiGLU layers (norm_position 'pre', "
                             "mlp_type 'swiglu')")
        projections = (first.self_attn.qkv_proj, first.self_attn.o_proj, first.mlp.gate_up_proj, first.mlp.down_proj)
        if any(type(p) is not torch.nn.Linear or p.bias is not None for p in projections):
            raise ValueError("persistent decode: needs plain bias-free nn.Linear projections (not "
                             f"{', '.join(sorted({type(p).__name__ for p in projections}))})")  # fmt: skip

    @classmethod
    def from_model(cls, model: Qwen3ForCausalLM, share: bool = False) -> StackedWeights:
        """The stacks, copied from the model's layers; share=True then makes each layer's parameters views of
        them (the same values, one copy of the weights in memory instead of two)."""
        cls.check(model)
        layers = model.model.layers
        getters = {
            "input_norm": lambda m: m.input_layernorm.weight,
            "qkv": lambda m: m.self_attn.qkv_proj.weight,
            "q_norm": lambda m: m.self_attn.q_norm.weight,
            "k_norm": lambda m: m.self_attn.k_norm.weight,
            "o_proj": lambda m: m.self_attn.o_proj.weight,
            "post_norm": lambda m: m.post_attention_layernorm.weight,
            "gate_up": lambda m: m.mlp.gate_up_proj.weight,
            "down": lambda m: m.mlp.down_proj.weight,
        }
        stacks = {}
        for field, get in getters.items():
            stacks[field] = torch.stack([get(layer).detach() for layer in layers]).contiguous()
            if share:
                for i, layer in enumerate(layers):
                    get(layer).data = stacks[field][i]
        return cls(**stacks, eps=layers[0].input_layernorm.eps)


# ---------------------------------------------------------------------------------------------------------------------
# synchronisation and prefetch (GPU: PTX through inline assembly; the interpreter has none and runs one program)


@triton.jit
def _wait(counter_ptr, target, GPU: tl.constexpr, POLL_LOAD: tl.constexpr, NO_WAIT: tl.constexpr = False):
    # Spin until `target` tasks have signalled; then every thread of the program may read what they stored. POLL_LOAD
    # (GPU only): every thread polls with an acquire load; else one thread with an atomic read-modify-write (which
    # the compiler turns into a strong load). NO_WAIT: a diagnostic that times the kernel without waiting (wrong
    # results with several programs).
    if NO_WAIT:
        pass
    elif GPU and POLL_LOAD:
        while tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [counter_ptr],
                                        dtype=tl.int32, is_pure=False, pack=1) < target:  # fmt: skip
            pass
    else:
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
    tl.debug_barrier()


@triton.jit
def _stamp(trace_ptr, pid, layer, phase, which, TRACE: tl.constexpr):
    # TRACE (a diagnostic, GPU only): the global timer (ns) at this point of this program's first task of the phase,
    # into trace (programs, layers, 5 phases, 2: after the wait, after the signal).
    if TRACE:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False,
                                        pack=1)  # fmt: skip
        tl.store(trace_ptr + ((pid * 64 + layer) * 5 + phase) * 2 + which, now)


@triton.jit
def _signal(counter_ptr):
    tl.debug_barrier()  # every thread's stores of this task are done before one thread releases them
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _prefetch_lines(ptrs, GPU: tl.constexpr):
    # Ask L2 for the line holding each address of ptrs: its bytes stream from memory while the program does other
    # work, and its later loads hit L2. No-op in the interpreter.
    if GPU:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _prefetch(ptr, n, LINE: tl.constexpr, GPU: tl.constexpr):
    # The n contiguous elements at ptr into L2, 512 lines of LINE elements at a time.
    if GPU:
        for start in range(0, n, 512 * LINE):
            _prefetch_lines(ptr + tl.minimum(start + tl.arange(0, 512) * LINE, n - 1), GPU)


@triton.jit
def _prefetch_task(layer, phase, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv, rows_o,
                   rows_gu, rows_down, H: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
                   I: tl.constexpr, LINE: tl.constexpr, GPU: tl.constexpr):  # noqa: E741  # fmt: skip
    # This program's first task's weights in weight phase `phase` (0 qkv, 1 o_proj, 2 gate/up, 3 down) of `layer`.
    QKV: tl.constexpr = (NH + 2 * NKV) * D
    if layer < num_layers:
        if phase == 0:
            if pid * rows_qkv < QKV:
                first = pid * rows_qkv
                n = tl.minimum(rows_qkv, QKV - first) * H
                _prefetch(qkv_w_ptr + tl.cast(layer, tl.int64) * QKV * H + first * H, n, LINE, GPU)
        elif phase == 1:
            if pid * rows_o < H:
                first = pid * rows_o
                n = tl.minimum(rows_o, H - first) * NH * D
                _prefetch(o_w_ptr + tl.cast(layer, tl.int64) * H * NH * D + first * NH * D, n, LINE, GPU)
        elif phase == 2:
            if pid * rows_gu < I:
                first = pid * rows_gu
                n = tl.minimum(rows_gu, I - first) * H
                base = gu_w_ptr + tl.cast(layer, tl.int64) * 2 * I * H + first * H
                _prefetch(base, n, LINE, GPU)
                _prefetch(base + I * H, n, LINE, GPU)
        else:
            if pid * rows_down < H:
                first = pid * rows_down
                n = tl.minimum(rows_down, H - first) * I
                _prefetch(down_w_ptr + tl.cast(layer, tl.int64) * H * I + first * I, n, LINE, GPU)


@triton.jit
def _prefetch_ahead(layer, phase, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv, rows_o,
                    rows_gu, rows_down, H: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
                    I: tl.constexpr, LINE: tl.constexpr, AHEAD: tl.constexpr, GPU: tl.constexpr):  # noqa: E741  # fmt: skip
    # At weight phase `phase` of `layer`: the weights AHEAD weight phases later (0: no prefetch).
    if AHEAD > 0:
        target = layer * 4 + phase + AHEAD
        _prefetch_task(target // 4, target % 4, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv,
                       rows_o, rows_gu, rows_down, H, NH, NKV, D, I, LINE, GPU)  # fmt: skip


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
    # Rows row0..row0 + num_rows - 1 of the row-major matrix of K columns at w_ptr: (ROWS, BLOCK_K) in its dtype,
    # zero outside. Issued before a task waits: the weights do not depend on the activations, so their bytes stream
    # during the wait.
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    keep = (rows[:, None] < num_rows) & (cols[None, :] < K)
    return tl.load(w_ptr + (row0 + rows[:, None]).to(tl.int64) * K + cols[None, :], mask=keep, other=0.0)


@triton.jit
def _dot(w, vec):
    # (ROWS,) fp32: the rows w (ROWS, BLOCK_K) times vec (BLOCK_K,) fp32, accumulated in fp32.
    return tl.sum(w.to(tl.float32) * vec[None, :], 1)


@triton.jit
def _add_rows(x_ptr, w, vec_ptr, n, row0, num_rows, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # The residual's rows row0..row0 + num_rows - 1 += the rows w (ROWS, BLOCK_K) times the vector of n values at
    # vec_ptr (another phase's output: read past L1), the product rounded to the model dtype first, as
    # x + proj(...) in model.py.
    cols = tl.arange(0, BLOCK_K)
    vec = tl.load(vec_ptr + cols, mask=cols < n, other=0.0, cache_modifier=".cg").to(tl.float32)
    rows = tl.arange(0, ROWS)
    keep = rows < num_rows
    x = tl.load(x_ptr + row0 + rows, mask=keep, other=0.0, cache_modifier=".cg")
    tl.store(x_ptr + row0 + rows, x + _dot(w, vec).to(x.dtype), mask=keep)


@triton.jit
def _key_slots(table_ptr, t, live, block_size, NKV: tl.constexpr, D: tl.constexpr):
    # Offsets (in elements, within one layer's keys) of tokens t of the sequence: block table, then slot.
    block = tl.load(table_ptr + t // block_size, mask=live, other=0)
    return (block.to(tl.int64) * block_size + t % block_size) * (NKV * D)


# ---------------------------------------------------------------------------------------------------------------------
# the kernel


@triton.jit
def _decode_step_kernel(
    x_ptr, qkv_buf_ptr, part_ptr, attn_ptr, act_ptr, counters_ptr,
    in_norm_ptr, qkv_w_ptr, qn_ptr, kn_ptr, o_w_ptr, post_norm_ptr, gu_w_ptr, down_w_ptr,
    cos_ptr, sin_ptr, kv_ptr, table_ptr, position_ptr, slot_ptr, trace_ptr,
    num_layers, num_blocks, block_size, eps, num_programs, rows_qkv, rows_o, rows_gu, rows_down,
    H: tl.constexpr, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, I: tl.constexpr,  # noqa: E741 - intermediate_size
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr,
    ROWS_QKV: tl.constexpr, ROWS_O: tl.constexpr, ROWS_GU: tl.constexpr, ROWS_DOWN: tl.constexpr,
    BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, LINE: tl.constexpr, AHEAD: tl.constexpr,
    GPU: tl.constexpr, POLL_LOAD: tl.constexpr, LATE_LOADS: tl.constexpr, NO_WAIT: tl.constexpr,
    TRACE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    G: tl.constexpr = NH // NKV
    HALF: tl.constexpr = D // 2
    QKV: tl.constexpr = (NH + 2 * NKV) * D
    PER_LAYER: tl.constexpr = 5 + NKV  # counters: qkv, merged heads, o_proj, gate/up, down; then one per KV head
    tasks_qkv = tl.cdiv(QKV, rows_qkv)
    tasks_o = tl.cdiv(H, rows_o)
    tasks_gu = tl.cdiv(I, rows_gu)
    tasks_down = tl.cdiv(H, rows_down)
    dtype = x_ptr.dtype.element_ty
    position = tl.load(position_ptr).to(tl.int32)
    layer_stride = tl.cast(num_blocks, tl.int64) * block_size * NKV * D  # one layer's keys (or values) in the pool
    v_base = kv_ptr + tl.cast(num_layers, tl.int64) * layer_stride  # the pool is (2, layers, blocks, block_size, ...)
    halves = tl.arange(0, HALF)
    dims = tl.arange(0, D)
    cos = tl.load(cos_ptr + position * HALF + halves)  # (D/2,) fp32
    sin = tl.load(sin_ptr + position * HALF + halves)
    new_slot = tl.load(slot_ptr).to(tl.int64)  # where the new key and value go (< 0: nowhere)
    # the first AHEAD weight phases: later ones are asked for AHEAD phases before their turn
    for ahead in tl.static_range(AHEAD):
        _prefetch_task(ahead // 4, ahead % 4, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv,
                       rows_o, rows_gu, rows_down, H, NH, NKV, D, I, LINE, GPU)  # fmt: skip

    for layer in range(num_layers):
        counters = counters_ptr + layer * PER_LAYER
        # -- phase 1: qkv rows of the normed residual ------------------------------------------------------------
        _prefetch_ahead(layer, 0, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv, rows_o,
                        rows_gu, rows_down, H, NH, NKV, D, I, LINE, AHEAD, GPU)  # fmt: skip
        w_layer = qkv_w_ptr + tl.cast(layer, tl.int64) * QKV * H
        for task in range(pid, tasks_qkv, num_programs):
            first = task * rows_qkv
            n = tl.minimum(rows_qkv, QKV - first)
            if LATE_LOADS and layer > 0:
                _wait(counters + 4 - PER_LAYER, tasks_down, GPU, POLL_LOAD, NO_WAIT)
            w = _rows(w_layer, first, n, H, ROWS_QKV, BLOCK_H)
            if layer > 0:
                _wait(counters + 4 - PER_LAYER, tasks_down, GPU, POLL_LOAD, NO_WAIT)  # the layer before: phase 5
            _stamp(trace_ptr, pid, layer, 0, 0, TRACE)
            y = _rms_norm(x_ptr, in_norm_ptr + layer * H, eps, H, BLOCK_H)
            out = _dot(w, y)
            rows = tl.arange(0, ROWS_QKV)
            tl.store(qkv_buf_ptr + first + rows, out.to(dtype), mask=rows < n)
            _signal(counters + 0)
            _stamp(trace_ptr, pid, layer, 0, 1, TRACE)

        # -- phase 2: one (KV head, split of the context) per task; the split that finishes last merges -----------
        chunk = tl.cdiv(position + 1, SPLITS)  # keys per split; the split holding `position` stores the new key
        k_layer = kv_ptr + tl.cast(layer, tl.int64) * layer_stride
        v_layer = v_base + tl.cast(layer, tl.int64) * layer_stride
        for task in range(pid, NKV * SPLITS, num_programs):
            head = task // SPLITS
            first = (task % SPLITS) * chunk
            last = tl.minimum(first + chunk, position + 1)  # keys first..last-1 (none for a split past the end)
            for t0 in range(first, tl.minimum(last, position), 4 * BLOCK_T):  # the cached keys and values: into L2
                t = t0 + tl.arange(0, 4 * BLOCK_T)
                slots = _key_slots(table_ptr, t, t < position, block_size, NKV, D) + head * D
                for line in tl.static_range(0, D, LINE):  # a head's key (and value) may span several lines
                    _prefetch_lines(k_layer + slots + line, GPU)
                    _prefetch_lines(v_layer + slots + line, GPU)
            _wait(counters + 0, tasks_qkv, GPU, POLL_LOAD, NO_WAIT)
            _stamp(trace_ptr, pid, layer, 1, 0, TRACE)
            # the key: QK-norm + RoPE (the engine's own _rms_norm_rope, on a tile whose row 0 is the key), stored with
            # the value at `position` by the split that holds it. (After the wait's acquire, plain loads see the
            # other programs' stores.)
            g = tl.arange(0, BLOCK_G)
            cols = halves[None, :]
            in_half = cols < HALF
            key = (g == 0)[:, None] & in_half  # (BLOCK_G, D/2)
            k1, k2 = _rms_norm_rope(qkv_buf_ptr + NH * D + head * D + cols, key, kn_ptr + layer * D, cols, in_half,
                                    cos, sin, eps, dtype, D)  # fmt: skip
            holds = (first <= position) & (position < last) & (new_slot >= 0)
            new = new_slot * (NKV * D) + head * D
            k_dst = k_layer + new + (g * 0)[:, None] + cols  # (BLOCK_G, D/2): row 0 is stored
            tl.store(k_dst, k1, mask=key & holds)
            tl.store(k_dst + HALF, k2, mask=key & holds)
            v = tl.load(qkv_buf_ptr + (NH + NKV) * D + head * D + dims, cache_modifier=".cg")
            tl.store(v_layer + new + dims, v, mask=holds)
            # its query heads (G of them, padded to BLOCK_G)
            gq = (g < G)[:, None]
            q_src = qkv_buf_ptr + (head * G + g)[:, None] * D + cols
            qa, qb = _rms_norm_rope(q_src, gq & in_half, qn_ptr + layer * D, cols, in_half, cos, sin, eps, dtype, D)
            qa = qa.to(tl.float32)  # (BLOCK_G, D/2)
            qb = qb.to(tl.float32)
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
                slots = _key_slots(table_ptr, t, live, block_size, NKV, D) + head * D
                kp = k_layer + slots[:, None] + halves[None, :]
                ka = tl.load(kp, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                kb = tl.load(kp + HALF, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                vp = v_layer + slots[:, None] + halves[None, :]
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
            # the last of the head's splits to finish merges them all (its acquire sees the others' partials)
            tl.debug_barrier()
            done = tl.atomic_add(counters + 5 + head, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:
                tl.debug_barrier()
                split_ids = tl.arange(0, BLOCK_S)
                split_live = split_ids < SPLITS
                for gi in range(G):
                    part_rows = (head * SPLITS + split_ids) * G + gi  # (BLOCK_S,)
                    ms = tl.load(part_ptr + part_rows * (D + 2) + D, mask=split_live, other=-1e30,
                                 cache_modifier=".cg")  # fmt: skip
                    ls = tl.load(part_ptr + part_rows * (D + 2) + D + 1, mask=split_live, other=0.0,
                                 cache_modifier=".cg")  # fmt: skip
                    accs = tl.load(part_ptr + part_rows[:, None] * (D + 2) + dims[None, :], mask=split_live[:, None],
                                   other=0.0, cache_modifier=".cg")  # (BLOCK_S, D)  # fmt: skip
                    weight = tl.exp2(ms - tl.max(ms, 0))  # (BLOCK_S,)
                    out = tl.sum(accs * weight[:, None], 0) / tl.sum(ls * weight, 0)
                    tl.store(attn_ptr + (head * G + gi) * D + dims, out.to(dtype))
                _signal(counters + 1)
            _stamp(trace_ptr, pid, layer, 1, 1, TRACE)

        # -- phase 3: o_proj rows, added to the residual --------------------------------------------------------
        _prefetch_ahead(layer, 1, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv, rows_o,
                        rows_gu, rows_down, H, NH, NKV, D, I, LINE, AHEAD, GPU)  # fmt: skip
        w_layer = o_w_ptr + tl.cast(layer, tl.int64) * H * NH * D
        for task in range(pid, tasks_o, num_programs):
            first = task * rows_o
            n = tl.minimum(rows_o, H - first)
            if LATE_LOADS:
                _wait(counters + 1, NKV, GPU, POLL_LOAD, NO_WAIT)
            w = _rows(w_layer, first, n, NH * D, ROWS_O, BLOCK_Q)
            _wait(counters + 1, NKV, GPU, POLL_LOAD, NO_WAIT)
            _stamp(trace_ptr, pid, layer, 2, 0, TRACE)
            _add_rows(x_ptr, w, attn_ptr, NH * D, first, n, ROWS_O, BLOCK_Q)
            _signal(counters + 2)
            _stamp(trace_ptr, pid, layer, 2, 1, TRACE)

        # -- phase 4: SiLU(gate) x up of the normed residual ------------------------------------------------------
        _prefetch_ahead(layer, 2, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv, rows_o,
                        rows_gu, rows_down, H, NH, NKV, D, I, LINE, AHEAD, GPU)  # fmt: skip
        w_layer = gu_w_ptr + tl.cast(layer, tl.int64) * 2 * I * H
        for task in range(pid, tasks_gu, num_programs):
            first = task * rows_gu
            n = tl.minimum(rows_gu, I - first)
            if LATE_LOADS:
                _wait(counters + 2, tasks_o, GPU, POLL_LOAD, NO_WAIT)
            w_gate = _rows(w_layer, first, n, H, ROWS_GU, BLOCK_H)
            w_up = _rows(w_layer + I * H, first, n, H, ROWS_GU, BLOCK_H)
            _wait(counters + 2, tasks_o, GPU, POLL_LOAD, NO_WAIT)
            _stamp(trace_ptr, pid, layer, 3, 0, TRACE)
            y = _rms_norm(x_ptr, post_norm_ptr + layer * H, eps, H, BLOCK_H)
            gate = _dot(w_gate, y).to(dtype).to(tl.float32)
            up = _dot(w_up, y).to(dtype)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            rows = tl.arange(0, ROWS_GU)
            tl.store(act_ptr + first + rows, silu * up, mask=rows < n)
            _signal(counters + 3)
            _stamp(trace_ptr, pid, layer, 3, 1, TRACE)

        # -- phase 5: down_proj rows, added to the residual -----------------------------------------------------
        _prefetch_ahead(layer, 3, num_layers, pid, qkv_w_ptr, o_w_ptr, gu_w_ptr, down_w_ptr, rows_qkv, rows_o,
                        rows_gu, rows_down, H, NH, NKV, D, I, LINE, AHEAD, GPU)  # fmt: skip
        w_layer = down_w_ptr + tl.cast(layer, tl.int64) * H * I
        for task in range(pid, tasks_down, num_programs):
            first = task * rows_down
            n = tl.minimum(rows_down, H - first)
            if LATE_LOADS:
                _wait(counters + 3, tasks_gu, GPU, POLL_LOAD, NO_WAIT)
            w = _rows(w_layer, first, n, I, ROWS_DOWN, BLOCK_I)
            _wait(counters + 3, tasks_gu, GPU, POLL_LOAD, NO_WAIT)
            _stamp(trace_ptr, pid, layer, 4, 0, TRACE)
            _add_rows(x_ptr, w, act_ptr, I, first, n, ROWS_DOWN, BLOCK_I)
            _signal(counters + 4)
            _stamp(trace_ptr, pid, layer, 4, 1, TRACE)


# ---------------------------------------------------------------------------------------------------------------------
# the launch


@dataclass
class Launch:
    """The work of one task (data, to sweep): at most this many rows of each projection (fewer when that spreads
    the rows over all SMs: Qwen3-0.6B on 132 SMs takes 32, 8, 24 and 8, 128 tasks each), keys per attention tile,
    splits of the context per KV head, and how many weight phases ahead each program asks L2 for its weights."""

    rows_qkv: int = 32
    rows_o: int = 8
    rows_gate_up: int = 32
    rows_down: int = 8
    block_t: int = 32
    splits: int = 16  # of each KV head's context: NKV x splits attention tasks (8 x 16 = 128 for Qwen3-0.6B)
    num_warps: int = 8
    prefetch_ahead: int = 0  # weight phases (4 per layer); 0: none (H200: no gain at 1 or 2). Never in the interpreter
    poll_load: bool = False  # all threads poll a counter with loads (GPU; H200: 5% slower); False: one atomic
    late_loads: bool = False  # a diagnostic: load a task's weights after its wait instead of before
    no_wait: bool = False  # a diagnostic: skip every wait (the time without synchronisation; wrong results)


def counters_per_step(num_layers: int, num_kv_heads: int) -> int:
    """The int32 counters one step uses; they must be zero when it starts."""
    return num_layers * (5 + num_kv_heads)


def decode_step(weights: StackedWeights, x: Tensor, position: Tensor, slot: Tensor, kv: Tensor, block_table: Tensor,
                cos: Tensor, sin: Tensor, num_programs: int, launch: Launch | None = None,
                counters: Tensor | None = None, trace: Tensor | None = None) -> Tensor:  # fmt: skip
    """Run every decoder layer on one token: x (H,) the token's embedding, in the model dtype, becomes the last
    layer's output (before the final norm), in place. position, slot: (1,) integer tensors on the device (so a CUDA
    graph can replay the step). kv: the engine's pool (2, layers, blocks, block_size, nkv, D) in the model dtype,
    holding the sequence's keys and values at 0..position-1 through block_table (int32, the sequence's blocks); the
    new key and value are written at pool slot `slot` (block_table[position // block_size] * block_size + position
    % block_size; < 0: nowhere, for a warm-up). cos, sin: the model's rotary tables (positions, D/2) fp32.
    num_programs: at most the number of SMs (all must be resident at once); 1 walks every task in order (the Triton
    interpreter's case). counters: counters_per_step(...) int32 zeros (allocated here when None). trace (a diagnostic,
    GPU only): int64 (num_programs, 64, 5, 2) that receives each program's global timer after each phase's wait and
    after its signal (benchmarks/persistent_decode.py --trace). Returns x."""
    launch = launch or Launch()
    L, qkv_rows, H = weights.qkv.shape
    D = weights.q_norm.shape[1]
    if kv.dim() != 6 or kv.shape[0] != 2 or kv.shape[1] != L or kv.shape[5] != D or not kv.is_contiguous():
        raise ValueError(f"decode_step: kv must be a contiguous pool (2, {L}, blocks, block_size, nkv, {D}), got "
                         f"{tuple(kv.shape)}")  # fmt: skip
    nkv, num_blocks, block_size = kv.shape[4], kv.shape[2], kv.shape[3]
    nh = qkv_rows // D - 2 * nkv
    I = weights.down.shape[2]  # noqa: E741 - the config's letter for intermediate_size
    if x.shape != (H,) or not x.is_contiguous() or kv.dtype != x.dtype:
        raise ValueError(f"decode_step: x must be a contiguous ({H},) tensor of the pool's dtype {kv.dtype}, got "
                         f"{tuple(x.shape)} {x.dtype}")  # fmt: skip
    if position.numel() != 1 or slot.numel() != 1 or block_table.dim() != 1 or block_table.dtype != torch.int32:
        raise ValueError(f"decode_step: position and slot must hold one value each and block_table be a 1-d int32 "
                         f"tensor, got {tuple(position.shape)}, {tuple(slot.shape)} and {tuple(block_table.shape)} "
                         f"{block_table.dtype}")  # fmt: skip
    if num_programs < 1:
        raise ValueError(f"decode_step: num_programs must be at least 1, got {num_programs}")
    if trace is not None and (trace.shape != (num_programs, 64, 5, 2) or trace.dtype != torch.int64 or L > 64):
        raise ValueError(f"decode_step: trace must be int64 ({num_programs}, 64, 5, 2) and layers <= 64")
    device, dtype = x.device, x.dtype
    qkv_buf = torch.empty(qkv_rows, dtype=dtype, device=device)
    part = torch.empty(nkv * launch.splits * (nh // nkv), D + 2, dtype=torch.float32, device=device)
    attn = torch.empty(nh * D, dtype=dtype, device=device)
    act = torch.empty(I, dtype=dtype, device=device)
    if counters is None:
        counters = torch.zeros(counters_per_step(L, nkv), dtype=torch.int32, device=device)
    gpu = device.type == "cuda"
    # Rows per task: the rows spread over the SMs (on the GPU; over the programs in the interpreter), at most the
    # launch's, so that the grouping (and so the result) is the same at any num_programs.
    spread = torch.cuda.get_device_properties(device).multi_processor_count if gpu else num_programs

    def rows(limit: int, total: int) -> int:
        return min(limit, -(-total // spread))

    _decode_step_kernel[(num_programs,)](
        x, qkv_buf, part, attn, act, counters,
        weights.input_norm, weights.qkv, weights.q_norm, weights.k_norm, weights.o_proj, weights.post_norm,
        weights.gate_up, weights.down, cos, sin, kv, block_table, position, slot, trace if trace is not None else x,
        L, num_blocks, block_size, weights.eps, num_programs,
        rows(launch.rows_qkv, qkv_rows), rows(launch.rows_o, H), rows(launch.rows_gate_up, I),
        rows(launch.rows_down, H),
        H=H, NH=nh, NKV=nkv, D=D, I=I,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_Q=triton.next_power_of_2(nh * D), BLOCK_I=triton.next_power_of_2(I),
        BLOCK_G=triton.next_power_of_2(nh // nkv),
        ROWS_QKV=triton.next_power_of_2(launch.rows_qkv), ROWS_O=triton.next_power_of_2(launch.rows_o),
        ROWS_GU=triton.next_power_of_2(launch.rows_gate_up), ROWS_DOWN=triton.next_power_of_2(launch.rows_down),
        BLOCK_T=launch.block_t, SPLITS=launch.splits, BLOCK_S=triton.next_power_of_2(launch.splits),
        LINE=128 // x.element_size(), AHEAD=launch.prefetch_ahead if gpu else 0, GPU=gpu, POLL_LOAD=launch.poll_load,
        LATE_LOADS=launch.late_loads, NO_WAIT=launch.no_wait, TRACE=trace is not None and gpu,
        num_warps=launch.num_warps,
    )  # fmt: skip
    return x
