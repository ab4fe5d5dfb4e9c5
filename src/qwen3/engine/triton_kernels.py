"""Triton kernels for the engine's paged KV cache (CUDA): store_kv, paged_attention, paged_decode_attention.

Same signatures and meaning as the pure-PyTorch reference functions in attention.py (the contract is written out
there and in the functions below). This module imports triton at its top, so importing it fails cleanly where
triton is absent and the engine falls back to the reference path; nothing in qwen3 imports it at import time.

What is not obvious from the code:
- Cache layout: k_cache, v_cache are (num_blocks, block_size, nkv, D); key t of sequence s lives in block
  block_tables[s, t // block_size] at offset t % block_size. Offsets into the cache are computed in int64 (one
  layer of a large pool can pass 2**31 elements).
- GQA: one program serves all G = nh // nkv query heads of one KV head, so each K/V tile is loaded once for the
  group. The rows of a program's tile are (query token, head of the group) pairs, G padded to a power of two.
- Softmax: online (flash) softmax in fp32 in base 2: scores are multiplied by scale * log2(e) and exponentiated
  with exp2. The running max starts at a finite -1e30 and masked scores are -inf, so fully masked rows (padding)
  never produce NaN; their sum stays 0 and is replaced by 1 before dividing.
- paged_attention's grid is (N // BLOCK_Q + S, nkv): an upper bound on the query blocks of all sequences
  (sequence s's blocks start at query_start_loc[s] // BLOCK_Q + s); each program finds its sequence by binary
  search over query_start_loc and surplus programs exit. The grid depends on shapes only.
- paged_decode_attention splits each sequence's context into num_splits parts (flash-decoding); the grid and all
  scalars depend only on shapes, seq_lens is read inside the kernel, so the call can be captured in a CUDA graph.
  An empty split writes a neutral partial (lse -inf, acc 0); a reduce kernel merges the partials with weights
  exp2(lse - max lse). With num_splits == 1 the split kernel writes the output itself.
  The grid is (nkv * num_splits, S): the GPU starts programs roughly in grid order, so all programs of one sequence
  start together and a batch packed longest context first (the scheduler's order) starts its longest work first.
  With (S, nkv, splits), KV head 7 of the longest sequence started after every sequence's head 0..6: the tail of
  the launch (H200, contexts U(200, 2000): 3.6 -> 4.1 TB/s at 128 sequences, 3.0 -> 3.7 at 64; RESULTS.md).
- fp32 inputs use exact fp32 dot products (input_precision "ieee", not TF32), so fp32 results match a float64
  reference closely; bf16/fp16 inputs use the tensor cores with fp32 accumulation.
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Launch configurations, chosen for the H100/H200 (sm_90) by reasoning and by ptxas's report (no register spills, shared
# memory well under the 227 KiB limit; `python benchmarks/kernels.py --compile-only` prints it). Data, so that the
# benchmark can sweep alternatives. fp32 tiles are smaller: exact fp32 dot products run on the FMA units and need more
# registers.
# paged_attention: rows per program (query tokens x padded group) by the largest rows one sequence needs:
#   (most rows, rows, BLOCK_N keys per tile, num_warps, num_stages), the first entry that fits is used.
PREFILL_CONFIG = {
    # The catch-all: measured on the H200 (benchmarks/kernels.py sweep, 256 x 512 new tokens): 128 rows x 32 keys,
    # 4 warps, 3 stages gave 183 TFLOP/s against 148 for 128 x 64 with 8 warps (2026-11-30).
    "half": [(16, 16, 64, 4, 3), (64, 64, 64, 4, 3), (None, 128, 32, 4, 3)],
    "fp32": [(16, 16, 16, 4, 2), (None, 64, 16, 8, 2)],
}
# paged_decode_attention: (BLOCK_N keys per tile, num_warps, num_stages). With num_stages 3 the pipeliner fetches the
# block-table entries two tiles ahead and K/V one tile ahead, so a tile's address is ready when its load is issued.
DECODE_CONFIG = {"half": (64, 4, 3), "fp32": (16, 4, 2)}
MAX_DECODE_SEQS = 65535  # the decode grid is (nkv * num_splits, S): CUDA's limit on a grid's second dimension
# No re-specialising: Triton compiles a kernel anew for each pattern of its integer arguments being 1 or a multiple
# of 16, unless told not to. The number of sequences in a step and the width of its block tables change from step
# to step, so without `do_not_specialize` a workload's first steps paid ~0.2 s of compiling each (H200, 2026-12-01:
# 2 s of a 12.6 s benchmark). What is left to compile is warmed up at start: each prefill tile configuration, and
# decode with 1 and 2 splits (other split counts compile when the graph buckets are captured, or at first use).


def _direct(kernel):  # noqa: ANN001, ANN202 - a launch as written (torch.compile's ops pass wrap_triton instead)
    return kernel


def _prefill_config(rows_needed: int, fp32: bool) -> tuple[int, int, int, int]:
    for most, rows, block_n, num_warps, num_stages in PREFILL_CONFIG["fp32" if fp32 else "half"]:
        if most is None or rows_needed <= most:
            return rows, block_n, num_warps, num_stages
    raise AssertionError("PREFILL_CONFIG must end with a catch-all entry")


# ----------------------------------------------------------------------------------------------------------------------
# store_kv


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_off, stride_c_head,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM) & (slot >= 0)  # slot < 0: a padding row, nothing written
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_off + heads * stride_c_head + dims
    k = tl.load(k_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write token i's k/v (N, nkv, D) into slot slot_mapping[i] of the caches; a slot < 0 is skipped."""
    _check_cache(k_cache, v_cache)
    n, nkv, d = _check_rows("k", k, k_cache)
    if v.shape != k.shape:
        raise ValueError(f"store_kv: v has shape {tuple(v.shape)}, expected k's {tuple(k.shape)}")
    _check_index("slot_mapping", slot_mapping, (n,), k.device)
    if n == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        nkv,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(nkv), BLOCK_D=triton.next_power_of_2(d),
        num_warps=4,
    )


