"""Fast kernels beside the plain PyTorch paths, each checked against a reference in tests/test_kernels.py.

- `int8_cpu`: int8 weight-only GEMV for x86 CPUs (AVX-512 / AVX2), built with the system compiler on
  first use; Int8Linear's "auto" kernel takes it for CPU inputs of few rows.
- `gemv_triton`: Triton split-K GEMV / small-M matmul (bf16 or int8 weights) and fused residual-add +
  RMSNorm for GPUs, and the GEMV as the custom op torch.ops.qwen3.gemv. Imports triton; nothing in qwen3
  imports it at import time.
- `gemv_linear`: `use_gemv(model)` puts that GEMV behind the model's projections for few rows on CUDA (module
  swap; Parameters shared). Imports triton.
"""
