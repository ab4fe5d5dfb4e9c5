"""The engine's Triton paged-attention kernels against the reference path (gather through the block tables + SDPA).

Qwen3-0.6B's attention shapes (16 query heads, 8 KV heads, head dim 128, bf16) in a paged pool with shuffled block
tables. Each kernel's output is first checked against an fp32 computation (||out - ref|| / ||ref||, bf16 must stay
under 1e-2), including a CUDA-graph replay of the decode kernel with new seq_lens; then kernel and reference are timed
with triton.testing.do_bench (median; it flushes the L2 cache between runs). GB/s is the bytes each kernel must move
(every K/V byte of the context read once, q read, out written) over its time; the H200's device-to-device copy
reaches about 4.3 TB/s. The reference's time includes its gather, as in the engine's reference path. Last, a sweep
times alternative launch configurations (tile size, warps, pipeline stages) of the decode and prefill kernels, so
that one GPU run can confirm or correct the defaults chosen by reasoning; it starts no new configuration once the
run nears --budget seconds.

    python benchmarks/kernels.py                   # on a CUDA GPU: < 2 minutes on an H200 (--budget)
    python benchmarks/kernels.py --quick           # fewer shapes, shorter timing, no sweep
    python benchmarks/kernels.py --results benchmarks/RESULTS.md   # also append the tables there
    python benchmarks/kernels.py --decode-splits   # only the decode kernel: GB/s by split count, contexts that
                                                   # differ (rows random / longest first), then batch x config
    python benchmarks/kernels.py --compile-only    # no GPU needed: compile every kernel variant for sm_90 with
                                                   # triton's bundled ptxas; print registers, spills, shared memory
Exits with status 1 when a correctness check fails (after printing the whole table).
"""

import argparse
import datetime
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS_PATH = Path(__file__).resolve().parents[1] / "src" / "qwen3" / "engine" / "triton_kernels.py"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
BF16_TOLERANCE = 1e-2


