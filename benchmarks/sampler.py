"""The engine's sampler on one step of Qwen3-sized logits, with Qwen3's default sampling (temperature 0.6, top-k 20,
top-p 0.95, from its generation_config.json): the top-k candidate path against the whole-vocabulary path (a sort
of 151,936 logits per row), in one process, on the same logits. Also plain temperature sampling (the fused Triton
pass on CUDA, the plain exponential race on the CPU).

    python benchmarks/sampler.py [--rows 1 32 256] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import qwen3.engine.sampler as sampler_module
import qwen3.sampling
from qwen3.engine.attention import kernels_for
from qwen3.engine.sequence import Sequence
from qwen3.sampling import SamplingParams

VOCAB = 151_936


def per_step_ms(sampler, logits: torch.Tensor, seqs: list[Sequence], device: str) -> float:  # noqa: ANN001
    """Best of 5 x 10 calls of sampler(logits, seqs), in ms."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        sampler(logits, seqs)
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            sampler(logits, seqs)
        sync()
        best = min(best, (time.perf_counter() - start) / 10)
    return 1000 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = getattr(kernels_for(device), "sample", None)
    defaults = SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    plain = SamplingParams(temperature=0.6)
    print(f"sampler, one step of (rows, {VOCAB:,}) {dtype} logits on {args.device}, torch {torch.__version__}")
    print("| rows | top-k 20 + top-p 0.95: candidates ms | whole vocabulary ms | speed-up | temperature only ms |")
    print("|---|---|---|---|---|")
    gen = torch.Generator(device=device).manual_seed(0)
    for rows in args.rows:
        logits = (3 * torch.randn(rows, VOCAB, generator=gen, device=device)).to(dtype)
        seqs = [Sequence(str(i), [1, 2], defaults, -1) for i in range(rows)]
        sampler = sampler_module.Sampler(max(rows, 1), VOCAB, device, fused_sample=fused)
        limit = qwen3.sampling.TOP_K_CANDIDATES
        candidates = per_step_ms(sampler, logits, seqs, args.device)
        qwen3.sampling.TOP_K_CANDIDATES = 0  # every row takes the whole-vocabulary path
        try:
            whole = per_step_ms(sampler, logits, seqs, args.device)
        finally:
            qwen3.sampling.TOP_K_CANDIDATES = limit
        temperature = per_step_ms(sampler, logits, [Sequence(str(i), [1, 2], plain, -1) for i in range(rows)],
                                  args.device)  # fmt: skip
        print(f"| {rows} | {candidates:.3f} | {whole:.3f} | {whole / candidates:.1f}x | {temperature:.3f} |")
    # qwen3.sampling.sample, the sampler of qwen3.generate (the CPU's chat and generate), at one row
    logits = (3 * torch.randn(1, VOCAB, generator=gen, device=device)).to(dtype)
    reference = [per_step_ms(lambda x, _: qwen3.sampling.sample(x, defaults), logits, [], args.device)]
    qwen3.sampling.TOP_K_CANDIDATES = 0
    try:
        reference.append(per_step_ms(lambda x, _: qwen3.sampling.sample(x, defaults), logits, [], args.device))
    finally:
        qwen3.sampling.TOP_K_CANDIDATES = limit
    print(f"\nqwen3.sampling.sample, 1 row, top-k 20 + top-p 0.95: candidates {reference[0]:.3f} ms, filter_logits "
          f"(a sort of the vocabulary) {reference[1]:.3f} ms")

if __name__ == "__main__":
    main()
