"""Where the CPU int8 decode time goes: one int8 GEMV (batch 1) with its weights coming from DRAM.

A decode step reads every matrix once, so a benchmark that multiplies the same small matrix again and
again measures the cache, not the memory (this machine reports a 260 MB L3). Here each call gets the next
of enough distinct matrices (C x N x K bytes) to overflow it, as a decode step does.

Compared, in one run (GB/s of weight bytes read; ratios against the kernel qwen3 uses, int8pack):
- fp32 `F.linear` (MKL) on fp32 weights: the memory system's reach on this machine;
- `torch._weight_int8pack_mm` with bfloat16 x: what Int8Linear calls on the CPU (quantize.py);
- inductor's fused dequantising reduction, `(x * q).sum(-1) * s` under torch.compile;
- a prototype AVX-512 kernel (below, built with torch.utils.cpp_extension; needs `pip install ninja`, a
  C++ compiler and an AVX-512 CPU): four rows at a time and software prefetch a few rows ahead.
The prototype is a measurement, not part of qwen3: see NOTES.md for what it says.

With `--decode`, it also times whole int8 decode steps of a random-init Qwen3-0.6B (fp32 activations,
int8 weights): first as qwen3 runs them (int8pack), then with the prototype swapped into every
Int8Linear, to see what the kernel would give end to end.

    python benchmarks/int8_gemv_cpu.py [--threads 2] [--decode [--checkpoint DIR]]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROTOTYPE = r"""
#include <torch/extension.h>
#include <immintrin.h>

