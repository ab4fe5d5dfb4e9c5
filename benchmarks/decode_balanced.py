"""A candidate decode kernel for batches whose contexts differ, timed against the engine's: work in equal chunks.

The engine's paged decode kernel (qwen3/engine/triton_kernels.py) gives each (sequence, KV head) `num_splits`
programs, each a 1/num_splits share of that sequence's keys. When the contexts of one batch differ by 10x, as in
nano-vllm's benchmark, the programs differ by 10x too, and the long ones can set the end of the launch. On the H200
giving 48-256 sequences one split instead of two lost 2% of the throughput run although a sweep of equal lengths had
it 4-6% faster (benchmarks/NOTES.md, sixth session). Here every work item is CHUNK keys of one (sequence, KV head),
and a fixed grid of programs walks the list of items (a persistent kernel): each program reads the batch's lengths,
takes their prefix sum in registers, and maps item w to its sequence by comparing with it, so no launch depends on
the lengths and a CUDA graph could replay it. Items of the same chunk for the 8 KV heads are neighbours in the list,
so programs running together read neighbouring bytes of the same blocks. Each item writes its partial output and
log-sum-exp; a second kernel combines each (sequence, head)'s partials.

    python benchmarks/decode_balanced.py             # CUDA: check against the reference, then GB/s beside the engine's
    TRITON_INTERPRET=1 python benchmarks/decode_balanced.py --check   # CPU: the correctness check only, small shapes

Not used by the engine: a measurement first (the tables print the engine's kernel, rows as given and longest first,
beside this one for a few chunk sizes and program counts).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import (  # noqa: E402  (benchmarks/kernels.py: the pool, the reference, the engine's kernels by path)
    BF16_TOLERANCE,
    KV_BYTES_PER_TOKEN,
    NUM_KV_HEADS,
    SCALE,
    bench,
    engine_decode_gbs,
    load_kernels,
    mixed_batch,
    reference_mixed,
    rel_err,
)

LOG2E = 1.4426950408889634


@triton.jit
def _chunked_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, mid_o_ptr, mid_lse_ptr, block_tables_ptr, seq_lens_ptr,
    qk_scale, num_seqs, max_chunks,
    stride_q_seq, stride_q_head, stride_c_block, stride_c_off, stride_c_head, stride_bt_seq,
    NKV: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SIZE: tl.constexpr, G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    s_idx = tl.arange(0, BLOCK_S)
    lens = tl.load(seq_lens_ptr + s_idx, mask=s_idx < num_seqs, other=0)
    chunks = (lens + CHUNK - 1) // CHUNK
    ends = tl.cumsum(chunks, 0)  # items of sequences 0..s, per KV head
    total = tl.sum(chunks, 0) * NKV
    g = tl.arange(0, BLOCK_G)
    g_valid = g < G
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    for w in range(tl.program_id(0), total, tl.num_programs(0)):
        c = w // NKV  # the batch's c-th chunk (sequences in order), for KV head w % NKV
        kv_head = w % NKV
        seq = tl.sum((ends <= c).to(tl.int32), 0)
        first = tl.sum(tl.where(s_idx == seq, ends - chunks, 0), 0)
        seq_len = tl.sum(tl.where(s_idx == seq, lens, 0), 0)
        chunk = c - first
        start = chunk * CHUNK
        end = tl.minimum(seq_len, start + CHUNK)
        seq64 = seq.to(tl.int64)
        head = (kv_head * G + g).to(tl.int64)
        q = tl.load(q_ptr + seq64 * stride_q_seq + head[:, None] * stride_q_head + dims[None, :],
                    mask=g_valid[:, None] & d_valid[None, :], other=0.0)  # fmt: skip
        m_i = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        block_table = block_tables_ptr + seq64 * stride_bt_seq
        for start_n in range(start, end, BLOCK_N):
            k_pos = start_n + tl.arange(0, BLOCK_N)
            k_valid = k_pos < end
            block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
            kv_off = block * stride_c_block + (k_pos % BLOCK_SIZE) * stride_c_off + kv_head * stride_c_head
            k = tl.load(k_cache_ptr + kv_off[None, :] + dims[:, None], mask=k_valid[None, :] & d_valid[:, None],
                        other=0.0).to(q.dtype)  # fmt: skip
            s = tl.dot(q, k) * qk_scale
            s = tl.where(k_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=k_valid[:, None] & d_valid[None, :],
                        other=0.0).to(q.dtype)  # fmt: skip
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        row = (seq64 * (NKV * G) + head) * max_chunks + chunk
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=g_valid[:, None] & d_valid[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=g_valid)


@triton.jit
def _chunked_reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, seq_lens_ptr, max_chunks, stride_o_seq, stride_o_head,
                           CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_D: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    n = (tl.load(seq_lens_ptr + seq) + CHUNK - 1) // CHUNK  # this sequence's chunks: the rest were not written
    c = tl.arange(0, BLOCK_C)
    c_valid = c < n
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    lse = tl.load(mid_lse_ptr + row * max_chunks + c, mask=c_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    part = tl.load(mid_o_ptr + (row * max_chunks + c)[:, None] * HEAD_DIM + dims[None, :],
                   mask=c_valid[:, None] & d_valid[None, :], other=0.0)  # fmt: skip
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=d_valid)


def chunked_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, chunk=256,
                             programs=None, block_n=64, num_warps=4, num_stages=3):  # fmt: skip
    """One query per sequence, as the engine's paged_decode_attention, in chunks of `chunk` keys walked by
    `programs` programs (default: 4 per SM). max_seq_len bounds every context (sizes the partials, as the engine's
    max_model_len would)."""
    S, nh, d = q.shape
    nkv = k_cache.shape[2]
    max_chunks = triton.cdiv(max_seq_len, chunk)
    mid_o = torch.empty(S, nh, max_chunks, d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(S, nh, max_chunks, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if programs is None:
        programs = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2)
    g = nh // nkv
    _chunked_decode_kernel[(programs,)](
        q, k_cache, v_cache, mid_o, mid_lse, block_tables, seq_lens, scale * LOG2E, S, max_chunks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NKV=nkv, CHUNK=chunk, BLOCK_S=max(16, triton.next_power_of_2(S)), BLOCK_SIZE=k_cache.shape[1], G=g,
        HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    _chunked_reduce_kernel[(S, nh)](
        mid_o, mid_lse, out, seq_lens, max_chunks, out.stride(0), out.stride(1), CHUNK=chunk, HEAD_DIM=d,
        BLOCK_C=max(2, triton.next_power_of_2(max_chunks)), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )  # fmt: skip
    return out


def check(device: str, dtype: torch.dtype, shapes: list[tuple[int, int, int]]) -> bool:
    """The candidate against the per-sequence reference (a padding row of length 0 included), chunk sizes 64/256."""
    ok = True
    for batch, lo, hi in shapes:
        pool, q = mixed_batch(batch, lo, hi, dtype, device, seed=batch)
        pool.seq_lens[batch // 2] = 0  # a padding row: zeros
        ref = reference_mixed(q, pool)
        for chunk in (64, 256):
            out = chunked_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens, SCALE,
                                           hi, chunk=chunk, programs=7)  # fmt: skip
            err = rel_err(out, ref)
            zero = bool((out[batch // 2].float() == 0).all())
            print(f"check batch {batch} U({lo}, {hi}) chunk {chunk}: rel err {err:.1e}, padding row zero {zero}")
            ok &= err < BF16_TOLERANCE and zero
    return ok


def compare(tk) -> str:
    """GB/s of the engine's kernel (heuristic split count, rows as given and longest first) and the candidate."""
    lines = ["| batch, contexts | engine kernel (splits), rows as given | longest first | chunked: "
             "chunk 256 x 4/SM | 256 x 8/SM | 512 x 4/SM | 128 x 8/SM |", "|---|---|---|---|---|---|---|"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, lo, hi in ((256, 200, 2000), (128, 200, 2000), (64, 200, 2000), (32, 200, 2000), (16, 200, 2000),
                          (1, 2000, 2000), (256, 800, 800)):  # fmt: skip
        pool, q = mixed_batch(batch, lo, hi, torch.bfloat16, "cuda", seed=batch)
        ref = reference_mixed(q, pool)
        nbytes = int(pool.seq_lens.sum()) * KV_BYTES_PER_TOKEN
        splits = tk.decode_num_splits(batch, NUM_KV_HEADS, 4096)  # as a graph bucket (max_model_len 4096)
        order = torch.argsort(pool.seq_lens, descending=True)
        cells = [f"{engine_decode_gbs(tk, pool, q, ref, rows, splits)} ({splits})"
                 for rows in (torch.arange(batch, device="cuda"), order)]  # fmt: skip
        for chunk, per_sm in ((256, 4), (256, 8), (512, 4), (128, 8)):
            def candidate(chunk=chunk, per_sm=per_sm, q=q, pool=pool):
                return chunked_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens,
                                                SCALE, 4096, chunk=chunk, programs=per_sm * sms)  # fmt: skip

            bad = "" if rel_err(candidate(), ref) < BF16_TOLERANCE else " WRONG"
            cells.append(f"{nbytes / bench(candidate, True) / 1e6:5.0f}{bad}")
        lines.append(f"| {batch}, U({lo}, {hi}) | " + " | ".join(cells) + " |")
        print("  " + lines[-1], flush=True)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only the correctness check (small shapes)")
    args = p.parse_args()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cpu" if interpreted or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not interpreted:
        p.error("needs CUDA, or TRITON_INTERPRET=1 for --check on the CPU")
    if interpreted:  # Triton 3.6's interpreter with NumPy 2: the tests' fix for loop bounds read from memory
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import fix_triton_interpreter_scalars

        fix_triton_interpreter_scalars()
    small = [(3, 1, 40), (5, 20, 300), (9, 100, 130)]
    if not check(device, torch.float32 if device == "cpu" else torch.bfloat16,
                 small if args.check or device == "cpu" else small + [(64, 200, 2000)]):  # fmt: skip
        print("FAILED: the chunked kernel does not match the reference")
        return 1
    if args.check or device == "cpu":
        return 0
    print("\nGB/s (K and V bytes of the batch over the median time):\n" + compare(load_kernels()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
