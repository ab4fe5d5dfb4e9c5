"""The HTTP layer's own cost, on the CPU: the real server app and `AsyncLLM` over a scripted engine, no model.

    python benchmarks/serve_overhead.py                         # 256 streams x 256 tokens, engine as fast as it goes
    python benchmarks/serve_overhead.py --step-ms 10            # an H200-like step: 256 tokens every 10 ms
    python benchmarks/serve_overhead.py --route chat --clients 64

`FakeLLM` stands in for `qwen3.LLM` behind the real `AsyncLLM`: each step (after `--step-ms` of sleep, which
frees the GIL as a GPU step does, and `--host-ms` of Python work, which holds it, as the scheduler does) appends
one token and its text (" w<k>") to every running request, up to `--max-num-seqs` at once, and finishes a
request at its `max_tokens`. The server (`create_app` + `run_server`, uvicorn with uvloop and httptools, as
`qwen3 serve` runs) lives in its own process; the client is raw asyncio sockets in this process (it counts
`data: {` events and reads `usage` from the last chunk, no JSON per event), so the server's event loop, not the
client, is what is measured. `--clients` connections each stream one request of `--tokens` tokens
(`ignore_eos`); the run is bounded by `--max-seconds`.

It reports the SSE events/s and tokens/s the clients received, the server process's CPU time per event and per
token (steadier than the rates on a shared machine), and the same requests through `AsyncLLM` in this process
without HTTP (the engine's own rate at that step time): the ratio of the rates is what the HTTP layer keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class FakeLLM:
    """What `AsyncLLM` uses of `qwen3.LLM`, with a step that only appends tokens (see the module docstring)."""

    def __init__(self, tokenizer, max_num_seqs: int, step_ms: float, host_ms: float, max_model_len: int = 4096) -> None:
        from types import SimpleNamespace

        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.max_num_seqs, self.step_s, self.host_s = max_num_seqs, step_ms / 1000, host_ms / 1000
        self.waiting: list = []
        self.running: list = []
        self.scheduler = SimpleNamespace(running=self.running, waiting=self.waiting, num_preemptions=0)
        self.block_manager = SimpleNamespace(usage=lambda: 0.0)
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.steps = 0
        self.pieces = [f" w{k}" for k in range(100)]

    def make_sequence(self, index, prompt, params, request_id, stream):
        from qwen3.engine.sequence import Sequence

        return Sequence(request_id, list(prompt), params, 0)

    def add(self, seq) -> None:
        self.waiting.append(seq)
        self.prompt_tokens_total += seq.num_prompt_tokens

    def abort(self, seq) -> None:
        from qwen3.engine.sequence import Status

        if not seq.finished:
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            for queue in (self.waiting, self.running):
                if seq in queue:
                    queue.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def step(self) -> list:
        from qwen3.engine.sequence import Status

        if self.step_s:
            time.sleep(self.step_s)
        busy_until = time.perf_counter() + self.host_s
        while time.perf_counter() < busy_until:  # the engine's own Python work: it holds the GIL
            pass
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.pop(0)
            seq.status = Status.RUNNING
            self.running.append(seq)
        touched = list(self.running)
        for seq in touched:
            k = (seq.num_tokens * 7 + 3) % 100
            seq.token_ids.append(k)
            seq.stream_text += self.pieces[k]
            self.generation_tokens_total += 1
            if seq.num_output_tokens >= seq.params.max_tokens:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
        self.running[:] = [seq for seq in self.running if not seq.finished]
        self.steps += 1
        return touched


def stream_interval(args: argparse.Namespace) -> int | str:
    return "auto" if args.stream_interval == "auto" else int(args.stream_interval)


def build(args: argparse.Namespace):
    from qwen3 import load_tokenizer
    from qwen3.engine import AsyncLLM
    from qwen3.hub import DEMO_DIR
    from qwen3.server.serving import ServingContext

    tokenizer = load_tokenizer(DEMO_DIR)
    llm = FakeLLM(tokenizer, args.max_num_seqs, args.step_ms, args.host_ms)
    ctx = ServingContext(tokenizer, "fake", llm.max_model_len, tokenizer.vocab_size)
    return llm, AsyncLLM(llm, stream_interval=stream_interval(args)), ctx


def serve_worker(args: argparse.Namespace) -> int:
    from qwen3.server.app import create_app, run_server

    llm, engine, ctx = build(args)
    app = create_app(engine, ctx, max_num_seqs=args.max_num_seqs)
    return run_server(app, "127.0.0.1", 0, banner="overhead server on {url}")


def prompt(i: int) -> list[int]:
    return [(i * 31 + j) % 1000 + 10 for j in range(16)]


def engine_only(args: argparse.Namespace) -> dict:
    """The same requests through AsyncLLM in this process: the engine's own delivery rate, no HTTP."""
    from qwen3.sampling import SamplingParams

    async def main() -> dict:
        llm, engine, _ = build(args)
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        counts = []

        async def one(i: int) -> None:
            events = tokens = 0
            async for out in engine.generate(prompt(i), params):
                events += 1
                tokens += len(out.new_token_ids)
            counts.append((events, tokens))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.clients))), args.max_seconds)
        seconds = time.perf_counter() - start
        await engine.shutdown()
        return {"seconds": seconds, "events": sum(e for e, _ in counts), "tokens": sum(t for _, t in counts)}

    return asyncio.run(main())


