"""The Triton split-K GEMV behind the model's projections at decode: `use_gemv(model)` swaps the linear modules.

At batch 1 a decode step multiplies one row (M = 1) by every weight matrix, and cuBLAS reads Qwen3-0.6B's small
matrices at about a sixth of the bandwidth (benchmarks/NOTES.md); `gemv_triton.gemv` splits K over all SMs.
`use_gemv(model, max_rows=16)` replaces, in place, every `nn.Linear` (qkv, o, gate_up, down, the LM head) by a
`GemvLinear` and every `Int8Linear` by a `GemvInt8Linear`. On CUDA, an input of at most `max_rows` rows (the
product of its leading dimensions) goes through `torch.ops.qwen3.gemv` (int8 weights through the kernel's int8
path: half the bytes of bf16, the scale applied once to the fp32 sum); more rows (prefill) take the module's
usual path, `F.linear` or `Int8Linear.forward`. On the CPU the modules compute exactly what they replaced
(`allow_cpu=True` sends CPU tensors through the kernel too: for tests under TRITON_INTERPRET=1). When gradients
flow (training) they take the usual path as well: the kernel has no backward.

Why a module swap, and why subclasses. nn.Linear has no switch to flip and model.py stays the textbook model, so
the fast path comes from outside, as `quantize_int8` does. The new modules are subclasses of what they replace
(`GemvLinear(nn.Linear)`, `GemvInt8Linear(Int8Linear)`) and register the *same* Parameter objects under the same
names: no memory moves, state_dict keys are unchanged, a tied LM head still shares the embedding's matrix, and
code that asks `isinstance(m, nn.Linear)` or `isinstance(m, Int8Linear)` (quantize, info, LoRA, saving) sees what
it saw before. Only modules of exactly those two types are swapped: subclasses such as the tensor-parallel
linears (parallel.py) carry a collective in their forward and are left alone. For int8 a subclass, rather than
one more `Int8Linear.kernel` value, keeps quantize.py free of triton and its CPU "auto" rule as it is.
Call `use_gemv` after `quantize_int8` (quantize_int8 turns a GemvLinear into a plain Int8Linear);
`remove_gemv(model)` swaps the plain modules back.

torch.compile: the op is opaque (torch.library.custom_op with a fake impl). Not a triton_op as the engine's
paged-attention ops (engine/compiled.py): a triton_op's fake impl is its body, and under TRITON_INTERPRET=1
wrap_triton hands back the interpreted kernel, which then runs on fake tensors and fails, so the CPU tests could
not compile through it; inductor would not fuse into the kernel either way. The row test uses
`statically_known_true`, so a symbolic row count (the engine marks its batch dynamic from 16 sequences) takes the
usual path without adding a guard, and a static count of at most `max_rows` takes the op. Inside a CUDA graph
the op's launches are captured like any other kernel, and its output and split-K partials come from the caching
allocator at each call (the graph's pool under capture).

One launch per projection: each module owns the int32 counters with which the last split-K program of an
output tile sums the partials in the GEMV's own launch (gemv_triton.py). They are a non-persistent buffer
(state_dict unchanged; `.to()` moves them), created zero on the weight's device and sized for every launch
shape of up to `max_rows` rows (setting `max_rows` grows them); every call leaves them zero, so CUDA graphs
replay them as captured. Counters on another device than the input (a module built on the meta device whose
weight was assigned later) are left out: the GEMV then takes two launches, with the same result.

This module imports triton (through gemv_triton).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..quantize import Int8Linear
from .gemv_triton import FLOAT_DTYPES, gemv_max_tiles, gemv_op

GEMV_MAX_ROWS = 16  # the kernel is made for M <= 16 (rows padded to 16 for tl.dot); prefill takes cuBLAS


def takes_gemv(x: Tensor, weight: Tensor, max_rows: int, allow_cpu: bool = False) -> bool:
    """Whether x @ weight^T goes through the GEMV op: few rows (known without a guard), CUDA (or allow_cpu),
    x in a float dtype and weight in x's dtype or int8, no gradient to carry."""
    if not (x.is_cuda or allow_cpu) or x.device != weight.device:
        return False
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in (x.dtype, torch.int8):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return statically_known_true(math.prod(x.shape[:-1]) <= max_rows)


def gemv_linear(x: Tensor, weight: Tensor, scale: Tensor | None = None, counters: Tensor | None = None) -> Tensor:
    """y (..., N) = (x (..., K) @ weight (N, K)^T) * scale through torch.ops.qwen3.gemv (x flattened to 2-D);
    counters (zeroed int32 scratch, `gemv_max_tiles` of the rows) make it one launch. Counters on another device
    than x (a module built on the meta device whose weight was assigned later) are left out: two launches."""
    if counters is not None and counters.device != x.device:
        counters = None
    y = gemv_op(x.reshape(-1, x.shape[-1]), weight, scale, counters)  # (M, N)
    return y.view(*x.shape[:-1], weight.shape[0])


