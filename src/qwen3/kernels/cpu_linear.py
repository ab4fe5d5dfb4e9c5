"""qwen3's CPU GEMV behind the float32 model's projections: `use_cpu_gemv(model)` swaps the linear modules.

At batch 1 on the CPU a decode step streams every weight matrix once, and PyTorch's float32 GEMV reads them at
~15 GB/s where the machine gives ~40 with enough memory requests in flight (benchmarks/RESULTS.md). `CpuGemvLinear`
sends inputs of at most `max_rows` rows through `cpu_gemv.float_gemv` (prefetching, one pass over the weights) and
everything else through F.linear: prefill, training (a gradient to carry), bfloat16 weights, other devices, or a
machine where the kernel cannot be built (then `use_cpu_gemv` swaps nothing and says so by returning 0).

As `use_gemv` does for CUDA (gemv_linear.py), the new modules are subclasses of nn.Linear holding the *same*
Parameters under the same names: no memory moves, state_dict keys are unchanged, a tied LM head still shares the
embedding's matrix. Only modules of exactly type nn.Linear are swapped. This module does not import triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_gemv

FLOAT_MAX_ROWS = 4  # x rows the kernel keeps in registers in one pass over the weights (AVX-512; 2 with AVX2)


class CpuGemvLinear(nn.Linear):
    """An nn.Linear holding another one's Parameters (no copy) whose forward takes qwen3's CPU GEMV for at most
    `max_rows` rows of float32 input on float32 weights, and F.linear otherwise."""

    def __init__(self, linear: nn.Linear, max_rows: int = FLOAT_MAX_ROWS) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: tying and names kept
        self.max_rows = max_rows
        self.train(linear.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_rows={self.max_rows}"

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and w.device.type == "cpu"
            and w.is_contiguous()
            and x.numel() <= self.max_rows * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and cpu_gemv.available()  # QWEN3_CPU_KERNEL=0 set after the swap: F.linear again
        ):
            y = cpu_gemv.float_gemv(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


def use_cpu_gemv(model: nn.Module, max_rows: int = FLOAT_MAX_ROWS) -> int:
    """Swap, in place, every nn.Linear (exact type) with float32 weights on the CPU for a CpuGemvLinear sharing its
    Parameters. Returns how many modules were swapped: 0 where the kernel is not available here."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows={max_rows!r} must be an integer >= 1")
    if not cpu_gemv.available():
        return 0
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name and module.weight.device.type == "cpu":
            if module.weight.dtype == torch.float32:
                model.set_submodule(name, CpuGemvLinear(module, max_rows))
                count += 1
    return count
