"""The streaming engine loop against `LLM.generate` on the same requests, in one process, no HTTP and no threads.

    python benchmarks/engine_loop.py                  # CUDA: random-init Qwen3-0.6B in bf16; CPU: the demo model
    python benchmarks/engine_loop.py --compile --py-spy loop.txt

Why: at 256 streams the server's engine steps took 7.6 ms where `LLM.generate` on the same requests takes ~4.8,
and the in-process AsyncLLM is as slow as the server. This separates the suspects on one LLM, one after the other:

- `generate`: every request added at once, the plain step loop (what `LLM.generate` does, minus its progress bar);
- `loop, all at once`: the same arrivals through `EngineLoop` (engine_loop.py, what the engine process runs): the
  streamed text, the deltas and the outputs of every pass are the only difference;
- `loop, closed at C`: C requests in flight, and a request that ends is replaced on the loop's next pass (a server's
  clients at zero network latency): the arrivals now come one or two per step, so most steps mix a prompt into the
  decodes, as they do behind the server.

For each it prints output tokens/s and, per pass of the loop, the median wall time of the passes with and without
prompt tokens, split into the time inside `LLM.step` and the rest (the loop's own work). `--py-spy FILE` records
the measured part (not the model build or the compile) with py-spy; summarise it with
`python benchmarks/spy_summary.py FILE`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
QWEN3_TOKENIZER = ROOT / "tests" / "assets" / "qwen3-0.6b"
PR_SET_PTRACER = 0x59616D61  # prctl: which process may ptrace this one (-1: any)


def build_llm(args: argparse.Namespace):
    from qwen3 import Qwen3Config, Qwen3ForCausalLM, load_tokenizer
    from qwen3.engine import LLM

    if args.device.startswith("cuda"):
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Qwen3ForCausalLM(Qwen3Config.from_preset("0.6B"))
            model.init_weights()
        model = model.to(torch.bfloat16).eval()
        return LLM(model, tokenizer=load_tokenizer(QWEN3_TOKENIZER), max_num_seqs=args.concurrency,
                   max_model_len=2048, compile=args.compile)  # fmt: skip
    return LLM("demo", device="cpu", max_num_seqs=args.concurrency, max_model_len=256)


class TimedLLM:
    """The LLM as EngineLoop sees it, with each step's wall time and token counts recorded."""

    def __init__(self, llm) -> None:
        self._llm, self.steps = llm, []

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def step(self):
        start = time.perf_counter()
        touched = self._llm.step()
        self.steps.append((time.perf_counter() - start, self._llm.last_step_tokens[0]))
        return touched


def run_generate(llm, prompts, params) -> tuple[float, list, list]:
    seqs = [llm.make_sequence(i, p, params, f"g{i}", stream=False) for i, p in enumerate(prompts)]
    for seq in seqs:
        llm.add(seq)
    steps = []
    start = time.perf_counter()
    while llm.has_work():
        t = time.perf_counter()
        llm.step()
        steps.append((time.perf_counter() - t, llm.last_step_tokens[0]))
    return time.perf_counter() - start, steps, steps


def run_loop(llm, prompts, params, concurrency: int | None) -> tuple[float, list, list]:
    """EngineLoop over `prompts`: all added at once (concurrency None), or `concurrency` in flight."""
    from qwen3.engine.engine_loop import EngineLoop

    timed = TimedLLM(llm)
    queue = list(enumerate(prompts))
    first = len(queue) if concurrency is None else concurrency
    inbox = [("add", (f"l{i}", p, params)) for i, p in queue[:first]]
    del queue[:first]
    passes: list[tuple[float, int]] = []  # (seconds, prompt tokens of its step) per pass, from receive to receive
    last: list[float] = []

    def receive(block: bool) -> list:
        nonlocal inbox
        now = time.perf_counter()
        if last:
            passes.append((now - last[0], llm.last_step_tokens[0]))
        last[:] = [now]
        items, inbox = inbox, []
        if block and not items:
            items.append(("stop", None))
        return items

    def emit(outputs, stats) -> None:
        for _, out in outputs:
            if not isinstance(out, BaseException) and out.finished and queue:
                i, p = queue.pop(0)
                inbox.append(("add", (f"l{i}", p, params)))

    start = time.perf_counter()
    EngineLoop(timed, receive, emit).run()
    return time.perf_counter() - start, timed.steps, passes


def medians(steps: list, passes: list) -> str:
    def med(values):
        return f"{statistics.median(values) * 1e3:.2f}" if values else "-"

    step_decode = [s for s, prefill in steps if prefill == 0]
    step_mixed = [s for s, prefill in steps if prefill > 0]
    pass_decode = [s for s, prefill in passes if prefill == 0]
    pass_mixed = [s for s, prefill in passes if prefill > 0]
    return (f"{len(step_mixed)} / {len(step_decode)} | {med(pass_decode)} | {med(step_decode)} | {med(pass_mixed)} | "
            f"{med(step_mixed)}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="LLM(compile=True) (CUDA)")
    p.add_argument("--concurrency", type=int, default=None, help="in flight (default 256 on CUDA, 16 on CPU)")
    p.add_argument("--requests", type=int, default=None, help="default 8 x concurrency")
    p.add_argument("--input-len", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--output-len", type=int, default=None, help="default 128 on CUDA, 16 on CPU")
    p.add_argument("--py-spy", type=Path, metavar="FILE", help="record the measured runs with py-spy (raw format)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.concurrency = args.concurrency or (256 if cuda else 16)
    n = args.requests or 8 * args.concurrency
    input_len, output_len = args.input_len or (128 if cuda else 32), args.output_len or (128 if cuda else 16)

    from qwen3.sampling import SamplingParams

    llm = build_llm(args)
    vocab = min(10_000, llm.config.vocab_size)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    run_generate(llm, prompts[: args.concurrency], params)  # warm-up: every graph and compiled shape
    run_loop(llm, prompts[: args.concurrency], params, args.concurrency // 2)
    spy = None
    if args.py_spy:
        if sys.platform == "linux":  # let the child below attach to this process where Yama's ptrace_scope is 1
            ctypes.CDLL(None).prctl(PR_SET_PTRACER, ctypes.c_ulong(-1), 0, 0, 0)
        spy = subprocess.Popen(["py-spy", "record", "-r", "200", "--idle", "--threads", "--format", "raw",
                                "-o", str(args.py_spy), "--pid", str(os.getpid())])  # fmt: skip
        time.sleep(2.0)  # py-spy attaches
    runs = []
    for name, run in (
        ("generate", lambda: run_generate(llm, prompts, params)),
        ("loop, all at once", lambda: run_loop(llm, prompts, params, None)),
        (f"loop, closed at {args.concurrency}", lambda: run_loop(llm, prompts, params, args.concurrency)),
    ):
        if cuda:
            torch.cuda.synchronize()
        seconds, steps, passes = run()
        runs.append((name, n * output_len / seconds, medians(steps, passes)))
        print(f"  {name}: {runs[-1][1]:.0f} output tokens/s", flush=True)
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        spy.wait(60)
    machine = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{n} requests x ({input_len} prompt, {output_len} output) tokens, greedy, ignore_eos, "
          f"{args.concurrency} at most in flight, {machine}{', compile=True' if args.compile else ''}\n")  # fmt: skip
    print("| run | output tok/s | vs generate | steps with prompt / decode-only | ms per pass, decode-only | "
          "in LLM.step | ms per pass, with prompt | in LLM.step |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rate, detail in runs:
        print(f"| {name} | {rate:.0f} | {rate / runs[0][1]:.2f} | {detail} |")


if __name__ == "__main__":
    main()
