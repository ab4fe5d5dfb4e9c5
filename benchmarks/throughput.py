"""Offline batch throughput: the engine (qwen3.LLM) against today's padded `qwen3.generate` and transformers'
continuous batching, in one process, on the same random-init checkpoint (no download).

The protocol is nano-vllm's `bench.py`, exactly: seed 0; 256 requests; prompt token ids U[0, 10000) of length
U(100, 1024); `max_tokens` U(100, 1024); `ignore_eos`; temperature 0.6; `max_model_len` 4096; one warm-up.
Throughput = sum of max_tokens / wall time.

    python benchmarks/throughput.py                        # CUDA: random-init Qwen3-0.6B in bf16
    python benchmarks/throughput.py --device cpu           # CPU: the demo model, engine vs one generate per request

The padded generate and transformers are much slower than the engine, so they run on `--peer-requests` other
requests drawn the same way (64 by default, seed 2; the engine runs them too, for a like-for-like ratio). Time to
first token is measured on a third draw (seed 1), all requests arriving at once, so no prefix-cache hit flatters it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qwen3
from qwen3.engine import LLM, AsyncLLM
from qwen3.sampling import SamplingParams


def workload(
    num_requests: int, min_len: int, max_len: int, vocab: int = 10000, seed: int = 0
) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py: prompts of U(min_len, max_len) ids in [0, 10000), max_tokens U(min_len, max_len)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_requests)]
    max_tokens = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    return prompts, max_tokens


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def params_for(max_tokens: list[int], temperature: float) -> list[SamplingParams]:
    return [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for n in max_tokens]


def run_engine(llm: LLM, prompts, max_tokens, temperature, device, trace: list | None = None) -> dict:
    sync(device)
    start = time.perf_counter()
    if trace is not None:
        llm.step = traced_step(llm, trace)
    try:
        outputs = llm.generate(prompts, params_for(max_tokens, temperature), use_tqdm=False)
    finally:
        llm.__dict__.pop("step", None)
    sync(device)
    seconds = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == sum(max_tokens), (produced, sum(max_tokens))  # ignore_eos: every request runs to max_tokens
    return {"seconds": seconds, "tokens": produced, "tokens_per_s": produced / seconds}


def traced_step(llm: LLM, records: list):
    """llm.step, recording each call's wall time and the step it launched: (seconds, prefill tokens, decode
    sequences, key/value tokens the step's attention reads). With one step in flight, call n waits for step n-1's
    results, so call n's time is charged to step n-1 (see step_table)."""
    original = type(llm).step.__get__(llm)

    def step():
        start = time.perf_counter()
        out = original()
        seconds = time.perf_counter() - start
        prefill, decode = llm.last_step_tokens
        context = sum(seq.num_computed_tokens for seq in llm.scheduler.running)
        records.append((seconds, prefill, decode, context))
        return out

    return step


def step_table(records: list, kv_bytes: int = 114688) -> str:
    """Where the engine's time went, by kind of step, and a least-squares fit of a decode step's time:
    fixed + per sequence + per key/value token read (the effective bandwidth of the attention)."""
    import numpy as np

    shifted = [(records[i + 1][0],) + records[i][1:] for i in range(len(records) - 1)]  # call n+1 = step n
    kinds: dict[int, list] = {}  # 0: steps with prompt tokens; b: decode steps of at most b sequences
    for seconds, prefill, decode, _context in shifted:
        kind = 0 if prefill else next(b for b in (1, 8, 16, 32, 64, 128, 192, 256, 10**9) if decode <= b)
        kinds.setdefault(kind, []).append(seconds)
    total = sum(r[0] for r in records)
    lines = ["| steps | count | seconds | share | ms per step |", "|---|---|---|---|---|"]
    for kind, times in sorted(kinds.items()):
        label = "with prompt tokens" if kind == 0 else f"decode, at most {kind} sequences"
        lines.append(f"| {label} | {len(times)} | {sum(times):.2f} | {sum(times) / total:.0%} | "
                     f"{1000 * sum(times) / len(times):.2f} |")  # fmt: skip
    decode = np.array([(1.0, d, c, s) for s, p, d, c in shifted if not p and d >= 16])
    if len(decode) > 10:
        coef, *_ = np.linalg.lstsq(decode[:, :3], decode[:, 3], rcond=None)
        lines.append(f"\ndecode steps >= 16 sequences: {1000 * coef[0]:.2f} ms fixed + {1e6 * coef[1]:.1f} us per "
                     f"sequence + {1e9 * coef[2]:.2f} us per 1,000 key/value tokens "
                     f"(= {kv_bytes / max(coef[2], 1e-12) / 1e12:.2f} TB/s at {kv_bytes / 1024:g} KiB per "
                     "token)")  # fmt: skip
    return "\n".join(lines)