def load_kernels():
    """The kernels module by path: needs triton, not the rest of the engine."""
    spec = importlib.util.spec_from_file_location("qwen3_engine_triton_kernels", KERNELS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# inputs and the reference path


class Pool:
    """A random paged pool holding `num_seqs` sequences of `seq_len` tokens, blocks shuffled over the pool."""

    def __init__(self, num_seqs: int, seq_len: int, block_size: int, dtype: torch.dtype, device: str):
        blocks_per_seq = math.ceil(seq_len / block_size)
        num_blocks = num_seqs * blocks_per_seq + 1
        shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=dtype, device=device)
        self.v_cache = torch.randn(shape, dtype=dtype, device=device)
        perm = torch.randperm(num_blocks, device=device)[: num_seqs * blocks_per_seq]
        self.block_tables = perm.view(num_seqs, blocks_per_seq).to(torch.int32)
        self.seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
        self.block_size, self.seq_len = block_size, seq_len

    def gather(self, dtype=None):
        """Dense (S, nkv, L, D) keys and values, gathered through the block tables."""
        pos = torch.arange(self.seq_len, device=self.k_cache.device)
        blocks = self.block_tables[:, pos // self.block_size].long()  # (S, L)
        k = self.k_cache[blocks, pos % self.block_size].transpose(1, 2)
        v = self.v_cache[blocks, pos % self.block_size].transpose(1, 2)
        return (k, v) if dtype is None else (k.to(dtype), v.to(dtype))


def reference_attention(q: torch.Tensor, pool: Pool, query_len: int, dtype=None) -> torch.Tensor:
    """Gather + SDPA: q (S * query_len, nh, D), the last query_len tokens of each sequence; causal."""
    num_seqs = pool.block_tables.shape[0]
    k, v = pool.gather(dtype)
    q = q.view(num_seqs, query_len, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    q = q if dtype is None else q.to(dtype)
    context = pool.seq_len - query_len
    if query_len == 1 or context == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=query_len > 1, enable_gqa=True)
    else:
        q_pos = context + torch.arange(query_len, device=q.device)
        mask = torch.arange(pool.seq_len, device=q.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(num_seqs * query_len, NUM_HEADS, HEAD_DIM)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ----------------------------------------------------------------------------------------------------------------------
# the GPU run


DEVICE = "cuda"
DTYPE = torch.bfloat16


def bench(fn, quick: bool) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def shapes(quick: bool) -> dict:
    """decode: (batch, context); prefill: (sequences, new tokens, cached tokens); store_kv: token counts."""
    if quick:
        return {"decode": [(1, 4096), (64, 2048), (256, 4096)], "prefill": [(256, 512, 0)], "store_kv": [256, 131072],
                "graph": (64, 2048, 4096)}
    return {"decode": [(b, c) for b in (1, 64, 256) for c in (512, 2048, 4096)],
            "prefill": [(256, 512, 0), (64, 512, 1536)], "store_kv": [256, 131072], "graph": (64, 2048, 4096)}


class Results:
    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, name, err, ms, ref_ms, nbytes, flops=None, tolerance=BF16_TOLERANCE):
        ok = err < tolerance
        if not ok:
            self.failures.append(name)
        self.rows.append((name, err, ok, ms, ref_ms, nbytes / ms / 1e6, None if flops is None else flops / ms / 1e9))
        print(f"  {name}: rel err {err:.1e}, {ms:.3f} ms (reference {ref_ms:.3f} ms)", flush=True)

    def table(self) -> str:
        lines = [f"| {'kernel':<52} | rel err | check | Triton ms | reference ms | speedup | GB/s  | TFLOP/s |",
                 f"|{'-' * 54}|---------|-------|-----------|--------------|---------|-------|---------|"]
        for label, err, ok, ms, ref_ms, gbs, tflops in self.rows:
            tf = f"{tflops:7.1f}" if tflops is not None else " " * 7
            lines.append(f"| {label:<52} | {err:7.1e} | {'ok' if ok else 'FAIL':<5} | {ms:9.3f} | {ref_ms:12.3f} | "
                         f"{ref_ms / ms:6.1f}x | {gbs:5.0f} | {tf} |")
        return "\n".join(lines)


KV_BYTES_PER_TOKEN = 2 * NUM_KV_HEADS * HEAD_DIM * 2  # K and V, bf16
Q_BYTES_PER_TOKEN = NUM_HEADS * HEAD_DIM * 2
SCALE = HEAD_DIM ** -0.5


def time_decode(tk, results: Results, block_size: int, batch: int, context: int, quick: bool) -> None:
    pool = Pool(batch, context, block_size, DTYPE, DEVICE)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    splits = tk.decode_num_splits(batch, NUM_KV_HEADS, context)

    def kernel():
        return tk.paged_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens, SCALE,
                                         splits)

    err = rel_err(kernel(), reference_attention(q, pool, 1, torch.float32))
    ms = bench(kernel, quick)
    ref_ms = bench(lambda: reference_attention(q, pool, 1), quick)
    nbytes = batch * context * KV_BYTES_PER_TOKEN + 2 * batch * Q_BYTES_PER_TOKEN
    results.add(f"decode  bs {block_size:3d}  batch {batch:3d} x ctx {context:4d}  splits {splits:2d}", err, ms, ref_ms,
                nbytes)


def time_prefill(tk, results: Results, block_size: int, batch: int, new: int, cached: int, quick: bool) -> None:
    pool = Pool(batch, cached + new, block_size, DTYPE, DEVICE)
    n = batch * new
    q = torch.randn(n, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    starts = torch.arange(0, n + 1, new, dtype=torch.int32, device=DEVICE)

    def kernel():
        return tk.paged_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens, starts, SCALE, new,
                                  pool.seq_len)

    err = rel_err(kernel(), reference_attention(q, pool, new, torch.float32))
    ms = bench(kernel, quick)
    ref_ms = bench(lambda: reference_attention(q, pool, new), quick)
    nbytes = batch * (cached + new) * KV_BYTES_PER_TOKEN + 2 * n * Q_BYTES_PER_TOKEN
    pairs = batch * (new * cached + new * (new + 1) / 2)  # visible (query, key) pairs
    flops = 4 * NUM_HEADS * HEAD_DIM * pairs  # q.k and p.v: 2 flops per multiply-add each
    results.add(f"prefill bs {block_size:3d}  {batch:3d} seqs x {new} new + {cached:4d} cached", err, ms, ref_ms,
                nbytes, flops)