// y (1, N) = (x (1, K) . q (N, K)^T) * s (N): x, s float32, q int8 row-major, K % 64 == 0, N % 4 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t K = x.size(1), N = q.size(0);
  auto y = torch::empty({1, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t ROWS = 4, AHEAD = 8;  // rows per iteration; prefetch distance in rows
  #pragma omp parallel for schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += ROWS) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
      for (int r = 0; r < ROWS; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(qp + (n0 + r + AHEAD) * K + k), _MM_HINT_T0);  // never faults
      for (int64_t kk = k; kk < k + 64; kk += 16) {
        const __m512 xv = _mm512_loadu_ps(xp + kk);
        for (int r = 0; r < ROWS; ++r) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qp + (n0 + r) * K + kk));
          acc[r] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), acc[r]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) yp[n0 + r] = _mm512_reduce_add_ps(acc[r]) * sp[n0 + r];
  }
  return y;
}
"""


def build_prototype():
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"]
    return load_inline("qwen3_int8_gemv_prototype", cpp_sources=PROTOTYPE, functions=["int8_gemv"],
                       extra_cflags=flags, extra_ldflags=["-fopenmp"])  # fmt: skip


def from_dram(fn, weights) -> float:
    """Seconds per call, each call on the next matrix (none of them in cache when it is reached)."""
    for w in weights[:3]:
        fn(w)
    start = time.perf_counter()
    for w in weights:
        fn(w)
    return (time.perf_counter() - start) / len(weights)


def decode_ms_per_token(model, steps: int = 30) -> tuple[float, list[int]]:
    """Mean ms per greedy decode step after a 32-token prefill, and the tokens it chose."""
    from qwen3.generate import decode_one, prefill
    from qwen3.model import KVCache

    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 1, 32 + steps + 4, dtype=torch.float32)
    tokens = []
    with torch.inference_mode():
        token = prefill(model, prompt, torch.tensor([32]), cache).argmax(-1)
        for position in range(32, 35):  # warm-up
            token = decode_one(model, token, torch.tensor([position]), cache).argmax(-1)
        start = time.perf_counter()
        for position in range(35, 35 + steps):
            token = decode_one(model, token, torch.tensor([position]), cache).argmax(-1)
            tokens.append(token.item())
    return (time.perf_counter() - start) / steps * 1e3, tokens


def decode_comparison(checkpoint, prototype) -> None:
    import qwen3
    from qwen3.quantize import Int8Linear, quantize_int8

    if checkpoint is None or not (checkpoint / "model.safetensors").exists():
        import tempfile

        from decode import make_checkpoint  # benchmarks/decode.py: the same random-init 0.6B

        checkpoint = checkpoint or Path(tempfile.mkdtemp()) / "qwen3-0.6b-random"
        make_checkpoint(checkpoint)
    model = quantize_int8(qwen3.load_model(checkpoint, dtype=torch.float32))
    ms_int8pack, tokens_int8pack = decode_ms_per_token(model)

    def prototype_forward(self: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).float().contiguous()
        if x2d.shape[0] != 1:  # the prototype does one row; prefill keeps qwen3's path
            return Int8Linear.forward(self, x)
        y = prototype.int8_gemv(x2d, self.weight, self.weight_scale.float())
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.forward = prototype_forward.__get__(module)
    ms_prototype, tokens_prototype = decode_ms_per_token(model)
    same = next((i for i, (a, b) in enumerate(zip(tokens_int8pack, tokens_prototype, strict=True)) if a != b), 30)
    print("\nint8 decode step, Qwen3-0.6B shape, fp32 activations (30 steps after a 32-token prompt)")
    print("| Int8Linear kernel | ms per token | tokens/s |")
    print("|---|---|---|")
    for name, ms in (("int8pack (qwen3 today)", ms_int8pack), ("prototype AVX-512 + prefetch", ms_prototype)):
        print(f"| {name} | {ms:.1f} | {1e3 / ms:.1f} |")
    print(f"greedy tokens identical for the first {same} of 30 (int8pack rounds x to bf16; the prototype does not)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--megabytes", type=int, default=320, help="int8 bytes cycled through (> the L3)")
    parser.add_argument("--decode", action="store_true", help="also time whole int8 decode steps (0.6B)")
    parser.add_argument("--checkpoint", type=Path, help="a saved random 0.6B checkpoint to reuse (--decode)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, K = args.out_features, args.in_features
    count = max(4, args.megabytes * 2**20 // (N * K))
    qs = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(count)]
    s, x = torch.rand(N) / 127, torch.randn(1, K)
    exact = (x.double() @ qs[0].double().T) * s.double()

    def error(y: torch.Tensor) -> float:
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    rows = []  # (name, seconds per call, bytes per call, relative error)
    xb, sb = x.bfloat16(), s.bfloat16()
    rows.append(("int8pack, bf16 x (qwen3's CPU kernel)", from_dram(lambda q: torch._weight_int8pack_mm(xb, q, sb), qs),
                 N * K, error(torch._weight_int8pack_mm(xb, qs[0], sb))))  # fmt: skip
    fused = torch.compile(lambda x, q, s: (x[:, None, :] * q[None].to(x.dtype)).sum(-1) * s, dynamic=False)
    rows.append(("inductor fused dequant + reduction, fp32", from_dram(lambda q: fused(x, q, s), qs), N * K,
                 error(fused(x, qs[0], s))))  # fmt: skip
    prototype = None
    try:
        prototype = build_prototype()
        rows.append(("prototype AVX-512 + prefetch, fp32", from_dram(lambda q: prototype.int8_gemv(x, q, s), qs),
                     N * K, error(prototype.int8_gemv(x, qs[0], s))))  # fmt: skip
    except Exception as e:  # no compiler, no ninja or no AVX-512: say so and measure the rest
        print(f"prototype kernel not built: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    del qs
    fp32 = [torch.randn(N, K) for _ in range(max(4, count // 4))]
    rows.append(("fp32 F.linear (MKL), fp32 weights", from_dram(lambda w: F.linear(x, w), fp32), N * K * 4, 0.0))

    base = rows[0][2] / rows[0][1]
    print(f"\nGEMV 1 x {K} @ {K} x {N}, weights from DRAM, {args.threads} threads")
    print("| kernel | us per call | GB/s | vs int8pack | max rel. error |")
    print("|---|---|---|---|---|")
    for name, seconds, nbytes, err in rows:
        print(f"| {name} | {seconds * 1e6:.0f} | {nbytes / seconds / 1e9:.1f} | {nbytes / seconds / base:.2f}x | "
              f"{err:.1e} |")  # fmt: skip
    if args.decode and prototype is not None:
        decode_comparison(args.checkpoint, prototype)


if __name__ == "__main__":
    main()