def engine_ttft(llm: LLM, prompts, max_tokens, temperature) -> dict:
    """Time to first token of every request when all arrive at once (streaming interface), and the makespan."""

    async def main() -> list[float]:
        engine = AsyncLLM(llm)
        start = time.perf_counter()

        async def one(i: int) -> float:
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens[i], ignore_eos=True)
            first = None
            async for out in engine.generate(prompts[i], params, request_id=f"ttft-{i}"):
                if first is None and out.new_token_ids:
                    first = time.perf_counter() - start
            return first

        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await engine.shutdown()

    ttfts = sorted(asyncio.run(main()))
    return {"ttft_p50": statistics.median(ttfts), "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}


def run_padded_generate(model, prompts, max_tokens, temperature, device, batch: int) -> dict:
    """Today's `qwen3.generate`: padded batches of `batch` prompts, each batch decoding to its longest max_tokens."""
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        qwen3.generate(model, prompts[i : i + batch], max_new_tokens=max(max_tokens[i : i + batch]),
                       sampling=SamplingParams(temperature=temperature, seed=0))  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    useful = sum(max_tokens)
    return {"seconds": seconds, "tokens": useful, "tokens_per_s": useful / seconds}


def run_one_by_one(model, prompts, max_tokens, temperature, device) -> dict:
    sync(device)
    start = time.perf_counter()
    for p, n in zip(prompts, max_tokens, strict=True):
        qwen3.generate(model, [p], max_new_tokens=n, sampling=SamplingParams(temperature=temperature, seed=0))
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(max_tokens), "tokens_per_s": sum(max_tokens) / seconds}