def time_store_kv(tk, results: Results, n: int, quick: bool) -> None:
    num_slots = (n // 16 + 2) * 16
    k_cache = torch.randn(num_slots // 16, 16, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    kv = torch.randn(n, 2, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as the engine passes them
    slots = torch.randperm(num_slots, device=DEVICE)[:n].to(torch.int32)
    tk.store_kv(k, v, k_cache, v_cache, slots)
    flat = (-1, NUM_KV_HEADS, HEAD_DIM)
    ok = torch.equal(k_cache.view(flat)[slots.long()], k) and torch.equal(v_cache.view(flat)[slots.long()], v)

    def reference():
        k_cache.view(flat).index_copy_(0, slots.long(), k)
        v_cache.view(flat).index_copy_(0, slots.long(), v)

    ms = bench(lambda: tk.store_kv(k, v, k_cache, v_cache, slots), quick)
    ref_ms = bench(reference, quick)
    results.add(f"store_kv {n:6d} tokens", 0.0 if ok else float("inf"), ms, ref_ms, 2 * n * KV_BYTES_PER_TOKEN)


def check_cuda_graph(tk, block_size: int, batch: int, context: int, max_model_len: int) -> bool:
    """Capture the decode kernel once, replay it with new seq_lens written into the same tensor, compare to eager."""
    pool = Pool(batch, context, block_size, DTYPE, DEVICE)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    splits = tk.decode_num_splits(batch, NUM_KV_HEADS, max_model_len)

    def call():
        return tk.paged_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens, SCALE,
                                         splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = call()
    new_lens = torch.randint(0, context + 1, (batch,), dtype=torch.int32, device=DEVICE)
    new_lens[:3] = torch.tensor([0, 1, context])
    pool.seq_lens.copy_(new_lens)
    graph.replay()
    torch.cuda.synchronize()
    ok = torch.equal(graph_out, call()) and torch.equal(graph_out[0], torch.zeros_like(graph_out[0]))
    print(f"  decode in a CUDA graph (batch {batch}, {splits} splits), replayed with new seq_lens: "
          f"{'same as eager' if ok else 'FAIL: differs from eager'}", flush=True)
    return ok


# Launch configurations tried by the sweep (the first of each is the shipped default in triton_kernels.py).
DECODE_SWEEP = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (16, 4, 3), (128, 8, 3), (64, 4, 5)]  # BLOCK_N, warps, stages
PREFILL_SWEEP = [(128, 64, 8, 3), (128, 64, 8, 5), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]  # + rows first
SWEEP_DECODE_SHAPES = [(256, 2048), (64, 4096), (1, 4096)]  # (batch, context)
SWEEP_PREFILL_SHAPE = (256, 512)  # (sequences, tokens each)


def sweep(tk, block_size: int, quick: bool, deadline: float) -> str:
    """Time alternative launch configurations of the decode and prefill kernels (each checked for correctness)."""
    decode_cases = []
    for batch, context in SWEEP_DECODE_SHAPES:
        pool = Pool(batch, context, block_size, DTYPE, DEVICE)
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        ref = reference_attention(q, pool, 1, torch.float32)
        decode_cases.append((f"decode {batch} x {context}", pool, q, tk.decode_num_splits(batch, NUM_KV_HEADS, context),
                             ref, batch * context * KV_BYTES_PER_TOKEN))
    num_seqs, new = SWEEP_PREFILL_SHAPE
    pool = Pool(num_seqs, new, block_size, DTYPE, DEVICE)
    q = torch.randn(num_seqs * new, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    starts = torch.arange(0, num_seqs * new + 1, new, dtype=torch.int32, device=DEVICE)
    prefill_ref = reference_attention(q, pool, new, torch.float32)
    prefill_flops = 4 * NUM_HEADS * HEAD_DIM * num_seqs * new * (new + 1) / 2

    lines = [f"| {'config':<34} | " + " | ".join(f"{c[0]:<24}" for c in decode_cases) + " |",
             f"|{'-' * 36}|" + "|".join("-" * 26 for _ in decode_cases) + "|"]
    default_decode, default_prefill = tk.DECODE_CONFIG["half"], list(tk.PREFILL_CONFIG["half"])
    for config in DECODE_SWEEP:
        label = f"decode BLOCK_N {config[0]} warps {config[1]} stages {config[2]}"
        if time.perf_counter() > deadline:
            lines.append(f"| {label:<34} | skipped: out of time budget")
            continue
        tk.DECODE_CONFIG["half"] = config
        cells = []
        try:
            for _, pool_, q_, splits, ref, nbytes in decode_cases:
                def fn(pool_=pool_, q_=q_, splits=splits):
                    return tk.paged_decode_attention(q_, pool_.k_cache, pool_.v_cache, pool_.block_tables,
                                                     pool_.seq_lens, SCALE, splits)
                bad = "" if rel_err(fn(), ref) < BF16_TOLERANCE else " WRONG"
                ms = bench(fn, quick)
                cells.append(f"{ms:.4f} ms {nbytes / ms / 1e6:5.0f} GB/s{bad}")
        except Exception as e:  # a configuration that does not compile or launch: report it, keep going
            cells.append(f"failed: {type(e).__name__}: {str(e)[:60]}")
        finally:
            tk.DECODE_CONFIG["half"] = default_decode
        lines.append(f"| {label:<34} | " + " | ".join(f"{c:<24}" for c in cells) + " |")
        print(f"  sweep: {lines[-1]}", flush=True)
    title = f"prefill {num_seqs} x {new}"
    lines += ["", f"| {'config':<44} | {title:<24} |", f"|{'-' * 46}|--------------------------|"]
    for config in PREFILL_SWEEP:
        label = f"prefill rows {config[0]} BLOCK_N {config[1]} warps {config[2]} stages {config[3]}"
        if time.perf_counter() > deadline:
            lines.append(f"| {label:<44} | skipped: out of time budget")
            continue
        tk.PREFILL_CONFIG["half"] = [(None, *config)]
        try:
            def fn():
                return tk.paged_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens, starts,
                                          SCALE, new, new)
            bad = "" if rel_err(fn(), prefill_ref) < BF16_TOLERANCE else " WRONG"
            ms = bench(fn, quick)
            cell = f"{ms:.3f} ms {prefill_flops / ms / 1e9:4.0f} TFLOP/s{bad}"
        except Exception as e:
            cell = f"failed: {type(e).__name__}: {str(e)[:60]}"
        finally:
            tk.PREFILL_CONFIG["half"] = default_prefill
        lines.append(f"| {label:<44} | {cell:<24} |")
        print(f"  sweep: {lines[-1]}", flush=True)
    return "\n".join(lines)


# --decode-splits: the split count against the batch size at the contexts of nano-vllm's benchmark, per launch config
SPLITS_SHAPES = [(256, 800), (128, 1200), (64, 1500), (32, 1800), (16, 2000), (4, 2000), (1, 2000)]
SPLITS_CONFIGS = [(64, 4, 3), (32, 4, 3), (64, 4, 2), (32, 2, 3), (64, 8, 3), (128, 8, 2), (16, 2, 3)]


MIXED_BATCHES = [256, 192, 128, 96, 64, 32, 16]  # contexts U(200, 2000) each: nano-vllm's benchmark mid-run


def reference_mixed(q: torch.Tensor, pool: Pool) -> torch.Tensor:
    """reference_attention for one query per sequence when the sequences' lengths differ (pool.seq_lens)."""
    k, v = pool.gather(torch.float32)
    outs = []
    for s, length in enumerate(pool.seq_lens.tolist()):
        qs = q[s].float().view(1, NUM_HEADS, 1, HEAD_DIM)
        outs.append(F.scaled_dot_product_attention(qs, k[s : s + 1, :, :length], v[s : s + 1, :, :length],
                                                   enable_gqa=True))  # fmt: skip
    return torch.cat(outs).view(-1, NUM_HEADS, HEAD_DIM)


def mixed_batch(batch: int, lo: int, hi: int, dtype: torch.dtype, device: str, seed: int
                ) -> tuple[Pool, torch.Tensor]:  # fmt: skip
    """A pool of `batch` sequences of U(lo, hi) tokens each (pool.seq_lens) and one query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=gen)
    pool = Pool(batch, int(lengths.max()), 16, dtype, device)
    pool.seq_lens = lengths.to(torch.int32).to(device)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype).to(device)
    return pool, q


LAYERS = 28  # one decode step's calls per CUDA graph


def graph_seconds(calls: list, replays: int = 20) -> float:
    """Seconds per call of `calls` (zero-argument functions) captured in one CUDA graph, as the engine replays them
    (also decode.py's GEMV timings)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:  # warm-up: compile, cuBLAS handles
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * len(calls))


def engine_decode_gbs(tk, pool: Pool, q: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, splits: int) -> str:
    """The engine's paged_decode_attention on the batch's rows in the order `rows`, checked against `ref` (the
    reference in the pool's order): a table cell of GB/s (K and V bytes of the batch), " WRONG" if it is off."""
    tables, seq_lens = pool.block_tables[rows].contiguous(), pool.seq_lens[rows].contiguous()
    q_rows = q[rows]

    def fn():
        return tk.paged_decode_attention(q_rows, pool.k_cache, pool.v_cache, tables, seq_lens, SCALE, splits)

    bad = "" if rel_err(fn(), ref[rows]) < BF16_TOLERANCE else " WRONG"
    seconds = graph_seconds([fn] * LAYERS)  # a decode step's 28 launches in one CUDA graph, as the engine runs them
    return f"{int(pool.seq_lens.sum()) * KV_BYTES_PER_TOKEN / seconds / 1e9:5.0f}{bad}"


def decode_mixed(tk) -> str:
    """GB/s of paged_decode_attention when a batch's contexts differ (U(200, 2000)), by split count, with the rows
    in a random order (as a scheduler gives them) and packed longest first (does the tail of the long sequences'
    programs cost the bandwidth? benchmarks/NOTES.md, sixth session)."""
    lines = ["| batch, contexts U(200, 2000) | rows | 1 split | 2 | 4 | heuristic |", "|---|---|---|---|---|---|"]
    for batch in MIXED_BATCHES:
        pool, q = mixed_batch(batch, 200, 2000, DTYPE, DEVICE, seed=batch)
        ref = reference_mixed(q, pool)
        longest = torch.argsort(pool.seq_lens, descending=True)
        for rows, order in (("random", torch.arange(batch, device=DEVICE)), ("longest first", longest)):
            cells = [engine_decode_gbs(tk, pool, q, ref, order, splits) for splits in (1, 2, 4)]
            heuristic = tk.decode_num_splits(batch, NUM_KV_HEADS, int(pool.seq_lens.max()))
            lines.append(f"| {batch} | {rows} | " + " | ".join(cells) + f" | {heuristic} |")
            print("  " + lines[-1], flush=True)
    return "\n".join(lines)


def decode_splits(tk, deadline: float) -> str:
    """GB/s of paged_decode_attention for each (batch, context) x split count x launch config: which split count
    keeps the H200's bandwidth busy at each batch size (the engine's heuristic, decode_num_splits, beside it)."""
    default = tk.DECODE_CONFIG["half"]
    lines = [f"| config | {'batch x context':<16} | " + " | ".join(f"splits {s:<3}" for s in (1, 2, 4, 8, 16, 32))
             + " | heuristic |", "|---|---|" + "---|" * 7]
    for config in SPLITS_CONFIGS:
        tk.DECODE_CONFIG["half"] = config
        for batch, context in SPLITS_SHAPES:
            if time.perf_counter() > deadline:
                lines.append(f"| {config} | {batch} x {context} | skipped: out of time budget |")
                continue
            pool = Pool(batch, context, 16, DTYPE, DEVICE)
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
            ref = reference_attention(q, pool, 1, torch.float32)
            nbytes = batch * context * KV_BYTES_PER_TOKEN
            cells = []
            for splits in (1, 2, 4, 8, 16, 32):
                def fn(splits=splits, q=q, pool=pool):
                    return tk.paged_decode_attention(q, pool.k_cache, pool.v_cache, pool.block_tables, pool.seq_lens,
                                                     SCALE, splits)
                try:
                    bad = "" if rel_err(fn(), ref) < BF16_TOLERANCE else " WRONG"
                    cells.append(f"{nbytes / bench(fn, True) / 1e6:5.0f}{bad}")
                except Exception as e:  # a configuration that does not compile or launch
                    cells.append(f"failed {type(e).__name__}")
            heuristic = tk.decode_num_splits(batch, NUM_KV_HEADS, context)
            lines.append(f"| {config} | {batch} x {context} | " + " | ".join(cells) + f" | {heuristic} |")
            print("  " + lines[-1], flush=True)
    tk.DECODE_CONFIG["half"] = default
    return "\n".join(lines)


def run(args) -> int:
    import triton

    if args.decode_splits:
        tk = load_kernels()
        mixed = decode_mixed(tk)
        table = decode_splits(tk, args.start + args.budget)
        print("\nGB/s (K and V bytes over the median time), contexts that differ within the batch:\n" + mixed)
        print("\nThe same, every sequence of one length, by launch config:\n" + table)
        return 0

    tk = load_kernels()
    torch.manual_seed(0)
    results = Results()
    todo = shapes(args.quick)
    for block_size in args.block_sizes:
        for batch, context in todo["decode"]:
            time_decode(tk, results, block_size, batch, context, args.quick)
        for batch, new, cached in todo["prefill"]:
            time_prefill(tk, results, block_size, batch, new, cached, args.quick)
    for n in todo["store_kv"]:
        time_store_kv(tk, results, n, args.quick)
    if DEVICE == "cuda" and not check_cuda_graph(tk, args.block_sizes[0], *todo["graph"]):
        results.failures.append("CUDA graph replay")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
              f"triton {triton.__version__}, {str(DTYPE)[6:]}, nh {NUM_HEADS}, nkv {NUM_KV_HEADS}, D {HEAD_DIM}; "
              "times are do_bench medians (L2 flushed)")
    report = [header, "", results.table()]
    print("\n" + "\n".join(report), flush=True)
    if not args.quick and DEVICE == "cuda":
        deadline = args.start + args.budget - 20
        print(f"\nLaunch-configuration sweep (block size {args.block_sizes[0]}; stops starting configs "
              f"{args.budget - 20:.0f} s into the run):", flush=True)
        table = sweep(tk, args.block_sizes[0], args.quick, deadline)
        report += ["", f"Launch configurations (block size {args.block_sizes[0]}):", "", table]
        print("\n" + table)
    if args.results:
        old = args.results.read_text(encoding="utf-8") if args.results.exists() else ""
        tmp = args.results.with_name(args.results.name + ".tmp")
        tmp.write_text(old + "\n## Paged-attention kernels (benchmarks/kernels.py)\n\n" + "\n".join(report) + "\n",
                       encoding="utf-8")
        os.replace(tmp, args.results)
    if results.failures:
        print(f"\nFAILED correctness checks: {', '.join(results.failures)}")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# --compile-only: the compiler's report without a GPU


