"""Int8 weight-only quantization: per-output-channel symmetric scales, activations stay in float.

Each row j of a weight matrix W (out, in) is stored as int8 q[j] and one float scale s[j]:
    s[j] = max_k |W[j, k]| / 127   (1 for an all-zero row, to avoid dividing by zero)
    q[j] = clamp(round(W[j] / s[j]), -127, 127)
so |W - q s| <= s / 2 elementwise. The scale is rounded to the model's float dtype *before* q is computed,
so the bound holds for the scale that is actually stored (in bf16 the rounded-down scale can clamp the
row maximum, but that error, <= 127 s 2^-9, is still below s / 2; this needs the scale in the dtype's
normal range, i.e. rows with max |w| above ~1e-2 in float16).

Memory: a (out, in) matrix costs out * in bytes plus one float per row, instead of 2 or 4 bytes per weight.

Tied embeddings. The LM head of the small Qwen3s shares its (V, H) matrix with the input embedding:
- `quantize_int8(model)` gives the LM head its own int8 copy and keeps the embedding in float (a row
  lookup costs nothing to dequantise, but the embedding stays full size). The weights are then no longer
  tied: `tied_lm_head(model)` is False (the modules say so; `model.config` is left as it was built), and
  a saved checkpoint says `tie_word_embeddings: false` and stores `lm_head.weight` (int8) beside the float
  embedding. For Qwen3-0.6B in bf16 that is 311 MB of embedding
  plus 156 MB of int8 head, where the float model held one 311 MB matrix.
- `quantize_int8(model, include_embedding=True)` quantizes the embedding per row too (gather, then
  dequantise the gathered rows). Per-row scales of the embedding are per-output-channel scales of the
  LM head, so the two share one int8 matrix and one scale vector and stay tied.

Three ways to compute an Int8Linear, chosen by its `kernel` attribute ("auto", "plain", "int8pack" or
"cpu_gemv"):
- plain: `F.linear(x, q.to(x.dtype)) * s`. The int8 -> float conversion is exact (|q| <= 127), so this
  is the textbook formula; under torch.compile, inductor fuses the conversion into the matmul, which is
  what makes int8 fast on GPU (the matrix is read once, as int8).
- int8pack: `torch._weight_int8pack_mm(x2d, q, s)`, PyTorch's CPU kernel that converts int8 to float
  inside the dot product. What it accepts, measured on torch 2.13 (x86, AVX-512):
  x 2-D, float32 / bfloat16 / float16, scales of x's dtype. Only bfloat16 is vectorised on x86 (AVX-512
  or AVX2); float32 and float16 run a scalar loop, 2-100x slower than the plain path. The bfloat16 kernels
  step through `in_features` 16 (AVX-512) or 8 (AVX2, NEON) at a time with no remainder loop and use
  aligned loads: with in_features = 65 it returns garbage, with 7 it segfaults, and an x whose rows are
  not 32-byte aligned segfaults. So the kernel is only ever called with in_features % 16 == 0 and
  aligned operands (x is copied if it is a misaligned view; a misaligned weight falls back to plain).
  bf16 on 2 cores, (1024 x 3072): 0.15 ms for one row against 0.99 ms plain (and 0.38 ms for the bf16
  float matmul); the kernel loses to the plain path above ~32-64 rows (prefill), hence INT8PACK_MAX_ROWS.
- cpu_gemv: qwen3's own x86 kernel (qwen3/kernels/cpu_gemv.py: AVX-512 or AVX2, software prefetch, fp32
  arithmetic on fp32 or bf16 x, any in_features), built with the system compiler on first use. It streams
  the weights faster than int8pack (benchmarks/NOTES.md) and does not round fp32 x to bf16.
"auto" takes cpu_gemv for eager CPU float32 / bfloat16 inputs of at most CPU_GEMV_MAX_ROWS rows where it
could be built; otherwise int8pack for eager CPU bfloat16 inputs of at most INT8PACK_MAX_ROWS rows where it
is safe, and the plain path otherwise (always under torch.compile, and when gradients flow: the kernel has none).
A float32 input of few rows also takes the bfloat16 kernel: x and the scales are rounded to bfloat16
(relative 2^-8, the size of the int8 rounding itself) and the result cast back to float32. The plain
path would convert the whole int8 matrix to float32 on every call, reading more bytes than the float32
model did.
tests/test_quantize.py checks both paths against a float64 reference and against each other.

Checkpoints keep Hugging Face names: `...weight` holds int8 and `...weight_scale` the scales, and
config.json carries `quantization_config` (see `quantization_config`). The scales are per row, so a fused
projection (qkv_proj, gate_up_proj) quantizes to exactly the int8 rows and scales of its separate parts, and
is saved under their names like a float one (checkpoint.fused_parts). To load one, build the model on
the meta device, call `prepare_int8_modules(model, quantization_config)`, then
`load_state_dict(state, assign=True)` and, for a tied model, `retie_lm_head(model)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .kernels import cpu_gemv
from .model import Qwen3ForCausalLM

QUANT_METHOD = "qwen3_int8"
MODULES_LINEAR = "linear+lm_head"
MODULES_WITH_EMBEDDING = "linear+lm_head+embedding"
KERNELS = ("auto", "plain", "int8pack", "cpu_gemv")
INT8PACK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT8PACK_K_MULTIPLE = 16  # the bf16 AVX-512 kernel's step along in_features; it has no remainder loop
INT8PACK_MAX_ROWS = 32  # above this many rows (tokens) the plain bf16 matmul wins on CPU (measured)
CPU_GEMV_MAX_ROWS = 32  # qwen3's CPU kernel beats int8pack and plain up to 64 rows (measured); prefill above
QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable


# ---------------------------------------------------------------------------------------------------
# Per-row quantization
# ---------------------------------------------------------------------------------------------------


def quantize_per_row(weight: Tensor) -> tuple[Tensor, Tensor]:
    """W (rows, cols) float -> (q int8 (rows, cols), scale (rows,) in W's dtype), with W ~= q * scale[:, None]."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (rows,)
    scale = (amax / QMAX).to(weight.dtype)  # rounded to the stored dtype first: q is computed from it
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero (or underflowing) rows
    q = torch.round(w / scale.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def dequantize_per_row(q: Tensor, scale: Tensor) -> Tensor:
    """q (rows, cols) int8, scale (rows,) -> q * scale[:, None] in scale's dtype."""
    return q.to(scale.dtype) * scale[:, None]


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """y = x W^T with W = weight * weight_scale[:, None]; weight int8 (out, in), weight_scale (out,), no bias.

    Both are Parameters with requires_grad=False (int8 cannot carry gradients), not buffers, because
    `model.to(...)` keeps a tied Parameter tied by converting it in place, whereas it would give each
    module its own copy of a shared buffer. `model.to(dtype)` casts the scales and leaves the int8 alone.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.weight_scale = _frozen(torch.empty(out_features, dtype=dtype, device=device))
        self.kernel = "auto"

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an nn.Linear (no bias) per output channel; the scales keep the weight's dtype."""
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; Qwen3's linear layers have none")
        module = cls(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        module.weight, module.weight_scale = map(_frozen, quantize_per_row(linear.weight))
        return module

    @classmethod
    def tied_to(cls, embedding: Int8Embedding) -> Int8Linear:
        """An LM head that shares the embedding's int8 matrix and per-row scales (tied weights)."""
        vocab_size, hidden_size = embedding.weight.shape
        module = cls(hidden_size, vocab_size, device="meta", dtype=embedding.weight_scale.dtype)
        module.weight, module.weight_scale = embedding.weight, embedding.weight_scale
        return module

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name not in KERNELS:
            raise ValueError(f"kernel: {name!r} is not one of {KERNELS}")
        self._kernel = name

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel!r}"

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "cpu_gemv" or (self.kernel == "auto" and self._cpu_gemv_pays(x)):
            return self.forward_cpu_gemv(x)
        if self.kernel == "plain" or (self.kernel == "auto" and not self._int8pack_pays(x)):
            return self.forward_plain(x)
        if self.kernel == "auto" and x.dtype == torch.float32:  # the fp32 kernel is a scalar loop: use bf16's
            return self.forward_int8pack(x.to(torch.bfloat16)).to(torch.float32)
        return self.forward_int8pack(x)

    def forward_plain(self, x: Tensor) -> Tensor:
        """Dequantise inside the expression: (x q^T) * s. The int8 -> float conversion is exact."""
        return F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)

    def forward_int8pack(self, x: Tensor) -> Tensor:
        """PyTorch's CPU int8-weight kernel; raises ValueError where it would be unsafe (see module doc)."""
        reason = self._int8pack_unusable(x)
        if reason:
            raise ValueError(f"int8pack kernel: {reason}")
        x2d = x.reshape(-1, self.in_features).contiguous()  # (B*T, in)
        if x2d.data_ptr() % 32:
            x2d = x2d.clone()  # the bf16 kernel uses aligned 32-byte loads; fresh CPU memory is 64-aligned
        out = torch._weight_int8pack_mm(x2d, self.weight, self.weight_scale.to(x.dtype))  # (B*T, out)
        return out.view(*x.shape[:-1], self.out_features)

    def forward_cpu_gemv(self, x: Tensor) -> Tensor:
        """qwen3's x86 int8 kernel (fp32 arithmetic); RuntimeError where it is not available."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("cpu_gemv kernel: it has no backward")
        return cpu_gemv.int8_gemv(x, self.weight, self.weight_scale)

    def _cpu_gemv_pays(self, x: Tensor) -> bool:
        """auto's first choice: few eager CPU rows of fp32 / bf16 where the kernel could be built."""
        return (
            not torch.compiler.is_compiling()
            and x.device.type == "cpu"
            and x.dtype in cpu_gemv.DTYPE_CODES
            and self.weight_scale.dtype in cpu_gemv.DTYPE_CODES
            and self.weight.device.type == "cpu"
            and self.weight.is_contiguous()
            and 0 < x.numel() <= CPU_GEMV_MAX_ROWS * self.in_features
            and not (torch.is_grad_enabled() and x.requires_grad)
            and cpu_gemv.available()
        )

    def _int8pack_unusable(self, x: Tensor) -> str | None:
        """Why the int8pack kernel cannot run on x, or None if it can."""
        if not hasattr(torch, "_weight_int8pack_mm"):
            return "this PyTorch has no torch._weight_int8pack_mm"
        if torch.compiler.is_compiling():
            return "eager only (under torch.compile the plain path is fused by inductor)"
        if x.device.type != "cpu" or self.weight.device.type != "cpu":
            return f"CPU only, found x on {x.device} and weight on {self.weight.device}"
        if x.dtype not in INT8PACK_DTYPES:
            return f"x must be one of {INT8PACK_DTYPES}, found {x.dtype}"
        if self.in_features % INT8PACK_K_MULTIPLE:
            return f"in_features must be a multiple of {INT8PACK_K_MULTIPLE}, found {self.in_features}"
        if not self.weight.is_contiguous() or self.weight.data_ptr() % 16:
            return "the int8 weight must be contiguous and 16-byte aligned"
        if x.numel() == 0:
            return "empty input"
        if torch.is_grad_enabled() and x.requires_grad:
            return "the kernel has no backward"
        return None

    def _int8pack_pays(self, x: Tensor) -> bool:
        """auto's rule: the bf16 kernel is faster than the plain path for few rows (measured on x86), for
        bf16 inputs and for fp32 inputs rounded to bf16."""
        if x.dtype not in (torch.bfloat16, torch.float32) or self._int8pack_unusable(x) is not None:
            return False
        return x.numel() // self.in_features <= INT8PACK_MAX_ROWS


class Int8Embedding(nn.Module):
    """Token embedding with int8 rows and one scale per row: gather the rows, then dequantise them."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _frozen(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.weight_scale = _frozen(torch.empty(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        V, H = embedding.weight.shape
        module = cls(V, H, device=embedding.weight.device, dtype=embedding.weight.dtype)
        module.weight, module.weight_scale = map(_frozen, quantize_per_row(embedding.weight))
        return module

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = F.embedding(input_ids, self.weight)  # (..., H) int8
        return rows.to(self.weight_scale.dtype) * self.weight_scale[input_ids].unsqueeze(-1)


# ---------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------


def quantize_int8(model: Qwen3ForCausalLM, include_embedding: bool = False) -> Qwen3ForCausalLM:
    """Replace every nn.Linear (attention, MLP, LM head) by an Int8Linear, in place; return the model.

    With `include_embedding`, the embedding becomes an Int8Embedding too. Tied weights: see the module
    docstring (the LM head gets its own copy, unless the embedding is quantized and shared). Works on a
    meta-device model as well (the result has the right shapes and dtypes and no data).
    """
    _swap_modules(model, include_embedding, Int8Linear.from_float, Int8Embedding.from_float)
    return model


def prepare_int8_modules(model: Qwen3ForCausalLM, quantization_config: dict) -> Qwen3ForCausalLM:
    """Swap in empty int8 modules as `quantization_config` (from config.json) describes, for loading with
    `load_state_dict(state, assign=True)` (then `retie_lm_head` if tied). Meant for a model on the meta
    device; nothing is computed."""
    include_embedding = _parse_quantization_config(quantization_config)
    if tied_lm_head(model) and not include_embedding:
        raise ConfigError(
            f"quantization_config.modules: {MODULES_LINEAR!r} with tie_word_embeddings=true; quantize_int8 "
            "unties such a model (the LM head gets its own int8 copy), so its checkpoint is saved untied"
        )

    def empty_linear(linear: nn.Linear) -> Int8Linear:
        return Int8Linear(linear.in_features, linear.out_features, linear.weight.device, linear.weight.dtype)

    def empty_embedding(embedding: nn.Embedding) -> Int8Embedding:
        V, H = embedding.weight.shape
        return Int8Embedding(V, H, embedding.weight.device, embedding.weight.dtype)

    _swap_modules(model, include_embedding, empty_linear, empty_embedding)
    return model


def _swap_modules(
    model: Qwen3ForCausalLM,
    include_embedding: bool,
    make_linear: Callable[[nn.Linear], Int8Linear],
    make_embedding: Callable[[nn.Embedding], Int8Embedding],
) -> None:
    """The one traversal behind quantize_int8 and prepare_int8_modules."""
    if quantization_config(model) is not None:
        raise ValueError("model: already quantized")
    tied = tied_lm_head(model)
    if include_embedding:
        model.model.embed_tokens = make_embedding(model.model.embed_tokens)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not (tied and include_embedding and module is model.lm_head):
            model.set_submodule(name, make_linear(module))
    if tied and include_embedding:
        model.lm_head = Int8Linear.tied_to(model.model.embed_tokens)
    # else, if tied: the LM head now has its own int8 copy, and tied_lm_head(model) says so


def _parse_quantization_config(quantization_config: dict) -> bool:
    """Validate config.json's quantization_config; return whether the embedding is quantized."""
    if not isinstance(quantization_config, dict):
        raise ConfigError(f"quantization_config: expected an object, found {quantization_config!r}")
    expected = {"quant_method": QUANT_METHOD, "bits": 8, "group": "per_channel"}
    for key, value in expected.items():
        if quantization_config.get(key) != value:
            raise ConfigError(f"quantization_config.{key}: expected {value!r}, found {quantization_config.get(key)!r}")
    modules = quantization_config.get("modules")
    if modules not in (MODULES_LINEAR, MODULES_WITH_EMBEDDING):
        raise ConfigError(
            f"quantization_config.modules: expected {MODULES_LINEAR!r} or {MODULES_WITH_EMBEDDING!r}, found {modules!r}"
        )
    return modules == MODULES_WITH_EMBEDDING


def quantization_config(model: nn.Module) -> dict | None:
    """The `quantization_config` entry of config.json for this model; None if it is not quantized."""
    modules = list(model.modules())
    int8 = [m for m in modules if isinstance(m, Int8Linear)]
    if not int8:
        return None
    if any(isinstance(m, nn.Linear) for m in modules):
        raise ValueError("model: partially quantized (some nn.Linear left beside Int8Linear)")
    with_embedding = any(isinstance(m, Int8Embedding) for m in modules)
    return {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "group": "per_channel",
        "modules": MODULES_WITH_EMBEDDING if with_embedding else MODULES_LINEAR,
    }


def tied_lm_head(model: Qwen3ForCausalLM) -> bool:
    """Whether the LM head shares the embedding's matrix, read off the modules: after `quantize_int8`
    untied a tied model, this is False while `model.config.tie_word_embeddings` still says how it was built."""
    return model.lm_head.weight is model.model.embed_tokens.weight


def retie_lm_head(model: Qwen3ForCausalLM) -> None:
    """Make the LM head share the embedding's tensors again: the weight, and the scales when int8.

    For a tied model after `load_state_dict(..., assign=True)`, which wraps every tensor in a new
    Parameter per module; without this, `model.to(device)` would copy the shared matrix twice.
    """
    model.lm_head.weight = model.model.embed_tokens.weight
    if isinstance(model.lm_head, Int8Linear):
        model.lm_head.weight_scale = model.model.embed_tokens.weight_scale


def set_int8_kernel(model: nn.Module, kernel: str) -> None:
    """Set `kernel` ("auto", "plain" or "int8pack") on every Int8Linear of the model."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.kernel = kernel


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights: unique parameters and persistent buffers (a tied matrix counts once)."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


# ---------------------------------------------------------------------------------------------------
# Measuring the damage
# ---------------------------------------------------------------------------------------------------


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(P || Q) of the next-token distributions softmax(p_logits), softmax(q_logits) over the last dim,
    averaged over all other positions; float64, in nats. P is the reference (the float model)."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits: shapes differ, {tuple(p_logits.shape)} and {tuple(q_logits.shape)}")
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
