"""Where an engine step's time goes, on a steady decode batch: host phases (scheduler, runner packing, forward
launch, sampler, read-back) timed with the device synchronised around each, then torch.profiler's top kernels.

    python benchmarks/profile_engine.py [--seqs 256] [--context 800] [--steps 30] [--compile] [--gemv] [--int8]
                                        [--then 64,8,1]
    python benchmarks/profile_engine.py --prefill [--seqs 32] [--context 512]   # the first steps: prompts only

Random-init Qwen3-0.6B in bf16 on CUDA (the demo model on the CPU). Prints two tables; nothing is written.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch

import qwen3
from qwen3.engine import LLM
from qwen3.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--context", type=int, default=800, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--prefill", action="store_true",
                   help="profile the prompt steps (the whole prefill of --seqs prompts) instead of steady decode")
    p.add_argument("--compile", action="store_true", help="LLM(compile=True): the decode graphs run a compiled forward")
    p.add_argument("--gemv", action="store_true", help="LLM(gemv=True): the Triton GEMV behind the projections")
    p.add_argument("--int8", action="store_true", help="int8 weight-only projections (qwen3.quantize_int8) first")
    p.add_argument("--then", default="", help="comma list of smaller batches to profile next, on the same engine "
                   "(aborting sequences down to each): one start-up, the fixed cost of a step at several sizes")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.manual_seed(0)
        model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config.from_preset("0.6B")).to(torch.bfloat16).cuda()
        model.init_weights()
        model.init_buffers("cuda")
    else:
        model = qwen3.load_model("demo")
        args.context = min(args.context, 200)
    if args.int8:
        from qwen3.quantize import quantize_int8

        quantize_int8(model)
    start = time.perf_counter()
    llm = LLM(model, max_num_seqs=args.seqs, max_model_len=4096 if cuda else 1024, compile=args.compile,
              gemv=args.gemv or None)
    print(f"engine start-up {time.perf_counter() - start:.1f} s" + (" (compile=True)" if args.compile else "")
          + (" (gemv=True)" if args.gemv else "") + (" (int8 weights)" if args.int8 else ""))
    rng = random.Random(0)
    vocab = min(10000, model.config.vocab_size - 1)
    prompts = [[rng.randint(0, vocab) for _ in range(args.context)] for _ in range(args.seqs)]
    params = SamplingParams(temperature=args.temperature, max_tokens=10_000, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        llm.add(llm.make_sequence(i, prompt, params, f"p{i}", stream=False))
    if args.prefill:
        profile_prefill(llm, cuda)
        return
    while llm.last_step_tokens[0] or not llm.scheduler.running or llm.scheduler.waiting:  # through the prefill
        llm.step()
    for _ in range(5):
        llm.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Phase timings: wrap the step's parts, synchronising so each phase's device work is charged to it.
    totals: dict[str, float] = defaultdict(float)
    targets = [(llm.scheduler, "schedule"), (llm.runner, "run"), (llm, "_sample"), (llm, "_read_back")]
    originals = {}
    for obj, name in targets:
        original = getattr(obj, name)
        originals[(obj, name)] = original

        def timed(*a, _original=original, _name=name, **k):
            sync()
            start = time.perf_counter()
            out = _original(*a, **k)
            sync()
            totals[_name] += time.perf_counter() - start
            return out

        setattr(obj, name, timed)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    sync()
    wall = time.perf_counter() - start
    for obj, name in targets:
        setattr(obj, name, originals[(obj, name)])
    print(f"{args.seqs} sequences, ~{args.context} tokens of context, {args.steps} decode steps, synchronised phases")
    print("| phase | ms per step |\n|---|---|")
    for name, seconds in totals.items():
        print(f"| {name} | {1000 * seconds / args.steps:.3f} |")
    print(f"| whole step (synchronised) | {1000 * wall / args.steps:.3f} |")

    # Unsynchronised: the real step time, then the profiler's view.
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    sync()
    print(f"| whole step (as the engine runs) | {1000 * (time.perf_counter() - start) / args.steps:.3f} |")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            llm.step()
        sync()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    for batch in [int(b) for b in args.then.split(",") if b]:
        for seq in list(llm.scheduler.running)[batch:]:
            llm.abort(seq)
        for _ in range(5):
            llm.step()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            llm.step()
        sync()
        print(f"\n## {len(llm.scheduler.running)} sequences: whole step (as the engine runs) "
              f"{1000 * (time.perf_counter() - start) / args.steps:.3f} ms")
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                llm.step()
            sync()
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


def profile_prefill(llm: LLM, cuda: bool) -> None:
    """Time each step until every prompt is computed (the engine's own pace), then profile a second, identical
    prefill of fresh prompts (the first one also warmed up the kernels)."""
    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def prefill() -> list[tuple[float, int]]:
        times = []
        while llm.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in llm.scheduler.running):
            sync()
            start = time.perf_counter()
            llm.step()
            sync()
            times.append((time.perf_counter() - start, llm.last_step_tokens[0]))
        return times

    for seconds, tokens in prefill():
        print(f"prefill step: {tokens} prompt tokens in {1000 * seconds:.1f} ms ({tokens / seconds:,.0f} tokens/s)")
    seqs = list(llm.scheduler.running)
    for seq in seqs:
        llm.abort(seq)
    while llm.has_work():
        llm.step()
    rng = random.Random(1)
    params = SamplingParams(temperature=0.6, max_tokens=10_000, ignore_eos=True)
    for i, seq in enumerate(seqs):
        prompt = [rng.randint(0, min(10_000, llm.config.vocab_size - 1)) for _ in range(seq.num_prompt_tokens)]
        llm.add(llm.make_sequence(i, prompt, params, f"q{i}", stream=False))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        times = prefill()
    print(f"profiled prefill: {sum(t for _, t in times)} tokens in {1000 * sum(s for s, _ in times):.1f} ms")
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