def _check_max_rows(max_rows: int) -> int:
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
        raise ValueError(f"max_rows={max_rows!r} must be a non-negative integer (0 turns the GEMV path off)")
    return max_rows


class _GemvCounters:
    """The split-K counters of a GEMV module: a non-persistent int32 buffer (state_dict unchanged), all zero
    between calls, sized for every launch `gemv_config` picks for at most `max_rows` rows; setting `max_rows`
    grows it when needed."""

    weight: Tensor
    out_features: int

    @property
    def max_rows(self) -> int:
        return self._max_rows

    @max_rows.setter
    def max_rows(self, max_rows: int) -> None:
        self._max_rows = _check_max_rows(max_rows)
        tiles = gemv_max_tiles(max(1, max_rows), self.out_features)
        counters = getattr(self, "counters", None)
        if counters is None or counters.numel() < tiles:
            device = self.weight.device if counters is None else counters.device
            self.register_buffer("counters", torch.zeros(tiles, dtype=torch.int32, device=device), persistent=False)


class GemvLinear(_GemvCounters, nn.Linear):
    """An nn.Linear holding another one's Parameters (no copy) whose forward takes the Triton GEMV for at most
    `max_rows` rows on CUDA (or on any device with `allow_cpu`) and F.linear otherwise."""

    def __init__(self, linear: nn.Linear, max_rows: int = GEMV_MAX_ROWS, allow_cpu: bool = False) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: tying and names kept
        self.max_rows, self.allow_cpu = max_rows, bool(allow_cpu)  # max_rows sizes the counters
        self.train(linear.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_rows={self.max_rows}"

    def forward(self, x: Tensor) -> Tensor:
        if takes_gemv(x, self.weight, self.max_rows, self.allow_cpu):
            y = gemv_linear(x, self.weight, counters=self.counters)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class GemvInt8Linear(_GemvCounters, Int8Linear):
    """An Int8Linear holding another one's int8 weight and scales (no copy) whose forward takes the Triton GEMV's
    int8 path for at most `max_rows` rows on CUDA (or with `allow_cpu`) and Int8Linear's own otherwise."""

    def __init__(self, linear: Int8Linear, max_rows: int = GEMV_MAX_ROWS, allow_cpu: bool = False) -> None:
        super().__init__(linear.in_features, linear.out_features, device="meta", dtype=linear.weight_scale.dtype)
        self.weight, self.weight_scale = linear.weight, linear.weight_scale  # tied to an Int8Embedding: kept
        self.kernel = linear.kernel
        self.max_rows, self.allow_cpu = max_rows, bool(allow_cpu)  # max_rows sizes the counters
        self.train(linear.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_rows={self.max_rows}"

    def forward(self, x: Tensor) -> Tensor:
        if takes_gemv(x, self.weight, self.max_rows, self.allow_cpu):
            return gemv_linear(x, self.weight, self.weight_scale, self.counters)
        return super().forward(x)


def use_gemv(model: nn.Module, max_rows: int = GEMV_MAX_ROWS, allow_cpu: bool = False, lm_head: bool = True) -> int:
    """Swap, in place, every nn.Linear for a GemvLinear and every Int8Linear for a GemvInt8Linear (exact types
    only), sharing their Parameters; modules swapped before take the new settings. Returns how many modules now
    take the GEMV path for few rows. max_rows=0 keeps the modules but never takes the GEMV. lm_head=False leaves
    `model.lm_head` as it is (cuBLAS already streams that one large matrix near the bandwidth limit)."""
    _check_max_rows(max_rows)
    count = 0
    skip = None if lm_head else getattr(model, "lm_head", None)
    for name, module in list(model.named_modules()):
        if module is skip and skip is not None:
            continue
        if isinstance(module, (GemvLinear, GemvInt8Linear)):
            module.max_rows, module.allow_cpu = max_rows, bool(allow_cpu)
        elif type(module) is nn.Linear and name:
            model.set_submodule(name, GemvLinear(module, max_rows, allow_cpu))
        elif type(module) is Int8Linear and name:
            model.set_submodule(name, GemvInt8Linear(module, max_rows, allow_cpu))
        else:
            continue
        count += 1
    return count


def remove_gemv(model: nn.Module) -> int:
    """Undo `use_gemv`: plain nn.Linear / Int8Linear modules holding the same Parameters. Returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, GemvLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
        elif isinstance(module, GemvInt8Linear):
            plain = Int8Linear(module.in_features, module.out_features, device="meta",
                               dtype=module.weight_scale.dtype)  # fmt: skip
            plain.weight, plain.weight_scale, plain.kernel = module.weight, module.weight_scale, module.kernel
        else:
            continue
        model.set_submodule(name, plain.train(module.training))
        count += 1
    return count
