"""Where a decode step's time goes: profile the fast path (compile + CUDA graph) of random-init Qwen3-0.6B.

Prints the wall time per token, the GPU kernels launched per token, the GPU busy time per token and the
kernels that take the most time. See NOTES.md for what the numbers are compared with.

    python benchmarks/profile_decode.py [--dtype bfloat16] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import qwen3
from qwen3.generate import DecodeStep, prefill
from qwen3.model import KVCache
from qwen3.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config.from_preset("0.6B")).to(dtype)
    model.init_weights()
    model.eval()
    T, S = args.prompt, args.prompt + args.steps + 8
    cache = KVCache(model.config, 1, S, device=device, dtype=dtype)
    step = DecodeStep(model, cache, SamplingParams(temperature=0.0), None, compile=True)
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, T), device=device)
        token = prefill(model, ids, torch.tensor([T], device=device), cache).argmax(-1)
        start = time.perf_counter()
        token = step(token, torch.tensor([T], device=device))  # compile + capture
        torch.cuda.synchronize()
        print(f"compile + capture: {time.perf_counter() - start:.1f} s", flush=True)
        positions = [torch.tensor([T + 1 + i], device=device) for i in range(args.steps)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for pos in positions:
            token = step(token, pos)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for pos in positions:
                token = step(token, pos)
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time)
    launches = sum(len(v) for v in kernels.values()) / args.steps
    busy = sum(sum(v) for v in kernels.values()) / args.steps / 1e3  # ms
    print(f"wall per token {wall * 1e3:.3f} ms ({1 / wall:.0f} tokens/s); kernels per token {launches:.0f}; "
          f"GPU busy per token {busy:.3f} ms; mean kernel {busy * 1e3 / launches:.1f} us")  # fmt: skip
    print(f"{'kernel':<90}{'per token':>10}{'us each':>10}{'share':>8}")
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:25]
    for name, times in rows:
        total = sum(times) / args.steps
        print(f"{name[:88]:<90}{len(times) / args.steps:>10.0f}{total / (len(times) / args.steps):>10.1f}"
              f"{total / 1e3 / busy:>8.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