def run_transformers(directory: Path, prompts, max_tokens, temperature, device, dtype) -> dict:
    """transformers' continuous batching manager (the machinery behind generate_batch), per-request max_new_tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="paged|sdpa").to(device)
    config = GenerationConfig(do_sample=True, temperature=temperature, max_new_tokens=max(max_tokens),
                              eos_token_id=-1, pad_token_id=0)  # fmt: skip
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        sync(device)
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        produced, done = 0, 0
        while done < len(prompts):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' manager stopped answering")
            if result.is_finished():
                done += 1
                produced += len(result.generated_tokens)
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    del model
    return {"seconds": seconds, "tokens": produced, "tokens_per_s": produced / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, help="requests (default 256 on CUDA, 16 on CPU)")
    p.add_argument("--peer-requests", type=int, help="requests for the slower peers (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--padded-batch", type=int, default=64, help="rows per padded qwen3.generate batch")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-padded", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="the engine's key/value cache: the model's dtype, or fp8 (e4m3, half the bytes of bf16)")
    p.add_argument("--trace", action="store_true",
                   help="time every step of the main run; print where the time went and a fit of a decode step")
    p.add_argument("--results", type=Path, help="append the table to this markdown file")
    p.add_argument("--compile", action="store_true",
                   help="LLM(compile=True): decode graphs replay a compiled forward (start-up includes compiling)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.compile and not cuda:
        p.error("--compile needs CUDA (LLM(compile=True) compiles the CUDA-graph engine)")
    temperature = 0.6
    if cuda:  # nano-vllm's numbers
        num, peers, lo, hi, max_model_len, dtype = 256, 64, 100, 1024, 4096, torch.bfloat16
    else:  # the same shape of workload, scaled to a 2-core CPU and the demo model's 1,024-token context
        num, peers, lo, hi, max_model_len, dtype = 16, 16, 10, 100, 1024, torch.float32
    num, peers = args.requests or num, args.peer_requests or peers
    vocab = 10000 if cuda else 4095  # the demo's vocabulary is 4,096
    prompts, max_tokens = workload(num, lo, hi, vocab)
    # The TTFT pass and the peers' subset use fresh prompts (other seeds): the prefix cache must not serve them.
    ttft_prompts, ttft_max_tokens = workload(num, lo, hi, vocab, seed=1)
    peer_prompts, peer_max_tokens = workload(peers, lo, hi, vocab, seed=2)

    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.manual_seed(0)
            model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config.from_preset("0.6B")).to(dtype)
            model.init_weights()
            qwen3.save_model(model, tmp)
            source, name = tmp, "random-init Qwen3-0.6B, bf16"
        else:
            source, name = "demo", "demo model (11M), fp32"
        model = qwen3.load_model(source, device=args.device, dtype=dtype)
        torch.cuda.reset_peak_memory_stats() if cuda else None
        start = time.perf_counter()
        llm = LLM(model, max_num_seqs=args.max_num_seqs, max_model_len=max_model_len, compile=args.compile,
                  kv_cache_dtype=args.kv_cache_dtype)
        startup = time.perf_counter() - start
        print(f"engine start-up {startup:.1f} s" + (" (compile=True: includes compiling)" if args.compile else ""))
        run_engine(llm, prompts[:2], [8, 8], temperature, args.device)  # warm-up, as bench.py
        rows = []
        trace: list | None = [] if args.trace else None
        full = run_engine(llm, prompts, max_tokens, temperature, args.device, trace)
        if trace:
            per_token = llm.pool.kv[:, :, 0, 0].numel() * llm.pool.kv.element_size()  # all layers' k and v
            print(step_table(trace, per_token))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        ttft = engine_ttft(llm, ttft_prompts, ttft_max_tokens, temperature)
        pool_tokens = llm.num_kv_cache_tokens if hasattr(llm, "num_kv_cache_tokens") else None
        mean_len = statistics.mean(len(q) + n for q, n in zip(prompts, max_tokens, strict=True))
        rows.append((f"qwen3.LLM, {num} requests", full, ttft))
        subset = run_engine(llm, peer_prompts, peer_max_tokens, temperature, args.device)
        rows.append((f"qwen3.LLM, {peers} others", subset, None))
        del llm
        if not args.skip_padded:
            if cuda:
                padded = run_padded_generate(model, peer_prompts, peer_max_tokens, temperature, args.device,
                                             args.padded_batch)  # fmt: skip
                rows.append((f"qwen3.generate, padded batches of {args.padded_batch}, the {peers}", padded, None))
            else:
                single = run_one_by_one(model, peer_prompts, peer_max_tokens, temperature, args.device)
                rows.append((f"qwen3.generate, one call per request, the {peers}", single, None))
        del model
        if cuda and not args.skip_transformers:
            try:
                hf = run_transformers(Path(tmp), peer_prompts, peer_max_tokens, temperature, args.device, dtype)
                rows.append((f"transformers continuous batching, the {peers}", hf, None))
            except Exception as e:  # a peer failing must not lose our numbers
                print(f"transformers continuous batching failed: {e.__class__.__name__}: {e}")

    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'CPU'}, {threads} threads"
    lines = [
        f"### Throughput, nano-vllm protocol ({datetime.date.today()}, {device_name}, torch {torch.__version__})",
        "",
        f"`python benchmarks/throughput.py --device {args.device}{' --compile' if args.compile else ''}"
        f"{' --kv-cache-dtype fp8' if args.kv_cache_dtype == 'fp8' else ''}`; {name}; "
        f"prompts and max_tokens "
        f"U({lo}, {hi}), temperature 0.6, ignore_eos, max_model_len {max_model_len}; engine start-up {startup:.1f} s.",
        "",
        "| run | output tokens | seconds | output tokens/s | ratio to the engine (same requests) | TTFT p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for label, r, t in rows:
        reference = rows[0][1] if label == rows[0][0] else rows[1][1]
        ratio = r["tokens_per_s"] / reference["tokens_per_s"]
        ttft_text = f"{t['ttft_p50']:.2f} s / {t['ttft_p99']:.2f} s" if t else "-"
        speed = f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {label} | {r['tokens']:,} | {r['seconds']:.2f} | {speed} | {ratio:.2f} | {ttft_text} |")
    lines.append("")
    extra = f"peak GPU memory {peak:.1f} GiB; " if cuda else ""
    if pool_tokens:
        extra += (f"KV pool {pool_tokens:,} tokens = {pool_tokens // max_model_len} sequences of {max_model_len}, "
                  f"{int(pool_tokens // mean_len)} of this workload's mean length {mean_len:.0f}")  # fmt: skip
    lines.append(extra)
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()