def compile_only(arch: int) -> int:
    """Compile every launch variant for sm_{arch} through triton's own JIT path (a stand-in driver, no launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    compiled = []
    jit_run = JITFunction.run

    def run_compile_only(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kwargs, kernel))
        return kernel

    JITFunction.run = run_compile_only
    tk = load_kernels()
    labels = []
    for dtype in (torch.bfloat16, torch.float32):
        for nh, nkv, d in ((16, 8, 128), (40, 8, 128), (64, 8, 128), (8, 8, 64)):
            k_cache = torch.zeros(8, 16, nkv, d, dtype=dtype)
            q = torch.zeros(64, nh, d, dtype=dtype)
            bt = torch.zeros(4, 2, dtype=torch.int32)
            lens = torch.ones(4, dtype=torch.int32)
            starts = torch.tensor([0, 1, 2, 3, 64], dtype=torch.int32)
            tag = f"{str(dtype)[6:]} nh {nh} nkv {nkv} D {d}"
            for max_query_len in (1, 8, 64, 512):
                tk.paged_attention(q, k_cache, k_cache, bt, lens, starts, 0.1, max_query_len, 32)
                labels.append(f"paged_attention        {tag} max_query_len {max_query_len}")
            for splits in (1, 4):
                tk.paged_decode_attention(q[:4], k_cache, k_cache, bt, lens, 0.1, splits)
                labels.append(f"paged_decode (split)   {tag} num_splits {splits}")
                if splits > 1:
                    labels.append(f"paged_decode (reduce)  {tag} num_splits {splits}")
            tk.store_kv(q[:4, :nkv], q[:4, :nkv], k_cache, k_cache, lens)
            labels.append(f"store_kv               {tag}")
            pool = torch.zeros(2, 2, *k_cache.shape, dtype=dtype)
            tables = torch.zeros(64, d // 2)
            tk.qk_norm_rope_store(q[:4], q[:4, :nkv], q[:4, :nkv], lens.long(), q[0, 0], q[0, 0], 1e-6, 1e-6, tables,
                                  tables, pool, 1, lens)  # fmt: skip
            labels.append(f"qk_norm_rope_store     {tag}")
    # the sweep's alternatives, on Qwen3-0.6B's shapes
    k_cache = torch.zeros(8, 16, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    q = torch.zeros(64, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    bt, lens = torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, dtype=torch.int32)
    defaults = tk.DECODE_CONFIG["half"], list(tk.PREFILL_CONFIG["half"])
    for config in DECODE_SWEEP[1:]:
        tk.DECODE_CONFIG["half"] = config
        tk.paged_decode_attention(q[:4], k_cache, k_cache, bt, lens, 0.1, 1)
        labels.append(f"sweep: decode BLOCK_N {config[0]} warps {config[1]} stages {config[2]}")
    for config in PREFILL_SWEEP[1:]:
        tk.PREFILL_CONFIG["half"] = [(None, *config)]
        tk.paged_attention(q, k_cache, k_cache, bt, lens, torch.tensor([0, 1, 2, 3, 64], dtype=torch.int32), 0.1, 61,
                           64)
        labels.append(f"sweep: prefill rows {config[0]} BLOCK_N {config[1]} warps {config[2]} stages {config[3]}")
    tk.DECODE_CONFIG["half"], tk.PREFILL_CONFIG["half"] = defaults
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    print(f"triton {triton.__version__}, sm_{arch}: registers / spills / shared memory of each variant\n")
    worst = 0
    seen = set()
    for label, (_, _, kernel) in zip(labels, compiled, strict=True):
        key = kernel.hash if hasattr(kernel, "hash") else id(kernel)
        if key in seen:
            continue
        seen.add(key)
        ptx = Path(f"/tmp/qwen3_kernel_{os.getpid()}.ptx")
        ptx.write_text(kernel.asm["ptx"])
        info = subprocess.run([str(ptxas), "--gpu-name", f"sm_{arch}a" if arch >= 90 else f"sm_{arch}", "-v",
                               str(ptx), "-o", os.devnull], capture_output=True, text=True).stderr
        ptx.unlink()
        lines = info.splitlines()
        regs = next((line.split("Used ")[1].split(" registers")[0] for line in lines if "Used" in line), "?")
        spills = next((line.split(",")[1].strip() for line in lines if "spill stores" in line), "?")
        shared = kernel.metadata.shared
        worst = max(worst, shared)
        print(f"  {label:<70} warps {kernel.metadata.num_warps} stages {kernel.metadata.num_stages}  "
              f"regs {regs:>3}  {spills:<18}  shared {shared / 1024:5.1f} KiB")
    limit = 227 * 1024
    print(f"\n{len(seen)} variants compiled; largest shared memory {worst / 1024:.1f} KiB (limit {limit // 1024} KiB)")
    return 0 if worst <= limit else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--block-sizes", default="16,256", help="KV block sizes to time, comma-separated")
    parser.add_argument("--results", type=Path, help="append the tables to this markdown file")
    parser.add_argument("--budget", type=float, default=110, help="seconds: the config sweep stops 20 s before")
    parser.add_argument("--decode-splits", action="store_true",
                        help="only the decode kernel: GB/s by batch, split count and launch config (within --budget)")
    parser.add_argument("--compile-only", action="store_true", help="no GPU: compile for --arch and print resources")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90 = H100/H200)")
    args = parser.parse_args()
    args.block_sizes = [int(b) for b in args.block_sizes.split(",")]
    if args.quick:
        args.block_sizes = args.block_sizes[:1]
    if args.compile_only:
        return compile_only(args.arch)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (or --compile-only)", file=sys.stderr)
        return 2
    args.start = time.perf_counter()
    code = run(args)
    print(f"\ntotal {time.perf_counter() - args.start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