@triton.jit
def _store_kv_pool_kernel(
    k_ptr, v_ptr, kv_ptr, slot_mapping_ptr,
    layer, num_layers, stride_layer,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_off, stride_c_head,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # _store_kv_kernel on the whole pool kv (2, layers, ...): layer l's keys start at l * stride_layer, its values at
    # (layers + l) * stride_layer (int64: the pool can pass 2**31 elements).
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM) & (slot >= 0)
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_off + heads * stride_c_head + dims
    k_base = tl.cast(layer, tl.int64) * stride_layer
    v_base = tl.cast(num_layers + layer, tl.int64) * stride_layer
    k = tl.load(k_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    tl.store(kv_ptr + k_base + dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_ptr + v_base + dst, v.to(kv_ptr.dtype.element_ty), mask=mask)


def store_kv_pool(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, layer: int, slot_mapping: torch.Tensor,
                  _wrap=_direct) -> None:
    """store_kv into layer `layer` of the whole pool kv (2, layers, num_blocks, block_size, nkv, D), contiguous.

    The compiled forward's form: the tensor it mutates is the pool itself, not a view of it, so torch.compile
    writes in place (a view of a graph input would risk a copy of the pool)."""
    cache = _check_pool("store_kv_pool", kv, layer)
    n, nkv, d = _check_rows("k", k, cache)
    if v.shape != k.shape:
        raise ValueError(f"store_kv_pool: v has shape {tuple(v.shape)}, expected k's {tuple(k.shape)}")
    _check_index("slot_mapping", slot_mapping, (n,), k.device)
    if n == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _wrap(_store_kv_pool_kernel)[(n,)](
        k, v, kv, slot_mapping,
        layer, kv.shape[1], kv.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        nkv,
        BLOCK_SIZE=cache.shape[1], HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(nkv), BLOCK_D=triton.next_power_of_2(d),
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------------------------------------
# qk_norm_rope_store: the model's QKNormRoPE and store_kv_pool in one pass


@triton.jit
def _rms_norm_rope(src, mask, weight_ptr, dims, in_half, cos, sin, eps, dtype: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Heads (rows) of one token at `src`, each loaded as its two halves (x1, x2): RoPE rotates the pair (x1[i], x2[i]).
    # Numerics as model.py: mean square and rescaling in fp32, rounded to the model dtype, times the weight (rounded
    # again), then the rotation in fp32 with the fp32 tables, rounded once more. Returns the two rotated halves.
    HALF: tl.constexpr = HEAD_DIM // 2
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(weight_ptr + dims, mask=in_half, other=0.0).to(tl.float32)
    w2 = tl.load(weight_ptr + HALF + dims, mask=in_half, other=0.0).to(tl.float32)
    y1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return (y1 * cos - y2 * sin).to(dtype), (y2 * cos + y1 * sin).to(dtype)


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_out_ptr, kv_ptr,
    slot_mapping_ptr,
    layer, num_layers, stride_layer,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_off, stride_c_head, stride_rope,
    num_heads, num_kv_heads, q_eps, k_eps,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
):
    # Grid (tokens, 2): program (t, 0) finishes token t's query heads, (t, 1) its key heads and stores keys and
    # values; two short chains of loads and stores instead of one long one (the H200: 3.6 us at 256 tokens as one).
    HALF: tl.constexpr = HEAD_DIM // 2
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    in_half = dims < HALF
    cos = tl.load(cos_ptr + pos * stride_rope + dims, mask=in_half, other=0.0)  # (1, D/2) fp32
    sin = tl.load(sin_ptr + pos * stride_rope + dims, mask=in_half, other=0.0)
    dtype = q_out_ptr.dtype.element_ty
    part = tl.program_id(1)  # masks, not branches: torch's analysis of which arguments a kernel writes needs no `if`

    heads = tl.arange(0, BLOCK_HQ)[:, None]
    mask = (heads < num_heads) & in_half & (part == 0)
    src = q_ptr + tok * stride_q_tok + heads * stride_q_head + dims
    out1, out2 = _rms_norm_rope(src, mask, q_weight_ptr, dims, in_half, cos, sin, q_eps, dtype, HEAD_DIM)
    dst = q_out_ptr + tok * num_heads * HEAD_DIM + heads * HEAD_DIM + dims  # (N, nh, D), contiguous
    tl.store(dst, out1, mask=mask)
    tl.store(dst + HALF, out2, mask=mask)

    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    heads = tl.arange(0, BLOCK_HKV)[:, None]
    mask = (heads < num_kv_heads) & in_half & (slot >= 0) & (part == 1)  # slot < 0: a padding row, nothing written
    cache = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_off + heads * stride_c_head + dims
    k_dst = kv_ptr + tl.cast(layer, tl.int64) * stride_layer + cache
    v_dst = kv_ptr + tl.cast(num_layers + layer, tl.int64) * stride_layer + cache
    src = v_ptr + tok * stride_v_tok + heads * stride_v_head + dims
    v1 = tl.load(src, mask=mask)
    v2 = tl.load(src + HALF, mask=mask)
    src = k_ptr + tok * stride_k_tok + heads * stride_k_head + dims
    out1, out2 = _rms_norm_rope(src, mask, k_weight_ptr, dims, in_half, cos, sin, k_eps, dtype, HEAD_DIM)
    cache_dtype = kv_ptr.dtype.element_ty
    tl.store(k_dst, out1.to(cache_dtype), mask=mask)
    tl.store(k_dst + HALF, out2.to(cache_dtype), mask=mask)
    tl.store(v_dst, v1.to(cache_dtype), mask=mask)
    tl.store(v_dst + HALF, v2.to(cache_dtype), mask=mask)


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       q_weight: torch.Tensor, k_weight: torch.Tensor, q_eps: float, k_eps: float, cos: torch.Tensor,
                       sin: torch.Tensor, kv: torch.Tensor, layer: int, slot_mapping: torch.Tensor,
                       _wrap=_direct) -> torch.Tensor:  # fmt: skip
    """model.QKNormRoPE and store_kv_pool in one kernel: q (N, nh, D), k, v (N, nkv, D) as projected (any strides
    with a contiguous last dimension: views of the qkv projection), positions (N,) -> q normalised and rotated, (N,
    nh, D) contiguous; k normalised and rotated, and v, written into slot slot_mapping[i] of layer `layer` of the
    pool kv (2, layers, num_blocks, block_size, nkv, D) (< 0: skipped). q_weight, k_weight (D,) and q_eps, k_eps:
    the two RMSNorms; cos, sin (positions, D/2) fp32: the rotary tables (model.RotaryEmbedding)."""
    cache = _check_pool("qk_norm_rope_store", kv, layer)
    n, nh, d = _check_rows("q", q, cache)
    _, nkv, _ = _check_rows("k", k, cache)
    if k.shape != (n, cache.shape[2], d) or v.shape != k.shape:
        raise ValueError(f"qk_norm_rope_store: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"({n}, {cache.shape[2]}, {d}): q's tokens, the pool's KV heads and head size")
    if d % 2:
        raise ValueError(f"qk_norm_rope_store: head size {d} must be even (RoPE rotates pairs)")
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        if weight.shape != (d,) or not weight.is_contiguous():
            raise ValueError(f"qk_norm_rope_store: {name} must be a contiguous ({d},) tensor, got "
                             f"{tuple(weight.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != d // 2 or table.dtype != torch.float32 or table.stride(1) != 1:
            raise ValueError(f"qk_norm_rope_store: {name} must be an fp32 (positions, {d // 2}) table, got "
                             f"{tuple(table.shape)} {table.dtype}")
    if sin.stride() != cos.stride():
        raise ValueError(f"qk_norm_rope_store: sin's strides {sin.stride()} differ from cos's {cos.stride()}")
    if positions.shape != (n,) or positions.device != q.device or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"qk_norm_rope_store: positions must be ({n},) int32 or int64 on {q.device}, got "
                         f"{tuple(positions.shape)} {positions.dtype} on {positions.device}")
    _check_index("slot_mapping", slot_mapping, (n,), q.device)
    q_out = torch.empty((n, nh, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return q_out
    q, k, v, positions = (_last_dim_contiguous(x) for x in (q, k, v, positions))
    _wrap(_qk_norm_rope_store_kernel)[(n, 2)](
        q, k, v, positions, q_weight, k_weight, cos, sin, q_out, kv, slot_mapping,
        layer, kv.shape[1], kv.stride(1),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cos.stride(0),
        nh, nkv, q_eps, k_eps,
        BLOCK_SIZE=cache.shape[1], HEAD_DIM=d, BLOCK_HALF=triton.next_power_of_2(d // 2),
        BLOCK_HQ=triton.next_power_of_2(nh), BLOCK_HKV=triton.next_power_of_2(nkv), num_warps=4,
    )  # fmt: skip
    return q_out


# ----------------------------------------------------------------------------------------------------------------------
# paged_attention: varlen prefill / extend / decode over block tables, causal


@triton.jit(do_not_specialize=["num_seqs", "stride_bt_seq"])  # no re-specialising (above)
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, num_seqs,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_off, stride_c_head, stride_bt_seq,
    BLOCK_SIZE: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)

    # The sequence of this query block: the last s whose first block query_start_loc[s] // BLOCK_Q + s <= q_block.
    lo = 1
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid > q_block:
            hi = mid
        else:
            lo = mid + 1
    seq = lo - 1

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step's queries

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block_local * BLOCK_Q + rows // G_PAD  # query index within the sequence
    g = rows % G_PAD
    head = (kv_head * G + g).to(tl.int64)
    row_valid = (q_idx < q_len) & (g < G)
    q_pos = context_len + q_idx
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM

    q_tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys 0 .. kv_end - 1: up to the last query of this block (causal), never past the sequence.
    kv_end = tl.minimum(seq_len, context_len + (q_block_local + 1) * BLOCK_Q)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for start_n in range(0, kv_end, BLOCK_N):
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k_valid = k_pos < kv_end
        block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        kv_off = block * stride_c_block + (k_pos % BLOCK_SIZE) * stride_c_off + kv_head * stride_c_head
        k = tl.load(k_cache_ptr + kv_off[None, :] + dims[:, None],
                    mask=k_valid[None, :] & d_valid[:, None], other=0.0).to(q.dtype)  # (BLOCK_D, BLOCK_N); fp8 widened
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * tl.cast(qk_scale, tl.float32)  # fp64 under inductor
        visible = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :],
                    mask=k_valid[:, None] & d_valid[None, :], other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, _wrap=_direct) -> torch.Tensor:
    """Causal attention of the packed queries q (N, nh, D) over each sequence's cached keys; returns (N, nh, D).

    Sequence s owns q[query_start_loc[s]:query_start_loc[s+1]]; seq_lens[s] counts its cached tokens including
    this step's, so query j of s sits at position seq_lens[s] - query_len_s + j and sees keys 0..that position.
    max_seq_len is not needed by the kernel (accepted for the shared signature); max_query_len picks the tile.
    """
    _check_cache(k_cache, v_cache)
    n, nh, d = _check_rows("q", q, k_cache)
    nkv = k_cache.shape[2]
    if nh % nkv:
        raise ValueError(f"paged_attention: {nh} query heads is not a multiple of {nkv} KV heads")
    s = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _check_index("seq_lens", seq_lens, (s,), q.device)
    _check_index("query_start_loc", query_start_loc, (s + 1,), q.device)
    _check_index("block_tables", block_tables, (s, block_tables.shape[-1]), q.device)
    out = torch.empty(n, nh, d, dtype=q.dtype, device=q.device)
    if n == 0 or s == 0:
        return out
    q = _last_dim_contiguous(q)
    g = nh // nkv
    g_pad = triton.next_power_of_2(g)
    fp32 = q.dtype == torch.float32
    rows, block_n, num_warps, num_stages = _prefill_config(max_query_len * g_pad, fp32)
    rows = max(rows, g_pad)
    block_q = rows // g_pad
    grid = (n // block_q + s, nkv)
    _wrap(_paged_prefill_kernel)[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, s,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1], G=g, HEAD_DIM=d, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d), INPUT_PRECISION="ieee" if fp32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# paged_decode_attention: one query per sequence, split over the context (flash-decoding)


@triton.jit(do_not_specialize=["num_splits", "stride_bt_seq"])
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    block_tables_ptr, seq_lens_ptr,
    qk_scale, num_splits,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head,
    stride_c_block, stride_c_off, stride_c_head, stride_bt_seq,
    BLOCK_SIZE: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DIRECT: tl.constexpr,
):
    # grid (nkv * num_splits, S): all programs of one sequence side by side (the module docstring)
    num_kv_heads = tl.num_programs(0) // num_splits
    kv_head = tl.program_id(0) % num_kv_heads
    split = tl.program_id(0) // num_kv_heads
    seq = tl.program_id(1).to(tl.int64)
    num_heads = num_kv_heads * G

    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)  # start >= end: an empty split

    g = tl.arange(0, BLOCK_G)
    head = (kv_head * G + g).to(tl.int64)
    g_valid = g < G
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_seq + head[:, None] * stride_q_head + dims[None, :],
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

    m_i = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    block_table = block_tables_ptr + seq * stride_bt_seq
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k_valid = k_pos < end
        block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        kv_off = block * stride_c_block + (k_pos % BLOCK_SIZE) * stride_c_off + kv_head * stride_c_head
        k = tl.load(k_cache_ptr + kv_off[None, :] + dims[:, None],
                    mask=k_valid[None, :] & d_valid[:, None], other=0.0).to(q.dtype)  # (BLOCK_D, BLOCK_N); fp8 widened
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * tl.cast(qk_scale, tl.float32)  # fp64 under inductor
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :],
                    mask=k_valid[:, None] & d_valid[None, :], other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty split (or seq_len 0) leaves zeros
    if DIRECT:
        tl.store(out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=g_valid[:, None] & d_valid[None, :])
    else:
        # Partials laid out (S, nh, num_splits, D) and (S, nh, num_splits); lse in base 2.
        row = (seq * num_heads + head) * num_splits + split
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=g_valid[:, None] & d_valid[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=g_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    num_splits, stride_o_seq, stride_o_head,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, BLOCK_S)
    s_valid = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    lse = tl.load(mid_lse_ptr + row * num_splits + splits, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # all splits empty (seq_len 0): all weights 0
    part = tl.load(mid_o_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                   mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=d_valid)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_splits: int, _wrap=_direct) -> torch.Tensor:
    """One query per sequence (q (S, nh, D), at position seq_lens[s] - 1) over its cached keys; returns (S, nh, D).

    CUDA-graph capturable: the launch depends on shapes and num_splits only. Rows with seq_lens[s] == 0 give zeros.
    """
    _check_cache(k_cache, v_cache)
    s, nh, d = _check_rows("q", q, k_cache)
    nkv = k_cache.shape[2]
    if nh % nkv:
        raise ValueError(f"paged_decode_attention: {nh} query heads is not a multiple of {nkv} KV heads")
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"paged_decode_attention: num_splits={num_splits!r} must be an int >= 1")
    if s > MAX_DECODE_SEQS:
        raise ValueError(f"paged_decode_attention: {s} sequences in one call, more than the {MAX_DECODE_SEQS} a launch "
                         "grid's second dimension holds")  # fmt: skip
    _check_index("seq_lens", seq_lens, (s,), q.device)
    _check_index("block_tables", block_tables, (s, block_tables.shape[-1]), q.device)
    out = torch.empty(s, nh, d, dtype=q.dtype, device=q.device)
    if s == 0:
        return out
    q = _last_dim_contiguous(q)
    g = nh // nkv
    fp32 = q.dtype == torch.float32
    direct = num_splits == 1
    if direct:
        mid_o = mid_lse = out  # unused
    else:
        mid_o = torch.empty(s, nh, num_splits, d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(s, nh, num_splits, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    block_n, num_warps, num_stages = DECODE_CONFIG["fp32" if fp32 else "half"]
    _wrap(_paged_decode_split_kernel)[(nkv * num_splits, s)](
        q, k_cache, v_cache, out, mid_o, mid_lse, block_tables, seq_lens,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1], G=g, HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n,
        BLOCK_D=block_d, INPUT_PRECISION="ieee" if fp32 else "tf32", DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        _wrap(_paged_decode_reduce_kernel)[(s, nh)](
            mid_o, mid_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def warm_up(k_cache: torch.Tensor, v_cache: torch.Tensor, group: int, dtype: torch.dtype) -> None:
    """Compile every tile configuration of the prefill kernel and both decode variants before the first request
    (each is a JIT compile of ~0.2 s the first step that needs it would wait for). `group`: query heads per KV
    head; `dtype`: the queries'. Reads block 0 (every block-table entry is 0), writes nothing to the cache."""
    device = k_cache.device
    d, num_heads = k_cache.shape[-1], group * k_cache.shape[2]
    g_pad = triton.next_power_of_2(group)
    lengths, previous = [], 0
    for most, *_ in PREFILL_CONFIG["fp32" if dtype == torch.float32 else "half"]:
        lengths.append(max(1, (most if most is not None else 2 * previous) // g_pad))
        previous = most or previous
    for n in lengths:  # one query length per tile configuration, two sequences of it
        table = torch.zeros(2, triton.cdiv(n, k_cache.shape[1]), dtype=torch.int32, device=device)
        q = torch.zeros(2 * n, num_heads, d, dtype=dtype, device=device)
        seq_lens = torch.full((2,), n, dtype=torch.int32, device=device)
        starts = torch.tensor([0, n, 2 * n], dtype=torch.int32, device=device)
        paged_attention(q, k_cache, v_cache, table, seq_lens, starts, 1.0, n, n)
    q = torch.zeros(2, num_heads, d, dtype=dtype, device=device)
    table = torch.zeros(2, 1, dtype=torch.int32, device=device)
    for splits in (1, 2):
        paged_decode_attention(q, k_cache, v_cache, table, torch.ones(2, dtype=torch.int32, device=device), 1.0,
                               splits)  # fmt: skip


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132) -> int:
    """A split count for paged_decode_attention: about four waves of programs, each split >= 256 keys, at most 64.
    With 8 KV heads on 132 SMs: 1 split from 80 sequences, 2 at 32-64, 4 at 16 (the H200's best at 96+, 64 and 16
    sequences of U(200, 2000) keys; at 32, 4 splits were 7% faster than 2: RESULTS.md, 2026-12-02).

    Depends only on its (static) arguments, so a CUDA graph bucket can fix it at capture (pass max_model_len).
    """
    programs = max(1, num_seqs * num_kv_heads)
    splits = max(1, min(triton.cdiv(4 * num_sms, programs), triton.cdiv(max(max_seq_len, 1), 256), 64))
    return 1 << (splits.bit_length() - 1)  # rounded down to a power of two


# ----------------------------------------------------------------------------------------------------------------------
# argument checks (host side only: shapes, dtypes, devices; never a device sync, so CUDA-graph safe)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}, expected (num_blocks, block_size, nkv, D)")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache (shape {tuple(v_cache.shape)}, strides {v_cache.stride()}, {v_cache.dtype}) must "
                         f"match k_cache (shape {tuple(k_cache.shape)}, strides {k_cache.stride()}, {k_cache.dtype})")
    if k_cache.stride(3) != 1:
        raise ValueError(f"k_cache's last dimension must be contiguous, got strides {k_cache.stride()}")


def _check_pool(op: str, kv: torch.Tensor, layer: int) -> torch.Tensor:
    """The whole pool kv (2, layers, blocks, block_size, nkv, D), contiguous, and a layer in it -> its key cache."""
    if kv.dim() != 6 or not kv.is_contiguous():
        raise ValueError(f"{op}: kv must be a contiguous (2, layers, blocks, block_size, nkv, D) pool, got "
                         f"shape {tuple(kv.shape)}, strides {kv.stride()}")
    if not 0 <= layer < kv.shape[1]:
        raise ValueError(f"{op}: layer {layer} is not in 0..{kv.shape[1] - 1}")
    return kv[0, layer]


def _check_rows(name: str, x: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 3 or x.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (rows, heads, {k_cache.shape[3]})")
    if x.device != k_cache.device:
        raise ValueError(f"{name} is on {x.device} but the KV cache is on {k_cache.device}")
    return x.shape[0], x.shape[1], x.shape[2]


def _check_index(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if x.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    if x.dim() == 1 and x.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")
    if x.dim() == 2 and x.stride(1) != 1:
        raise ValueError(f"{name}'s rows must be contiguous, got strides {x.stride()}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
