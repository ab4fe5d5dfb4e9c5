"""Qwen3, written out in one file: RMSNorm, rotary embedding, grouped-query attention with QK-norm,
SwiGLU MLP, pre-norm decoder block, and the causal language model on top.

q/k/v and gate/up are fused projections (one matrix each; FUSED_PROJECTIONS says how they map to the separate
matrices of Hugging Face checkpoints, which keep their names on disk).

Shape legend used in the comments:
    B  batch size                   T  tokens in this forward (a prompt or chunk of it; 1 when decoding)
    S  key/value slots (T without a cache, the cache's max_length with one)
    H  hidden_size                  V  vocab_size                I  intermediate_size
    nh num_attention_heads          nkv num_key_value_heads      D  head_dim (nh * D may differ from H)

Positions are explicit: `positions[b, t]` is the absolute position of token t of row b; RoPE reads them.

Attention goes through one explicit argument of the forward, an *attention backend*: an object with
`attend(layer, q, k, v, positions, math, qk)` that applies `qk` (QK-norm, then RoPE) to q and k, stores the new keys
and values (if it keeps any) and returns softmax(q k^T / sqrt(D) + mask) v. The backend, not the layer, applies
`qk` so that a backend with its own kernel may do it in the same pass that stores the keys (the engine's CUDA path);
the dense backends here call it first thing. The mask and the kernel are the backend's business, not the model's:
- `CausalAttention` (the default, no cache; training): the T tokens attend to themselves causally, with no
  mask tensor (SDPA's `is_causal`, which lets CUDA take the flash kernel).
- `KVCache`: a static cache; a token's keys and values are written to slot `positions[b, t]`, and a query at
  position p attends to the slots 0..p. That single rule gives chunked prefill and batches of prompts of
  different lengths (right-padded: padding writes slots that the row's later tokens overwrite before reading).
- the engine's paged cache (qwen3.engine.attention): blocks of slots shared by many sequences.
`math` is the model's dense attention formula, `attention="sdpa"` or `"textbook"` (below); a backend that
gathers keys into a dense tensor calls it, one with its own kernel may ignore it.

Architecture experiments (docs/experiments.md) are config switches chosen once, when the modules are
built, never flags tested in the forward pass: `qk_norm`, `norm_type` (RMSNorm or LayerNorm, see
make_norm), `mlp_type` (SwiGLU or a parameter-matched GELU MLP) and `norm_position` (pre or post, the one
branch in DecoderLayer.forward); grouping is just `num_key_value_heads`. The defaults are Qwen3.

Numerics (fp32 checked to 1e-4 of transformers by tests/test_parity.py; bf16 compared there too):
- RMSNorm (also q_norm/k_norm) computes the mean square and the rescaling in fp32, casts back to the
  model dtype, then multiplies by the learned scale: exactly transformers' order. Squares of bf16
  activations summed in bf16 would lose the small components.
- RoPE tables are computed once in fp32 (positions times inverse frequencies, then cos/sin), and the
  rotation itself runs in fp32 before casting q and k back. transformers casts cos/sin to the model
  dtype first and rotates in bf16 when the model is bf16; in fp32 the two are identical.
- Softmax is fp32: explicitly in the textbook path, inside the kernel in SDPA.
- The residual stream, matmuls and logits stay in the model dtype, as in transformers. The sampler
  upcasts logits to fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Qwen3Config

# ---------------------------------------------------------------------------------------------------
# Normalisation and position encoding
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight. No mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, then times the weight (transformers' order).
        # F.rms_norm is those steps in one kernel (eight on a GPU, written out; tests/test_parity.py: same bits, CPU)
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


def make_norm(config: Qwen3Config, dim: int) -> nn.Module:
    """Qwen3's RMSNorm, or LayerNorm (subtracts the mean, adds a bias) for the norm_type experiment."""
    if config.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.rms_norm_eps)
    return RMSNorm(dim, config.rms_norm_eps)


