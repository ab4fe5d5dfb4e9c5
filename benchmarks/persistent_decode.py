"""The persistent decode step (qwen3/engine/triton_persistent.py) on Qwen3-0.6B: correct, and how fast?

Random-init Qwen3-0.6B in bf16; a 32-token prompt (--prompt) through the model with a KVCache; then one token at a time:
1. correctness: the kernel with one program per SM against the model's `hidden_states` on the same cache (bf16
   tolerance), and against itself with one program (same synchronisation-free order);
2. speed: GPU time per token of the 28 layers (CUDA events around 128 consecutive steps), for a few launch shapes,
   against the bytes of the layers' weights (0.88 GB: 3.2 TB/s would be 0.28 ms), and against the engine's compiled
   batch-1 layers (layers_autotune.py, 2026-12-02: 38.3 us per layer, 1.07 ms per token).

    python benchmarks/persistent_decode.py                  # CUDA (~1 minute on an H200)
    TRITON_INTERPRET=1 python benchmarks/persistent_decode.py --device cpu --layers 2 --steps 2   # dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

import qwen3
from qwen3.engine.triton_persistent import Launch, StackedWeights, decode_step

LAUNCHES = {  # offline for sm_90 (2026-12-02): 240 registers at 8 warps, 127 at 16, no spills; 4 warps spill
    "default": Launch(),  # one thread polls each counter with an atomic; no L2 prefetch
    "poll-load": Launch(poll_load=True),  # every thread polls with an acquire load
    "ahead2": Launch(prefetch_ahead=2),  # each program asks L2 for its weights two weight phases ahead
    "ahead4": Launch(prefetch_ahead=4),  # a whole layer ahead
    "late-loads": Launch(late_loads=True),  # weights loaded after the wait, not before
    "no-wait": Launch(no_wait=True),  # no synchronisation at all: what the loads and the arithmetic cost alone
    "warps16": Launch(num_warps=16),
    "splits8": Launch(splits=8),
    "splits32": Launch(splits=32),  # 256 attention tasks: two per program
}
PHASES = ("qkv", "attention + merge", "o_proj", "gate/up", "down")


def timeline(trace: torch.Tensor, layers: int) -> str:
    """Where a step's time goes, from the global timer after each phase's wait and after its signal (per program):
    per phase, averaged over the layers, the span from the first program's release to the last signal, the median
    task (release to signal), and the handoff from the phase's last signal to the next phase's first release."""
    trace = trace[:, :layers]
    has = trace[..., 0] > 0  # 0 where a program had no task in the phase
    base = trace[trace > 0].min()
    t = (trace - base).double() / 1e3  # us since the first stamp (the timer's ns would lose precision in a double)
    big = torch.tensor(float("inf"), dtype=torch.float64)
    released = torch.where(has, t[..., 0], big).amin(0)  # (layers, 5)
    done = torch.where(has, t[..., 1], -big).amax(0)
    work = torch.where(has, t[..., 1] - t[..., 0], torch.tensor(float("nan"), dtype=torch.float64))
    median = work.nanmedian(0).values  # (layers, 5)
    flat_released = released.flatten()  # in step order: layer by layer, phase by phase
    handoff = (flat_released[1:] - done.flatten()[:-1]).view(-1)
    handoff = torch.cat([handoff, torch.zeros(1, dtype=torch.float64)]).view(layers, 5)
    lines = ["| phase | span: first release to last signal (us) | median task (us) | handoff to the next phase (us) |",
             "|---|---|---|---|"]  # fmt: skip
    for p, name in enumerate(PHASES):
        lines.append(f"| {name} | {(done[:, p] - released[:, p]).mean():.2f} | {median[:, p].mean():.2f} | "
                     f"{handoff[:-1 if p == 4 else None, p].mean():.2f} |")  # fmt: skip
    total = done[-1, 4] - released[0, 0]
    lines.append(f"\nstep: {total:.0f} us from the first release to the last signal ({total / layers:.2f} us per "
                 "layer)")  # fmt: skip
    return "\n".join(lines)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="tokens in the cache before the timed steps")
    parser.add_argument("--launches", default=",".join(LAUNCHES))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1, one program")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--trace", default="", help="CUDA: comma list of launches whose step to time phase by phase")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("persistent_decode.py needs CUDA (or --device cpu under TRITON_INTERPRET=1)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import fix_triton_interpreter_scalars, kv_cache_to_pool

    if device == "cpu":  # Triton 3.6's interpreter needs its scalar patch
        fix_triton_interpreter_scalars()
    torch.manual_seed(0)
    config = dataclasses.replace(qwen3.Qwen3Config.from_preset("0.6B"), num_hidden_layers=args.layers)
    model = qwen3.Qwen3ForCausalLM(config)
    model.init_weights()
    model = model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    weights = StackedWeights.from_model(model)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    prompt = args.prompt
    max_length = prompt + args.steps + 8
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + args.steps), device=device)
    cache = qwen3.KVCache.for_model(model, 1, max_length)
    layer_bytes = sum(t.numel() * t.element_size() for t in (weights.qkv, weights.o_proj, weights.gate_up,
                                                              weights.down))  # fmt: skip
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"# {datetime.date.today()}, {where}, torch {torch.__version__}, {sms} SMs: "
          f"persistent_decode.py; layers' weights {layer_bytes / 1e9:.3f} GB per token")  # fmt: skip
    with torch.no_grad():
        model(ids[:, :prompt], cache=cache, positions=torch.arange(prompt, device=device)[None])
        block_size = 16
        pool0, table = kv_cache_to_pool(cache.k[:, 0], cache.v[:, 0], prompt, block_size,
                                        max_length // block_size + 8, torch.Generator().manual_seed(0))  # fmt: skip
        pool = pool0.clone()

        def slot_of(p: int) -> torch.Tensor:
            return (table[p // block_size] * block_size + p % block_size).view(1)

        # 1. correctness at the first step
        token = ids[:, prompt : prompt + 1]
        want = model.hidden_states(token, torch.tensor([[prompt]], device=device), cache)[0, 0].float()
        for label, launch in LAUNCHES.items():
            if launch.no_wait:  # wrong by design with several programs
                continue
            outs = []
            for n in (sms, 1):
                pool.copy_(pool0)
                x = model.model.embed_tokens(token)[0, 0].contiguous()
                position = torch.tensor([prompt], device=device)
                decode_step(weights, x, position, slot_of(prompt), pool, table, model.rope.cos, model.rope.sin, n,
                            launch)  # fmt: skip
                outs.append(model.model.norm(x).float())
            err = ((outs[0] - want).norm() / want.norm()).item()
            same = torch.equal(outs[0], outs[1])
            print(f"{label}: {sms} programs vs the model: rel err {err:.2e}; {sms} vs 1 program identical: {same}",
                  flush=True)  # fmt: skip

        # 2. speed
        print(f"\n| launch | us per token ({args.layers} layers) | GB/s of layer weights | vs the engine's 1.07 ms "
              "(28 layers) |")  # fmt: skip
        print("|---|---|---|---|")
        for label in args.launches.split(","):
            launch = LAUNCHES[label]
            pool.copy_(pool0)
            warm = range(prompt, prompt + min(8, args.steps))
            xs = [model.model.embed_tokens(ids[:, p : p + 1])[0, 0].contiguous() for p in warm]
            for i, x in enumerate(xs):  # warm-up (compile): the first few positions
                position = torch.tensor([prompt + i], device=device)
                decode_step(weights, x, position, slot_of(prompt + i), pool, table, model.rope.cos, model.rope.sin,
                            sms, launch)  # fmt: skip
            sync(device)
            pool.copy_(pool0)
            positions = range(prompt, prompt + args.steps)
            xs = [model.model.embed_tokens(ids[:, p : p + 1])[0, 0].contiguous() for p in positions]
            where = [(torch.tensor([p], device=device), slot_of(p)) for p in positions]
            t0 = time.perf_counter()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device == "cuda" else None
            if events:
                events[0].record()
            for x, (position, slot) in zip(xs, where, strict=True):  # the prompt's next ids: the same cost
                decode_step(weights, x, position, slot, pool, table, model.rope.cos, model.rope.sin, sms, launch)
            if events:
                events[1].record()
            sync(device)
            host = (time.perf_counter() - t0) / args.steps
            us = events[0].elapsed_time(events[1]) * 1e3 / args.steps if events else host * 1e6
            print(f"| {label} | {us:.0f} (host {host * 1e6:.0f}) | {layer_bytes / us / 1e3:.0f} | x{1070 / us:.2f} |",
                  flush=True)  # fmt: skip
        # 3. where the time goes (the kernel compiled with the global-timer stamps: a little slower than above)
        for label in filter(None, args.trace.split(",")):
            pool.copy_(pool0)
            trace = torch.zeros(sms, 64, 5, 2, dtype=torch.int64, device=device)
            for i in range(3):  # compile, then the last run's stamps
                x = model.model.embed_tokens(ids[:, prompt + i : prompt + i + 1])[0, 0].contiguous()
                decode_step(weights, x, torch.tensor([prompt + i], device=device), slot_of(prompt + i), pool, table,
                            model.rope.cos, model.rope.sin, sms, LAUNCHES[label], trace=trace)  # fmt: skip
            sync(device)
            print(f"\n#### {label}: one step, phase by phase ({args.layers} layers, context {prompt + 3})\n")
            print(timeline(trace.cpu(), args.layers), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
