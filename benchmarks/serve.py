"""Load test of `qwen3 serve` on loopback, against the same requests through the engine without HTTP.

    python benchmarks/serve.py                      # CUDA: random-init Qwen3-0.6B in bf16; CPU: the demo model
    python benchmarks/serve.py --model demo --concurrency 1 16 --requests 32

For each concurrency level C (default 1, 16, 64, 256) it sends N requests (default max(8C, 16) on CUDA,
max(C, 8) on CPU) with at most C in flight, each a streamed `/v1/completions` of random prompt token ids
(U[0, 10000), `--input-len` long) with `max_tokens` = `--output-len`, `ignore_eos` and greedy sampling, so
every request does the same work. It reports requests/s, output tokens/s, time to first token (TTFT) and
inter-token latency (ITL: the gaps between streamed chunks) at p50/p99, measured by the client.

The baseline runs the same requests, at the same concurrency, through `qwen3.AsyncLLM` in one process (the
engine the server wraps, with no HTTP, JSON or SSE), and once through `LLM.generate` with all of them at once;
"HTTP/engine" is the server's output tokens/s over the in-process engine's. The server steps its engine in a
process of its own, as `qwen3 serve` does (`--engine thread`: in a thread of the server, the old way). The server
and the baseline run in their own processes, one after the other (each takes the GPU's memory for its KV cache).
The client runs in `--client-procs` processes so that parsing the streams does not become the bottleneck; the
table shows how busy the busiest of them was (near 100%: the client, not the server, set the pace). Every level
is bounded by `--max-seconds` (unfinished requests are cancelled and counted). Eight requests per client slot
make most of a level's time steady state, not the ramp-up and the tail.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing
import os
import platform
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWEN3_TOKENIZER = ROOT / "tests" / "assets" / "qwen3-0.6b"  # the real tokenizer files, in the repository


# ---------------------------------------------------------------------------------------------------------
# The model (in the server and baseline processes)


def build_llm(args: argparse.Namespace):
    """(LLM, served name, directory with generation_config.json or None)."""
    import torch

    from qwen3 import Qwen3Config, Qwen3ForCausalLM, load_tokenizer
    from qwen3.engine import LLM

    device = args.device
    if args.model == "random-0.6b":
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(Qwen3Config.from_preset("0.6B"))
            model.init_weights()
        model = model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).eval()
        llm = LLM(
            model,
            tokenizer=load_tokenizer(QWEN3_TOKENIZER),
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            compile=args.compile,
        )
        return llm, args.model, None
    directory = build_llm_directory(args)
    llm = LLM(str(directory), device=device, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              compile=args.compile)
    return llm, args.model, directory


def build_llm_directory(args: argparse.Namespace):
    from qwen3.hub import MODEL_FILES, TOKENIZER_FILES, resolve_source

    return resolve_source(args.model, sorted(set(MODEL_FILES + TOKENIZER_FILES)))


def llm_only(args: argparse.Namespace):
    """build_llm's LLM: the factory the engine process calls (AsyncLLM.spawn)."""
    return build_llm(args)[0]


def serve_worker(args: argparse.Namespace) -> int:
    from qwen3.engine import AsyncLLM
    from qwen3.server.app import create_app, run_server
    from qwen3.server.serving import ServingContext

    if args.api_server_count > 1:  # as `qwen3 serve --api-server-count N` runs it
        from qwen3.server.app import bind_socket
        from qwen3.server.front_ends import FrontEnd, serve_front_ends

        directory = None if args.model == "random-0.6b" else build_llm_directory(args)
        options = FrontEnd(args.model, directory, max_num_seqs=args.max_num_seqs,
                           stream_interval=args.stream_interval)  # fmt: skip
        return serve_front_ends(args.api_server_count, llm_only, (args,), {}, bind_socket("127.0.0.1", 0), options,
                                "benchmark server on {url}")  # fmt: skip
    if args.engine == "process":  # as `qwen3 serve` runs it
        engine = AsyncLLM.spawn(llm_only, args, stream_interval=args.stream_interval)
        directory = None if args.model == "random-0.6b" else build_llm_directory(args)
        ctx = ServingContext.for_engine(engine, args.model, directory)
    else:
        llm, name, directory = build_llm(args)
        ctx = ServingContext.for_engine(llm, name, directory)
        engine = AsyncLLM(llm, stream_interval=args.stream_interval)
    app = create_app(engine, ctx, max_num_seqs=args.max_num_seqs)
    return run_server(app, "127.0.0.1", 0, banner="benchmark server on {url}")