def rope_inverse_frequencies(config: Qwen3Config) -> tuple[Tensor, float]:
    """Per-pair rotation speeds theta^(-2i/D), i < D/2, adjusted by the rope type; and the attention factor.

    `linear` divides every frequency by `factor` (positions interpolated). `yarn` leaves the fast
    (high-frequency) pairs alone, interpolates the slow ones, ramps linearly between them, and scales
    cos/sin by an attention factor: by default 0.1 ln(factor) + 1, or `attention_factor`, or the ratio given
    by `mscale`/`mscale_all_dim` when the config sets them (as transformers' `_compute_yarn_parameters`).
    """
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (D/2,)
    inv_freq = 1.0 / (base**exponents)
    rope_type, scaling = config.rope_type, config.rope_scaling or {}
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0

    # yarn
    original_max = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The pair index whose wavelength fits `num_rotations` times into the original context.
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 for fast pairs (kept), 0 for slow ones (interpolated)
    pos_freqs = base**exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, (max_position_embeddings, D/2) in fp32, looked up by position. With YaRN
    both tables carry its attention factor, so the "rotation" also scales q and k by it."""

    def __init__(self, config: Qwen3Config, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.build(device)

    def build(self, device: torch.device | str | None) -> None:
        inv_freq, attention_factor = rope_inverse_frequencies(self.config)
        positions = torch.arange(self.config.max_position_embeddings, device=device).float()
        angles = positions[:, None] * inv_freq.to(device)[None, :]  # (max_pos, D/2)
        self.cos = angles.cos() * attention_factor
        self.sin = angles.sin() * attention_factor

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's own signature
        # model.to(torch.bfloat16) casts every floating buffer; the tables must stay fp32, so rebuild them.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.build(self.cos.device)
        return self

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate each pair (x[i], x[i + D/2]) of x (B, n, T, D) by angle positions (B, T) * inv_freq[i]."""
        cos = self.cos[positions][:, None]  # (B, 1, T, D/2)
        sin = self.sin[positions][:, None]
        x1, x2 = x.float().chunk(2, dim=-1)  # the two halves, each (B, n, T, D/2)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Attention: two interchangeable implementations of softmax(q k^T / sqrt(D) + mask) v
# ---------------------------------------------------------------------------------------------------

AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def textbook_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The formula spelled out. q (B, nh, T, D); k, v (B, nkv, S, D); mask (B, 1, T, S) True = may attend,
    or None for causal attention of T queries over S = T keys (query t sees keys 0..t)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, D): query head h reads KV head h // groups
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v  # (B, nh, T, D)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The same computation through PyTorch's fused kernel (flash / memory-efficient / math)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "textbook": textbook_attention}


# ---------------------------------------------------------------------------------------------------
# Attention backends: where keys and values live, and which queries see which keys
# ---------------------------------------------------------------------------------------------------


class QKNormRoPE(NamedTuple):
    """What happens to q and k between the projection and the scores: each head RMS-normalised on its own (QK-norm,
    which keeps q.k bounded whatever the size of the activations), then rotated by its position (RoPE).

    The layer hands this to the backend with the projected q and k (AttentionBackend.attend). It is data, so that
    a fused kernel can read the norms' weights and eps and the rotary tables instead of calling it."""

    q_norm: nn.Module  # RMSNorm over D (nn.Identity in the qk_norm=False experiment, LayerNorm in norm_type's)
    k_norm: nn.Module
    rope: RotaryEmbedding

    def __call__(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, nh, T, D), k (B, nkv, T, D), positions (B, T) -> normalised and rotated q and k, same shapes."""
        q, k = self.q_norm(q), self.k_norm(k)  # per head: over the last dimension, D
        return self.rope(q, positions), self.rope(k, positions)


class AttentionBackend(Protocol):
    """What the model's attention layers call: finish q and k, store this step's k, v (if the backend keeps any),
    attend."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, math: AttentionFn,
               qk: QKNormRoPE) -> Tensor:  # fmt: skip
        """q (B, nh, T, D), this step's k, v (B, nkv, T, D) as projected, positions (B, T) -> attention output
        (B, nh, T, D) of qk(q, k, positions) over the keys, v."""
        ...