async def http_clients(url: str, args: argparse.Namespace) -> dict:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    path = "/v1/completions" if args.route == "completions" else "/v1/chat/completions"

    def body(i: int) -> bytes:
        common = {"model": "fake", "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}  # fmt: skip
        if args.route == "completions":
            return json.dumps({**common, "prompt": prompt(i)}).encode()
        return json.dumps({**common, "messages": [{"role": "user", "content": f"request {i}"}]}).encode()

    async def one(i: int) -> tuple[int, int]:
        reader, writer = await asyncio.open_connection(host, int(port))
        data = body(i)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        received = bytearray()
        while chunk := await reader.read(1 << 16):
            received += chunk
        writer.close()
        usage = re.search(rb'"completion_tokens":(\d+)', received)
        if b"data: [DONE]" not in received or usage is None:
            raise RuntimeError(f"request {i}: incomplete stream: {bytes(received[-300:])!r}")
        return received.count(b"data: {"), int(usage.group(1))  # every event: tokens, role, finish, usage

    start = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.clients))), args.max_seconds)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "events": sum(e for e, _ in results), "tokens": sum(t for _, t in results)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=256, help="concurrent streaming requests (default 256)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per request (default 256)")
    p.add_argument("--step-ms", type=float, default=0.0, help="sleep per engine step (default 0: as fast as it goes)")
    p.add_argument(
        "--host-ms",
        type=float,
        default=0.0,
        help="Python work per engine step, holding the GIL (the scheduler, the detokenizer; default 0)",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--stream-interval", default="1", help="AsyncLLM's stream_interval: N or auto (default 1)")
    p.add_argument("--route", choices=["completions", "chat"], default="completions")
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--py-spy", type=Path, metavar="FILE", help="record the server with py-spy (collapsed stacks)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.serve_worker:
        return serve_worker(args)

    command = [sys.executable, __file__, "--serve-worker", "--step-ms", str(args.step_ms), "--host-ms",
               str(args.host_ms), "--max-num-seqs", str(args.max_num_seqs), "--stream-interval",
               str(args.stream_interval)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and server.poll() is None:
            if select.select([server.stdout], [], [], 1.0)[0]:
                match = re.search(r"http://127\.0\.0\.1:\d+", server.stdout.readline())
                url = match.group(0) if match else None
        if url is None:
            raise RuntimeError("the server did not start")
        cpu = _cpu_seconds(server.pid)
        spy = None
        if args.py_spy:  # samples the server while the clients run (attached by pid: it needs ptrace rights)
            spy = subprocess.Popen(["py-spy", "record", "-r", "250", "--format", "raw", "-o", str(args.py_spy),
                                    "--pid", str(server.pid), "-d", str(int(args.max_seconds))])  # fmt: skip
        http = asyncio.run(http_clients(url, args))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            spy.wait(30)
        http["server_cpu"] = _cpu_seconds(server.pid) - cpu
    finally:
        server.terminate()
        server.wait(30)
    engine = engine_only(args)
    expected = args.clients * args.tokens
    for name, r in (("HTTP", http), ("engine", engine)):
        if r["tokens"] != expected:
            raise RuntimeError(f"{name}: {r['tokens']} tokens received, {expected} expected")
    print(f"{args.clients} streams x {args.tokens} tokens, /v1/{args.route}, engine step {args.step_ms} ms asleep + "
          f"{args.host_ms} ms holding the GIL, stream interval {args.stream_interval}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    for name, r in (("HTTP (server process)", http), ("AsyncLLM in-process", engine)):
        print(
            f"  {name:22s} {r['seconds']:6.2f} s  {r['events'] / r['seconds']:9.0f} events/s  "
            f"{r['tokens'] / r['seconds']:9.0f} tokens/s  {r['tokens'] / max(r['events'], 1):5.2f} tokens/event"
        )
    print(f"  server process CPU: {http['server_cpu']:.2f} s, {http['server_cpu'] / http['events'] * 1e6:.1f} us per "
          f"event, {http['server_cpu'] / http['tokens'] * 1e6:.1f} us per token (engine thread included)")  # fmt: skip
    print(f"  HTTP/engine tokens/s: {http['tokens'] / http['seconds'] / (engine['tokens'] / engine['seconds']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