def engine_worker(args: argparse.Namespace) -> int:
    """The baseline: every level's requests through AsyncLLM in-process, plus one LLM.generate; JSON on stdout."""
    from qwen3.engine import AsyncLLM
    from qwen3.sampling import SamplingParams

    llm, _, _ = build_llm(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    engine = AsyncLLM(llm, stream_interval=args.stream_interval)
    results = {}

    async def level(concurrency: int, prompts: list[list[int]]) -> dict:
        records, queue = [], list(enumerate(prompts))
        deadline = time.perf_counter() + args.max_seconds

        async def one(i: int, prompt: list[int]) -> None:
            start, times, tokens = time.perf_counter(), [], 0
            async for out in engine.generate(prompt, params, request_id=f"b{concurrency}-{i}-{random.random()}"):
                if out.new_token_ids:
                    times.append(time.perf_counter())
                    tokens += len(out.new_token_ids)
            records.append({"start": start, "times": times, "tokens": tokens})

        async def client() -> None:
            while queue and time.perf_counter() < deadline:
                await one(*queue.pop(0))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarize(records, time.perf_counter() - started, len(prompts))

    async def run_all() -> None:
        await level(1, prompt_ids(1, args.input_len, args.vocab, 999))  # warm-up
        for c in args.concurrency:
            results[str(c)] = await level(c, workload(args, c))
        await engine.shutdown()

    asyncio.run(run_all())
    prompts = workload(args, max(args.concurrency))
    # Warm-up at the shapes of an all-at-once prefill (full token-budget chunks), which the levels above never ran,
    # so that any compiling or tuning for them happens here, not in the timed run (on the H200 the same command once
    # gave 43k and once 64k tokens/s here; the slow run was on a machine with nothing compiled yet).
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate(prompt_ids(args.max_num_seqs, args.input_len, args.vocab, 998), warm, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    results["generate"] = {
        "requests": len(prompts),
        "seconds": seconds,
        "output_tok_s": sum(len(o.token_ids) for o in outs) / seconds,
    }
    print("RESULT " + json.dumps(results), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The workload and the client


def prompt_ids(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def workload(args: argparse.Namespace, concurrency: int) -> list[list[int]]:
    n = args.requests or (max(8 * concurrency, 16) if args.device.startswith("cuda") else max(concurrency, 8))
    return prompt_ids(n, args.input_len, args.vocab, seed=concurrency)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summarize(records: list[dict], seconds: float, wanted: int) -> dict:
    done = [r for r in records if r["times"]]
    ttft = [r["times"][0] - r["start"] for r in done]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in done)
    return {
        "requests": len(done),
        "lost": wanted - len(done),
        "seconds": seconds,
        "req_s": len(done) / seconds,
        "output_tok_s": tokens / seconds,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50),
        "itl_p99": percentile(itl, 99),
    }


def client_proc(
    url: str, model: str, items: list[tuple[int, list[int]]], concurrency: int, output_len: int, max_seconds: float
) -> tuple[list[dict], float]:
    """One client process: its share of the requests, `concurrency` at a time; a record per finished request, and
    the fraction of the time this process was busy (near 1: the client, not the server, sets the pace)."""
    import httpx

    async def main() -> list[dict]:
        records, queue = [], list(items)
        deadline = time.perf_counter() + max_seconds
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:

            async def one(prompt: list[int]) -> None:
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": output_len,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                start, times, tokens = time.monotonic(), [], 0
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        if '"usage":{' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                        else:
                            times.append(time.monotonic())
                records.append({"start": start, "times": times, "tokens": tokens})

            async def worker() -> None:
                while queue and time.perf_counter() < deadline:
                    await one(queue.pop(0)[1])

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records

    wall, cpu = time.perf_counter(), time.process_time()
    records = asyncio.run(main())
    return records, (time.process_time() - cpu) / (time.perf_counter() - wall)


def run_level(pool, url: str, model: str, prompts: list[list[int]], concurrency: int, args: argparse.Namespace) -> dict:
    """Spread the requests and the concurrency over the client processes; time from first send to last token."""
    procs = max(1, min(args.client_procs, concurrency))
    shares = [[(i, p) for i, p in enumerate(prompts) if i % procs == k] for k in range(procs)]
    per_proc = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    jobs = [
        pool.apply_async(client_proc, (url, model, shares[k], per_proc[k], args.output_len, args.max_seconds))
        for k in range(procs)
    ]
    results = [job.get(timeout=args.max_seconds + 120) for job in jobs]
    records = [r for rs, _ in results for r in rs]
    # time.monotonic is one clock for all processes: the level lasts from the first request to the last token
    seconds = max(r["times"][-1] for r in records if r["times"]) - min(r["start"] for r in records)
    return {**summarize(records, seconds, len(prompts)), "client_busy": max(busy for _, busy in results)}


# ---------------------------------------------------------------------------------------------------------
# The driver


def worker_command(args: argparse.Namespace, role: str) -> list[str]:
    command = [
        sys.executable,
        __file__,
        role,
        "--model",
        args.model,
        "--device",
        args.device,
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-seconds",
        str(args.max_seconds),
        "--stream-interval",
        str(args.stream_interval),
        "--engine",
        args.engine,
        "--api-server-count",
        str(args.api_server_count),
        "--concurrency",
        *map(str, args.concurrency),
    ]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.compile:
        command.append("--compile")
    if args.requests:
        command += ["--requests", str(args.requests)]
    return command


def run_engine_baseline(args: argparse.Namespace) -> dict:
    run = subprocess.run(
        worker_command(args, "--engine-worker"),
        capture_output=True,
        text=True,
        timeout=args.max_seconds * (len(args.concurrency) + 2) + 600,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"engine baseline failed:\n{run.stderr[-3000:]}")
    return json.loads(line[7:])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(worker_command(args, "--serve-worker"), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            match = re.search(r"http://127\.0\.0\.1:\d+", proc.stdout.readline())
            if match:
                return proc, match.group(0)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def event_loop() -> str:
    """The loop uvicorn's loop="auto" picks: uvloop where it is installed (the serve extra), else asyncio's."""
    import importlib.util

    if importlib.util.find_spec("uvloop") is None:
        return "asyncio (uvloop is not installed)"
    from importlib.metadata import version

    return f"uvloop {version('uvloop')}"


def main() -> int:
    from qwen3.server.cli import stream_interval  # `qwen3 serve`'s own check of the flag

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--model",
        help="random-0.6b (random-init Qwen3-0.6B shape), demo, a directory or a Hub id "
        "(default: random-0.6b on CUDA, demo on CPU)",
    )
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--requests", type=int, help="requests per level (default: max(8C, 16) on CUDA, max(C, 8) on CPU)")
    p.add_argument("--input-len", type=int, help="prompt tokens (default 128 on CUDA, 32 on CPU)")
    p.add_argument("--output-len", type=int, help="output tokens (default 128 on CUDA, 16 on CPU)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, help="default: 2048 on CUDA, 256 on CPU")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time limit per level (default 120)")
    p.add_argument("--client-procs", type=int, help="client processes (default 4 on CUDA, 1 on CPU)")
    p.add_argument(
        "--stream-interval",
        type=stream_interval,
        default=1,
        help="the engine wakes each stream every N tokens, or auto, in the server and the baseline (default 1)",
    )
    p.add_argument(
        "--engine",
        choices=["process", "thread"],
        default="process",
        help="the server's engine in a process of its own, as `qwen3 serve` runs it, or in a thread of the server",
    )
    p.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="HTTP processes in front of the engine process, as `qwen3 serve --api-server-count N`")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: LLM(compile=True) in the server and the baseline, as `qwen3 serve --compile`")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("random-0.6b" if cuda else "demo")
    args.input_len = args.input_len or (128 if cuda else 32)
    args.output_len = args.output_len or (128 if cuda else 16)
    args.max_model_len = args.max_model_len or (2048 if cuda else 256)
    args.client_procs = args.client_procs or (4 if cuda else 1)
    args.vocab = 10_000 if args.model != "demo" else 4000
    if args.serve_worker:
        return serve_worker(args)
    if args.engine_worker:
        return engine_worker(args)

    print(f"engine baseline (in-process AsyncLLM, then LLM.generate): {args.model} on {args.device} ...", flush=True)
    baseline = run_engine_baseline(args)
    print("starting the server ...", flush=True)
    proc, url = start_server(args)
    rows = {}
    pool = multiprocessing.get_context("spawn").Pool(args.client_procs)
    try:
        warm = prompt_ids(args.client_procs, args.input_len, args.vocab, 999)
        run_level(pool, url, args.model, warm, args.client_procs, args)  # warm-up: every client process imports
        for c in args.concurrency:
            rows[c] = run_level(pool, url, args.model, workload(args, c), c, args)
            print(f"  concurrency {c}: {rows[c]['output_tok_s']:.0f} output tokens/s", flush=True)
    finally:
        pool.close()
        pool.join()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    machine = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        machine = f"{names[0]}, {os.cpu_count()} CPUs" if names else machine
    if cuda:
        import torch

        machine = torch.cuda.get_device_name(0)
    header = (
        f"qwen3 serve, {args.model} on {args.device} ({machine}), {datetime.date.today()}: "
        f"{args.input_len} prompt tokens, {args.output_len} output tokens, greedy, ignore_eos, streamed"
        + (f", stream interval {args.stream_interval}" if args.stream_interval != 1 else "")
        + (", compile=True" if args.compile else "")
        + f"; engine in {'its own process' if args.engine == 'process' else 'a thread of the server'}"
        + (f", {args.api_server_count} HTTP processes" if args.api_server_count > 1 else "")
        + f"; event loop: {event_loop()}"
    )
    lines = [
        header,
        "",
        "| concurrency | requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| engine tok/s (no HTTP) | HTTP/engine | busiest client process |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r in rows.items():
        e = baseline[str(c)]
        lost = f" ({r['lost']} unfinished)" if r["lost"] else ""
        lines.append(
            f"| {c} | {r['requests']}{lost} | {r['req_s']:.2f} | {r['output_tok_s']:.0f} | "
            f"{r['ttft_p50'] * 1e3:.1f} | {r['ttft_p99'] * 1e3:.1f} | {r['itl_p50'] * 1e3:.2f} | "
            f"{r['itl_p99'] * 1e3:.2f} | {e['output_tok_s']:.0f} | {r['output_tok_s'] / e['output_tok_s']:.2f} | "
            f"{r['client_busy']:.0%} |"
        )
    g = baseline["generate"]
    lines += [
        "",
        f"LLM.generate on the {g['requests']} requests of the largest level at once: "
        f"{g['output_tok_s']:.0f} output tokens/s",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "server": rows, "engine": baseline}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