class CausalAttention:
    """No cache: the T tokens of each row attend causally to each other (a full forward, or training)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, math: AttentionFn,
               qk: QKNormRoPE) -> Tensor:  # fmt: skip
        q, k = qk(q, k, positions)
        return math(q, k, v, None)


class KVCache:
    """Static key/value cache: (layers, B, nkv, max_length, D) for keys and the same for values.

    Allocated once for the batch size and length the caller asks for; nothing grows, so a decode step
    has static shapes. Slot s holds the keys/values of the token at position s. `num_key_value_heads`
    defaults to the config's; `KVCache.for_model` takes it from the model's modules (a tensor-parallel rank
    holds fewer heads).
    """

    def __init__(
        self,
        config: Qwen3Config,
        batch_size: int,
        max_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        num_key_value_heads: int | None = None,
    ) -> None:
        if not 0 < max_length <= config.max_position_embeddings:
            raise ValueError(
                f"max_length: {max_length} must be in 1..max_position_embeddings ({config.max_position_embeddings})"
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, found {batch_size}")
        nkv = num_key_value_heads or config.num_key_value_heads
        shape = (config.num_hidden_layers, batch_size, nkv, max_length, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @classmethod
    def for_model(cls, model: Qwen3ForCausalLM, batch_size: int, max_length: int) -> KVCache:
        """A cache on the model's device, in its dtype, with as many KV heads as its layers hold."""
        weight = model.model.norm.weight
        return cls(model.config, batch_size, max_length, weight.device, weight.dtype, model.num_kv_heads)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def bytes_per_token(config: Qwen3Config, dtype: torch.dtype) -> int:
        """2 (k and v) x layers x kv heads x head_dim x bytes: 112 KiB for Qwen3-0.6B in bf16."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nkv, T, D) at slots positions (B, T), in place; return the layer's whole cache."""
        index = positions[:, None, :, None].expand_as(k)  # (B, nkv, T, D)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer], self.v[layer]  # (B, nkv, S, D) each

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, math: AttentionFn,
               qk: QKNormRoPE) -> Tensor:  # fmt: skip
        """Write k, v at their positions, then attend over every slot s <= the query's position."""
        q, k = qk(q, k, positions)
        keys, values = self.update(layer, positions, k, v)  # (B, nkv, S, D)
        slots = torch.arange(self.max_length, device=q.device)  # (S,)
        mask = (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        return math(q, keys, values, mask)


# ---------------------------------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------------------------------


# Fused projections. Hugging Face checkpoints store q_proj, k_proj, v_proj (and gate_proj, up_proj) as separate
# matrices that all read the same input. Here each group is one nn.Linear whose output rows are the parts'
# rows stacked in this order: one matmul instead of three (or two). At batch-1 decode every projection is one
# launch reading its matrix, so fusing saves 3 launches per layer and gives the kernel larger matrices; in a
# batch it saves 3 of the 7 GEMMs per layer. The state dict holds the fused names; this table is the one place
# that says how they map to the Hugging Face names, and every reader and writer of checkpoints (checkpoint.py,
# parallel.py, train/lora.py) derives the mapping from it, so files keep the original names.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class Attention(nn.Module):
    """Grouped-query attention: nh query heads share nkv key/value heads; q and k are RMS-normalised
    per head (QK-norm) before the rotary embedding."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        nh, nkv, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.head_dim = d
        self.num_key_value_groups = config.num_key_value_groups  # nh / nkv: query heads per KV head
        self.qkv_proj = nn.Linear(h, (nh + 2 * nkv) * d, bias=False)  # rows: q (nh D), then k (nkv D), v (nkv D)
        self.o_proj = nn.Linear(nh * d, h, bias=False)
        # QK-norm keeps q.k bounded whatever the size of the activations (nn.Identity in the qk_norm experiment)
        self.q_norm = make_norm(config, d) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, d) if config.qk_norm else nn.Identity()

    def split_sizes(self, rows: int) -> list[int]:
        """The q, k, v rows of a qkv projection of `rows` rows: nh D, nkv D, nkv D. From the size, not the
        config: a tensor-parallel rank holds nh/tp query and nkv/tp KV heads, in the same nh:nkv ratio."""
        kv = rows // (self.num_key_value_groups + 2)  # nkv D
        return [self.num_key_value_groups * kv, kv, kv]

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        math: AttentionFn,
        layer: int,
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)  # (B, T, (nh + 2 nkv) D)
        q, k, v = qkv.split(self.split_sizes(qkv.shape[-1]), dim=-1)
        # -1: the head counts come from the projection, which holds this rank's heads under tensor parallelism
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        # The backend applies QK-norm and RoPE to q and k (QKNormRoPE), stores k and v if it keeps a cache, attends
        out = backend.attend(layer, q, k, v, positions, math, QKNormRoPE(self.q_norm, self.k_norm, rope))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh * D) -> (B, T, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the gate decides, per feature, how much of `up` passes."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # gate, then up
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def split_sizes(self, rows: int) -> list[int]:
        """The gate and up rows of a gate_up projection of `rows` rows: I each (I/tp on a tensor-parallel rank)."""
        return [rows // 2, rows // 2]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, H) -> (B, T, 2 I) -> 2 x (B, T, I)
        return self.down_proj(F.silu(gate) * up)  # (B, T, I) -> (B, T, H)


class GeluMLP(nn.Module):
    """The pre-GLU feed-forward, for the mlp_type experiment: down(gelu(up(x))) with 1.5 x I hidden units,
    so that its 2 x H x 1.5 I weights match SwiGLU's 3 x H x I."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        width = config.intermediate_size * 3 // 2
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    The norm_position="post" experiment is the original Transformer's order, norm(x + attn(x)): the
    residual stream itself is normalised at every layer instead of only each branch's input."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = GeluMLP(config) if config.mlp_type == "gelu" else MLP(config)
        self.post_norm = config.norm_position == "post"

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, backend: AttentionBackend,
                math: AttentionFn, layer: int) -> Tensor:  # fmt: skip
        if self.post_norm:
            x = self.input_layernorm(x + self.self_attn(x, positions, rope, backend, math, layer))
            return self.post_attention_layernorm(x + self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, backend, math, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The modules between token ids and the LM head: embedding, decoder layers, final norm. It has no
    forward of its own; Qwen3ForCausalLM.hidden_states runs them (HF's parameter names need this level)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)


class Qwen3ForCausalLM(nn.Module):
    """The language model. Parameter names are those of Hugging Face checkpoints, but for the fused projections
    (FUSED_PROJECTIONS: qkv_proj and gate_up_proj; checkpoint.py reads and writes them under the original names)."""

    def __init__(self, config: Qwen3Config, attention: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        self.attention = attention
        if config.tie_word_embeddings:
            self.tie_weights()

    @property
    def attention(self) -> str:
        """The dense attention formula handed to the backend: "sdpa" (fused kernel) or "textbook"."""
        return self._attention

    @attention.setter
    def attention(self, name: str) -> None:
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention: {name!r} is not one of {sorted(ATTENTION_IMPLEMENTATIONS)}")
        self._attention = name
        self._attention_fn = ATTENTION_IMPLEMENTATIONS[name]

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this model's layers, read off the qkv projection (fewer on a tensor-parallel rank)."""
        attention = self.model.layers[0].self_attn
        return attention.split_sizes(attention.qkv_proj.out_features)[1] // self.config.head_dim

    def tie_weights(self) -> None:
        """Share one (V, H) matrix between the input embedding and the output projection."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for training from scratch: normal(0, std) matrices, unit norm scales. (HF also
        zeroes the embedding row of pad_token_id and freezes it; we train every row.)"""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent RoPE tables on `device`; needed after building on the meta device."""
        self.rope.build(device)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: AttentionBackend | None = None,
        logits_index: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V); or only at the token indices `logits_index` of each row:
        (B,) gives (B, V), (B, K) gives (B, K, V) (the engine packs many sequences into one row).

        positions (B, T) default to 0..T-1. `cache` is the attention backend: None for plain causal
        attention over the T tokens, a KVCache (keys/values written at `positions`, queries attend to every
        slot up to their own position), or the engine's paged cache.
        """
        hidden = self.hidden_states(input_ids, positions, cache)
        if logits_index is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device).view(-1, *[1] * (logits_index.ndim - 1))
            hidden = hidden[rows, logits_index]  # (B, H) or (B, K, H)
        return self.lm_head(hidden)

    def hidden_states(
        self, input_ids: Tensor, positions: Tensor | None = None, cache: AttentionBackend | None = None
    ) -> Tensor:
        """The transformer without the LM head: (B, T) -> final-normed hidden states (B, T, H)."""
        B, T = input_ids.shape
        if positions is None:  # 0..T-1, which must fit the RoPE table (a shape check: no host sync)
            if T > (limit := self.config.max_position_embeddings):
                raise ValueError(
                    f"input_ids: {T} tokens exceed the model's context of {limit} (max_position_embeddings)"
                )
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        backend = cache if cache is not None else CausalAttention()
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, self.rope, backend, self._attention_fn, i)
        return self.model.norm(x)

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Unique parameters (a tied matrix counts once)."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if not include_embedding:
            total -= self.model.embed_tokens.weight.numel()
        return total
