"""Fast kernels beside the plain PyTorch paths, each checked against a reference in tests/test_kernels.py.

- `cpu_gemv`: GEMV for x86 CPUs (AVX-512 / AVX2) over int8 weights with per-row scales or float32 weights,
  built with the system compiler on first use; Int8Linear's "auto" kernel takes it for CPU inputs of few rows.
- `cpu_linear`: `use_cpu_gemv(model)` puts the float32 GEMV behind the model's projections for few rows on the
  CPU (module swap; Parameters shared); `qwen3 generate` and `chat` do it on the CPU.
- `gemv_triton`: Triton split-K GEMV / small-M matmul (bf16 or int8 weights) and fused residual-add +
  RMSNorm for GPUs, and the GEMV as the custom op torch.ops.qwen3.gemv. Imports triton; nothing in qwen3
  imports it at import time.
- `gemv_linear`: `use_gemv(model)` puts that GEMV behind the model's projections for few rows on CUDA (module
  swap; Parameters shared). Imports triton.

The engine's own kernels (paged attention, the fused sampler, the persistent batch-1 decode step) live in engine/.
"""
