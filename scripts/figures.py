"""Draw every figure of docs/ from the real code: each PNG in docs/figures/ comes from this script.

The figures run qwen3's own modules on the shipped demo model (6 layers, trained on Shakespeare) and
plot what they compute; `--tiny` swaps in a small random model and lower resolution so that CI can
check the script end to end in seconds. Output is deterministic (seeded, no timestamps in the PNGs).

Attention weights are never returned by the model, and model.py stays untouched: the figures pass the
model an attention backend of their own, `RecordingBackend`, which wraps a real one (CausalAttention or a
KVCache) and records what that backend hands to the model's dense formula `math(q, k, v, mask)`: the
rotated q, the keys and values it attends over, and the mask it built (None for CausalAttention, which is
causal by construction). `capture_attention` forms softmax(q k^T / sqrt(D) + mask) from those, and rebuilds
each attention module's output from the weights (o_proj(weights @ v)), so a caller (tests/test_figures.py)
can check the recomputation against what the module returned (read by a forward hook).

    python scripts/figures.py                          # all figures into docs/figures/
    python scripts/figures.py --tiny --out /tmp/figs   # fast, random model
    python scripts/figures.py --only rope_wavelengths --only sampling_cutoffs
    python scripts/figures.py --update-links           # re-point docs' model.py#L.. links after an edit

The pages link to exact lines of src/qwen3/ (`[`RMSNorm`](../src/qwen3/model.py#L43-L54)`, or a line of
code as the link text). tests/test_figures.py fails when such a link drifts; `--update-links` rewrites
the line numbers from the current source (a def/class by name via ast, a code line by its text).
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import qwen3  # noqa: E402
from qwen3.model import (  # noqa: E402
    AttentionBackend,
    AttentionFn,
    CausalAttention,
    KVCache,
    QKNormRoPE,
    Qwen3ForCausalLM,
    RMSNorm,
    RotaryEmbedding,
    rope_inverse_frequencies,
)
from qwen3.sampling import SamplingParams, filter_logits, sample  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOCS_FIGURES = DOCS / "figures"
VERSE = "ROMEO:\nBut soft, what light through yonder window breaks?"
PASSAGE = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
)
TYING_PROMPT = VERSE + "\nIt is the east, and Juliet is the"
SAMPLING_PROMPT = "ROMEO:\nI"
# Qwen3-0.6B's generation_config.json: temperature 0.6, top_k 20, top_p 0.95 (min_p is off there).
TEMPERATURE, TOP_K, TOP_P, MIN_P = 0.6, 20, 0.95, 0.05
QWEN3_06B = qwen3.Qwen3Config.from_preset("0.6B")
BLUE, ORANGE, GREEN, RED, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9a9a9a"


@dataclass
class Context:
    """What every figure function gets: the model to measure, its tokenizer and the output resolution."""

    model: Qwen3ForCausalLM
    tokenizer: qwen3.Tokenizer
    label: str  # names the model in titles
    tiny: bool
    dpi: int


def load_context(tiny: bool) -> Context:
    """The demo model, or with `tiny` a 2-layer random model over the demo tokenizer's 4,096 tokens."""
    torch.manual_seed(0)
    tokenizer = qwen3.load_tokenizer("demo")
    if not tiny:
        return Context(qwen3.load_model("demo"), tokenizer, "demo model (trained on Shakespeare)", False, 110)
    config = qwen3.Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.init_weights(std=0.2)
    return Context(model.eval(), tokenizer, "tiny random model", True, 60)


# ---------------------------------------------------------------------------------------------------
# Looking inside the model with forward hooks
# ---------------------------------------------------------------------------------------------------


@dataclass
class MathCall:
    """One call of the model's dense formula, as a backend made it."""

    layer: int
    q: Tensor  # (B, nh, T, D), after QK-norm and RoPE
    k: Tensor  # (B, nkv, S, D): this forward's keys (S = T) or the cache's slots
    v: Tensor  # (B, nkv, S, D)
    mask: Tensor | None  # (B, 1, T, S) True = may attend; None = causal over S = T


class RecordingBackend:
    """An attention backend that wraps another one and records every call it makes to `math`."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.calls: list[MathCall] = []

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, math: AttentionFn,
               qk: QKNormRoPE) -> Tensor:  # fmt: skip
        def recorded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
            self.calls.append(MathCall(layer, q.detach(), k.detach().clone(), v.detach().clone(), mask))
            return math(q, k, v, mask)

        return self.inner.attend(layer, q, k, v, positions, recorded, qk)


def dense_mask(call: MathCall) -> Tensor:
    """The call's mask as a (B, 1, T, S) tensor: None (causal over S = T) becomes the lower triangle."""
    if call.mask is not None:
        return call.mask
    T, S = call.q.shape[2], call.k.shape[2]
    return torch.ones(T, S, dtype=torch.bool).tril()[None, None]


@dataclass
class AttentionCapture:
    """One layer's attention, recomputed from what its backend handed to the dense formula."""

    weights: Tensor  # (B, nh, T, S) softmax(q k^T / sqrt(D) + mask), fp32
    recomputed: Tensor  # (B, T, H) o_proj(weights @ v): the module's output rebuilt from `weights`
    output: Tensor  # (B, T, H) what the module returned


def capture_attention(model: Qwen3ForCausalLM, input_ids: Tensor) -> list[AttentionCapture]:
    """Run the model (textbook formula, the default causal backend, recorded) and return every layer's weights."""
    backend = RecordingBackend(CausalAttention())
    outputs: dict[int, Tensor] = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, output))
        for i, layer in enumerate(model.model.layers)
    ]
    previous, model.attention = model.attention, "textbook"
    try:
        with torch.no_grad():
            model(input_ids, cache=backend)
    finally:
        model.attention = previous
        for handle in handles:
            handle.remove()
    captures = []
    for call in backend.calls:
        q, k, v = call.q, call.k, call.v
        (B, nh, T, D), nkv = q.shape, k.shape[1]
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, D)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(D)  # (B, nh, T, S)
        weights = scores.masked_fill(~dense_mask(call), float("-inf")).softmax(dim=-1)
        mixed = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, nh * D)
        o_proj = model.model.layers[call.layer].self_attn.o_proj
        with torch.no_grad():
            captures.append(AttentionCapture(weights, o_proj(mixed), outputs[call.layer]))
    return captures


@contextmanager
def recording(modules: dict[str, nn.Module]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Inside the block, record (first input, output) of each named module's latest call."""
    records: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name, module in modules.items():

        def hook(module: nn.Module, args: tuple, output: Tensor, name: str = name) -> None:
            records[name] = (args[0].detach(), output.detach())

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def encode(ctx: Context, text: str) -> Tensor:
    return torch.tensor([ctx.tokenizer.encode(text)])


def token_labels(ctx: Context, ids: Tensor) -> list[str]:
    """Readable token strings: a newline shows as \\n, a leading space as a low dot."""
    return [ctx.tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "\u00b7") for i in ids.tolist()]


# ---------------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------------

FIGURES: dict[str, Callable[[Context], Figure]] = {}


def figure(function: Callable[[Context], Figure]) -> Callable[[Context], Figure]:
    FIGURES[function.__name__] = function
    return function


def rope_config(theta: float, positions: int) -> qwen3.Qwen3Config:
    return replace(QWEN3_06B, rope_theta=theta, max_position_embeddings=positions)


@figure
def rope_wavelengths(ctx: Context) -> Figure:
    """Wavelength of each rotating pair (D = 128) for theta 1e4 and 1e6, and the cos tables they give."""
    context = QWEN3_06B.max_position_embeddings
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.25, 1, 1]}, layout="constrained")
    ax = axes[0]
    for theta, color in ((1e4, ORANGE), (1e6, BLUE)):
        inv_freq, _ = rope_inverse_frequencies(rope_config(theta, 16))
        wavelength = (2 * math.pi / inv_freq).numpy()  # tokens per full turn of pair i
        beyond = int((wavelength > context).sum())
        ax.semilogy(
            wavelength, color=color, lw=2, label=f"theta = {theta:.0e}: {beyond} of 64 pairs turn < once in context"
        )
    ax.axhline(context, color=GREY, ls="--", lw=1)
    ax.text(1, context * 1.4, f"context {context:,} tokens", color="#555555", fontsize=8)
    ax.set(
        xlabel="pair i (dims i and i + D/2)",
        ylabel="wavelength 2\u03c0 / \u03c9\u1d62 (tokens)",
        title="wavelength of each pair, D = 128: \u03c9\u1d62 = theta^(-2i/D)",
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    for ax, theta in zip(axes[1:], (1e4, 1e6), strict=True):
        # 256 positions: at a few pixels per position even pair 0 (period 2 pi) is drawn without moire.
        rope = RotaryEmbedding(rope_config(theta, 256))
        image = ax.imshow(rope.cos.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set(
            xlabel="position p", ylabel="pair i", title=f"RotaryEmbedding.cos, theta = {theta:.0e}, positions 0..255"
        )
    fig.colorbar(image, ax=axes[1:], shrink=0.8, label="cos(p \u03c9\u1d62)")
    fig.suptitle(
        "RoPE frequency bands at Qwen3-0.6B's head_dim: fast pairs resolve nearby tokens, slow pairs "
        "distant ones; theta 1e6 (Qwen3) stretches the slow end",
        fontsize=11,
    )
    return fig


@figure
def rope_rotation(ctx: Context) -> Figure:
    """A 2-D pair turning with position; q.k depends only on the offset; the score of a vector with itself."""
    config = rope_config(1e6, 64)
    rope = RotaryEmbedding(config)
    D = config.head_dim
    inv_freq, _ = rope_inverse_frequencies(config)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1.15, 1.3]})
    ax = axes[0]
    positions = torch.arange(16)[None]  # (B=1, T=16)
    for pair, color in ((0, BLUE), (8, ORANGE), (16, GREEN)):
        x = torch.zeros(1, 1, 16, D)
        x[..., pair] = 1.0  # the pair (x[i], x[i + D/2]) starts at (1, 0)
        turned = rope(x, positions)[0, 0]  # (T, D)
        radius = 1.0 - 0.12 * (pair // 8)  # shrink the slower pairs' circles so the three do not overlap
        a, b = radius * turned[:, pair], radius * turned[:, pair + D // 2]
        ax.plot(a, b, "o", color=color, ms=5, label=f"pair {pair}: \u03c9 = {inv_freq[pair]:.3g} rad/token")
        for position in range(16) if pair == 0 else (15,):
            ax.annotate(
                str(position),
                (a[position], b[position]),
                fontsize=7,
                color=color,
                ha="center",
                va="center",
                xytext=(9 * a[position], 9 * b[position]),
                textcoords="offset points",
            )
    for radius in (1.0, 0.88, 0.76):
        ax.add_patch(plt.Circle((0, 0), radius, fill=False, color=GREY, ls=":", lw=0.8))
    ax.set(
        xlim=(-1.3, 1.3),
        ylim=(-1.3, 1.3),
        aspect="equal",
        xlabel="x[i]",
        ylabel="x[i + D/2]",
        title="a pair starting at (1, 0), rotated at positions 0..15\n(theta 1e6; slower pairs drawn smaller)",
    )
    ax.legend(fontsize=7, loc="center")

    ax = axes[1]
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, D, generator=generator).unbind(0)
    n = 48
    p = torch.arange(n)[None]
    scores = (rope(q.expand(1, 1, n, D), p)[0, 0] @ rope(k.expand(1, 1, n, D), p)[0, 0].T).numpy()  # (n, n)
    image = ax.imshow(scores, cmap="RdBu_r", origin="lower", interpolation="nearest")
    ax.set(xlabel="key position n", ylabel="query position m", title="rope(q, m) \u00b7 rope(k, n), random q, k")
    ax.text(
        2,
        n - 6,
        "constant along each diagonal:\nthe score depends on m - n only",
        fontsize=8,
        bbox=dict(facecolor="white", alpha=0.85, lw=0),
    )
    fig.colorbar(image, ax=ax, shrink=0.8)

    ax = axes[2]
    distances = np.unique(np.geomspace(1, 40_000, 400).astype(int))
    ones = torch.ones(1, 1, 1, D)
    for theta, color in ((1e4, ORANGE), (1e6, BLUE)):
        table = RotaryEmbedding(rope_config(theta, int(distances[-1]) + 1))
        at_zero = table(ones, torch.zeros(1, 1, dtype=torch.long))[0, 0, 0]
        at_distance = table(ones.expand(1, 1, len(distances), D), torch.from_numpy(distances)[None])[0, 0]
        ax.semilogx(distances, (at_distance @ at_zero / D).numpy(), color=color, lw=1.2, label=f"theta = {theta:.0e}")
    ax.set(
        xlabel="distance m - n (tokens)",
        ylabel="score / D",
        ylim=(-0.3, 1.05),
        title="q = k = ones(128): how the score decays with distance",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


@figure
def attention_patterns(ctx: Context) -> Figure:
    """Attention weights of every head in a few layers on one line of verse."""
    ids = encode(ctx, VERSE)
    captures = capture_attention(ctx.model, ids)
    config = ctx.model.config
    nh, groups = config.num_attention_heads, config.num_key_value_groups
    layers = sorted({0, len(captures) // 2, len(captures) - 1})
    labels = token_labels(ctx, ids[0])
    T = len(labels)
    fig, axes = plt.subplots(
        len(layers), nh, figsize=(2.45 * nh + 1.6, 2.55 * len(layers) + 1.0), squeeze=False, layout="constrained"
    )
    for row, layer in enumerate(layers):
        for head in range(nh):
            ax = axes[row, head]
            image = ax.imshow(
                captures[layer].weights[0, head].numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels if row == len(layers) - 1 else [], rotation=90, fontsize=7)
            ax.set_yticklabels(labels if head == 0 else [], fontsize=7)
            ax.tick_params(length=0)
            if row == 0:
                ax.set_title(f"head {head} (KV head {head // groups})", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}\nquery token", fontsize=9)
    fig.suptitle(
        f"Attention weights softmax(q k\u1d40/\u221aD + causal mask), {ctx.label}; "
        f"row = query, column = key; {groups} query heads share each KV head",
        fontsize=11,
    )
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
    return fig


@figure
def causal_mask(ctx: Context) -> Figure:
    """The (T, S) masks the backends hand to attention: none without a cache, a prefill chunk, one decode step."""
    model = ctx.model
    ids = encode(ctx, VERSE)[:, :9]
    causal = RecordingBackend(CausalAttention())
    cached = RecordingBackend(KVCache(model.config, 1, 12))
    with torch.no_grad():
        model(ids[:, :8], cache=causal)  # no cache: S = T = 8, and no mask tensor
        model(ids[:, :4], torch.arange(4)[None], cached)  # first prefill chunk, positions 0..3
        model(ids[:, 4:8], torch.arange(4, 8)[None], cached)  # second chunk, positions 4..7
        model(ids[:, 8:9], torch.tensor([[8]]), cached)  # decode one token at position 8
    assert causal.calls[0].mask is None, "CausalAttention should pass no mask tensor"
    masks = [dense_mask(call)[0, 0] for call in causal.calls + cached.calls if call.layer == 0]
    panels = [
        (
            masks[0],
            "CausalAttention (no cache): T = S = 8, no mask tensor\n"
            "(math(q, k, v, None); drawn: what SDPA's is_causal does)",
            range(8),
            range(8),
        ),
        (
            masks[2],
            "cache of 12 slots, prefill chunk at positions 4..7\n(slots 0..3 written by the previous chunk, "
            "4..7 by this one)",
            range(4, 8),
            range(12),
        ),
        (
            masks[3],
            "decode one token at position 8\n(slot 8 written by this step; 9..11 never read yet)",
            range(8, 9),
            range(12),
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), gridspec_kw={"width_ratios": [8, 12, 12]}, layout="constrained")
    for ax, (mask, title, rows, cols) in zip(axes, panels, strict=True):
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=8)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
        ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set(xlabel="key slot s (= key position)", ylabel="query position p", title=title)
    fig.suptitle(
        "mask[b, 0, t, s] = s <= positions[b, t] (dark = may attend): KVCache.attend builds it over its slots; "
        "CausalAttention builds none",
        fontsize=11,
    )
    return fig


@figure
def kv_cache_memory(ctx: Context) -> Figure:
    """KV-cache bytes against context length at the Qwen3-0.6B shape, for MHA, GQA (Qwen3's) and MQA."""
    context = np.linspace(0, QWEN3_06B.max_position_embeddings, 200)
    with torch.device("meta"):
        weights_bytes = Qwen3ForCausalLM(QWEN3_06B).num_parameters() * 2
    fig, ax = plt.subplots(figsize=(8.5, 5))
    variants = [("MHA", 16, RED), ("GQA, Qwen3-0.6B", 8, BLUE), ("GQA", 4, GREY), ("MQA", 1, GREEN)]
    for name, nkv, color in variants:
        per_token = KVCache.bytes_per_token(replace(QWEN3_06B, num_key_value_heads=nkv), torch.bfloat16)
        ax.plot(
            context / 1024,
            context * per_token / 2**30,
            color=color,
            lw=2.2 if nkv == 8 else 1.5,
            label=f"{name}: nkv = {nkv}, {per_token // 1024} KiB/token",
        )
        ax.text(
            context[-1] / 1024 + 0.3,
            context[-1] * per_token / 2**30,
            f"{context[-1] * per_token / 2**30:.2f} GiB",
            color=color,
            va="center",
            fontsize=8,
        )
    ax.axhline(weights_bytes / 2**30, color="black", ls="--", lw=1)
    ax.text(
        context[-1] / 1024 - 0.5,
        weights_bytes / 2**30 + 0.12,
        f"the weights: {weights_bytes / 2**30:.2f} GiB in bf16",
        fontsize=8,
        ha="right",
    )
    ax.set(
        xlabel="context length (thousands of tokens)",
        ylabel="KV cache per sequence (GiB, bf16)",
        title="KV cache of one sequence at the Qwen3-0.6B shape (28 layers, 16 query heads of D = 128)\n"
        "KVCache.bytes_per_token = 2 x layers x nkv x D x 2 bytes",
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, context[-1] / 1024)
    ax.set_ylim(0)
    ax.set_xticks([0, 5, 10, 15, 20, 25, 30, 35, 40], ["0", "5", "10", "15", "20", "25", "30", "35", "40 (40,960)"])
    fig.tight_layout()
    return fig


def residual_sites(model: Qwen3ForCausalLM) -> dict[str, RMSNorm]:
    """The RMSNorms that read the residual stream, in the order the forward pass meets them."""
    sites: dict[str, RMSNorm] = {}
    for i, layer in enumerate(model.model.layers):
        sites[f"L{i} in"] = layer.input_layernorm
        sites[f"L{i} post"] = layer.post_attention_layernorm
    sites["final"] = model.model.norm
    return sites


@figure
def rmsnorm_vs_layernorm(ctx: Context) -> Figure:
    """Per-token mean and RMS of real residual-stream vectors, raw and after RMSNorm / LayerNorm."""
    model, H = ctx.model, ctx.model.config.hidden_size
    sites = residual_sites(model)
    with recording(sites) as records, torch.no_grad():
        model(encode(ctx, PASSAGE))
    rms_norm = RMSNorm(H, model.config.rms_norm_eps)  # unit scale: the normalisation alone
    layer_norm = nn.LayerNorm(H, eps=model.config.rms_norm_eps, elementwise_affine=False)
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(2, 2, figsize=(14, 7.5), sharex=True)
    cosines = []
    for s, name in enumerate(sites):
        x, model_output = records[name][0][0], records[name][1][0]  # (T, H) each
        with torch.no_grad():
            by_rms, by_layer = rms_norm(x), layer_norm(x)
        cosines.append(F.cosine_similarity(by_rms, by_layer, dim=-1))
        jitter = s + rng.uniform(-0.25, 0.25, x.shape[0])
        for ax, values, color, label in (
            (axes[0, 0], x.pow(2).mean(-1).sqrt(), BLUE, "RMS"),
            (axes[1, 0], x.mean(-1), BLUE, "mean"),
            (axes[0, 1], by_rms.pow(2).mean(-1).sqrt(), BLUE, "x / rms(x): RMSNorm, unit weight"),
            (axes[0, 1], by_layer.pow(2).mean(-1).sqrt(), ORANGE, "(x - mean) / std: LayerNorm, no affine"),
            (axes[0, 1], model_output.pow(2).mean(-1).sqrt(), GREEN, "the model's RMSNorm (x learned weight)"),
            (axes[1, 1], by_rms.mean(-1), BLUE, "after RMSNorm"),
            (axes[1, 1], by_layer.mean(-1), ORANGE, "after LayerNorm"),
        ):
            offset = {BLUE: -0.15, ORANGE: 0.0, GREEN: 0.15}[color] if ax in (axes[0, 1], axes[1, 1]) else 0
            ax.scatter(jitter + offset, values.numpy(), s=5, color=color, alpha=0.5, label=label if s == 0 else None)
    cosine = torch.cat(cosines)
    axes[0, 0].set(yscale="log", ylabel="per-token RMS", title="before: the residual stream x entering each norm")
    axes[1, 0].set(ylabel="per-token mean")
    axes[0, 1].set(ylabel="per-token RMS", title="after: RMS is exactly 1 for both norms (the learned weight rescales)")
    axes[1, 1].set(ylabel="per-token mean", title="after: mean is 0 for LayerNorm, mean(x) / rms(x) for RMSNorm")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8, loc="upper left", markerscale=3)
    for ax in axes[1]:
        ax.set_xticks(range(len(sites)), list(sites), rotation=60, fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
    fig.suptitle(
        f"RMSNorm vs LayerNorm on the residual stream of the {ctx.label}, {cosine.numel() // len(sites)} "
        "tokens of Romeo and Juliet\nthe mean is small next to the RMS, so the two outputs nearly agree: "
        f"cosine(RMSNorm(x), LayerNorm(x)) min {cosine.min():.4f}, median {cosine.median():.4f} "
        f"over {cosine.numel()} vectors",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


@figure
def swiglu_gates(ctx: Context) -> Figure:
    """Distributions of gate_proj(x), silu(gate) and silu(gate) * up over every layer's MLP."""
    model = ctx.model
    mlps = {f"L{i}": layer.mlp for i, layer in enumerate(model.model.layers)}
    with recording(mlps) as records, torch.no_grad():
        model(encode(ctx, PASSAGE))
        gate, act, product = [], [], []
        for name, mlp in mlps.items():
            x = records[name][0]
            g, u = mlp.gate_up_proj(x).chunk(2, dim=-1)  # gate_proj(x), up_proj(x): the fused projection's halves
            gate.append(g.flatten())
            act.append(F.silu(g).flatten())
            product.append((F.silu(g) * u).flatten())
    gate, act, product = (torch.cat(t).numpy() for t in (gate, act, product))

    def near_zero(values: np.ndarray) -> float:
        return float(np.mean(np.abs(values) < 0.1 * np.sqrt(np.mean(values**2))))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    ax.hist(gate, bins=120, color=GREY)
    ax.set(xlabel="gate_proj(x)", ylabel="count", title="gate pre-activation, all layers")
    curve = ax.twinx()
    z = np.linspace(gate.min(), gate.max(), 200)
    curve.plot(z, F.silu(torch.from_numpy(z)).numpy(), color=RED, lw=1.5, label="silu(z) = z \u03c3(z)")
    curve.axhline(0, color=RED, lw=0.5, ls=":")
    curve.set_ylabel("silu", color=RED)
    curve.legend(loc="upper left", fontsize=8)
    ax.text(
        0.02,
        0.8,
        f"{100 * np.mean(gate < 0):.0f}% of gates < 0\n(silu there is in [-0.28, 0])",
        fontsize=8,
        transform=ax.transAxes,
    )
    for ax, values, color, title in (
        (axes[1], act, BLUE, "silu(gate_proj(x))"),
        (axes[2], product, GREEN, "silu(gate_proj(x)) * up_proj(x)  (what down_proj reads)"),
    ):
        ax.hist(values, bins=120, color=color, log=True)
        rms = np.sqrt(np.mean(values**2))
        ax.axvspan(
            -0.1 * rms,
            0.1 * rms,
            color=ORANGE,
            alpha=0.25,
            label=f"|value| < 0.1 RMS: {100 * near_zero(values):.0f}% of entries",
        )
        ax.set(xlabel="value", ylabel="count (log)", title=title)
        ax.legend(fontsize=8, loc="upper right")
    axes[1].axvline(float(F.silu(torch.tensor(-1.2785))), color=RED, lw=0.8, ls="--", label="min of silu: -0.278")
    axes[1].legend(fontsize=8, loc="upper right")
    n_tokens = records["L0"][0].shape[1]
    fig.suptitle(
        f"SwiGLU in the {ctx.label}: {len(mlps)} layers x {n_tokens} tokens x "
        f"I = {model.config.intermediate_size} features",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


@figure
def residual_stream(ctx: Context) -> Figure:
    """Size of the residual stream and of what each pre-norm branch adds to it, layer by layer."""
    model = ctx.model
    watched: dict[str, nn.Module] = {}
    for i, layer in enumerate(model.model.layers):
        watched[f"block{i}"], watched[f"attn{i}"], watched[f"mlp{i}"] = layer, layer.self_attn, layer.mlp
        watched[f"in{i}"] = layer.input_layernorm
    with recording(watched) as records, torch.no_grad():
        model(encode(ctx, PASSAGE))

    def rms(t: Tensor) -> np.ndarray:
        return t[0].pow(2).mean(-1).sqrt().numpy()  # per token

    layers = range(model.config.num_hidden_layers)
    series = {
        "stream entering the block (x)": (BLUE, [rms(records[f"block{i}"][0]) for i in layers]),
        "normed input of attention, input_layernorm(x)": (GREY, [rms(records[f"in{i}"][1]) for i in layers]),
        "attention branch output (added)": (ORANGE, [rms(records[f"attn{i}"][1]) for i in layers]),
        "MLP branch output (added)": (GREEN, [rms(records[f"mlp{i}"][1]) for i in layers]),
    }
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
    for label, (color, values) in series.items():
        median = [np.median(v) for v in values]
        low, high = [np.percentile(v, 10) for v in values], [np.percentile(v, 90) for v in values]
        axes[0].plot(layers, median, "o-", color=color, label=label)
        axes[0].fill_between(layers, low, high, color=color, alpha=0.15)
    axes[0].set(
        xlabel="layer",
        ylabel="per-token RMS (median, 10-90% band)",
        yscale="log",
        title="pre-norm: the stream grows, each branch reads a normalised copy",
    )
    axes[0].legend(fontsize=8)
    stream = series["stream entering the block (x)"][1]
    for key, color in (("attention branch output (added)", ORANGE), ("MLP branch output (added)", GREEN)):
        ratio = [np.median(b / s) for b, s in zip(series[key][1], stream, strict=True)]
        axes[1].plot(layers, ratio, "o-", color=color, label=key.split(" (")[0])
    axes[1].set(
        xlabel="layer",
        ylabel="median  rms(branch) / rms(x entering the block)",
        yscale="log",
        title="relative size of each update (layer 0: the embedding is small, the first update dominates)",
    )
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(layers))
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"x = x + attn(norm(x)); x = x + mlp(norm(x)) in the {ctx.label}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


@figure
def weight_tying(ctx: Context) -> Figure:
    """The embedding matrix as LM head: logits are dot products with token embeddings; nearest tokens."""
    model, tokenizer = ctx.model, ctx.tokenizer
    embedding = model.model.embed_tokens.weight  # (V, H), also lm_head.weight when tied
    ids = encode(ctx, TYING_PROMPT)
    with torch.no_grad():
        hidden = model.hidden_states(ids, torch.arange(ids.shape[1])[None])[0, -1]  # (H,)
        logits = embedding @ hidden  # (V,)
        assert torch.allclose(logits, model(ids)[0, -1], atol=1e-4), "tied head: logits should be E h"
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    ax.hist(logits.numpy(), bins=100, color=GREY, log=True)
    top = logits.topk(5)
    for rank, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        ax.axvline(value, color=BLUE, lw=0.8)
        ax.text(
            value,
            0.92 - 0.07 * rank,
            f"{token_labels(ctx, torch.tensor([index]))[0]} ",
            color=BLUE,
            fontsize=8,
            ha="right",
            transform=ax.get_xaxis_transform(),
        )
    ax.set(
        xlabel="logit = embed_tokens.weight[v] \u00b7 h  (h: the final-normed hidden state)",
        ylabel="tokens (log)",
        title=f"next-token logits after '...{TYING_PROMPT.splitlines()[-1][-28:]}'\n"
        f"(all {logits.numel():,} tokens; top 5 marked)",
    )
    ax = axes[1]
    ax.axis("off")
    unit = F.normalize(embedding.detach(), dim=-1)
    words = [
        w
        for w in (" king", " love", " night", " sword", " heaven", " father", " thou", " sweet")
        if len(tokenizer.encode(w)) == 1
    ][:6]
    rows = []
    for word in words:
        index = tokenizer.encode(word)[0]
        similarity = unit @ unit[index]
        similarity[index] = -2  # not itself
        best = similarity.topk(5)
        neighbours = ", ".join(
            f"{tokenizer.decode([i]).strip()} ({s:.2f})" for s, i in zip(*map(list, best), strict=True)
        )
        rows.append([word.strip(), neighbours])
    table = ax.table(
        cellText=rows,
        colLabels=["token", "nearest tokens by cosine of embedding rows"],
        colWidths=[0.14, 0.86],
        loc="center",
        cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.8)
    V, H = embedding.shape
    share = V * H / model.num_parameters()
    ax.set_title(
        f"one ({V:,} x {H}) matrix reads tokens in and scores them out:\n{share:.0%} of this model's "
        "parameters (Qwen3-0.6B: 151,936 x 1,024 = 26%)",
        fontsize=10,
    )
    fig.suptitle(f"Weight tying in the {ctx.label}: lm_head.weight is embed_tokens.weight", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


@figure
def sampling_cutoffs(ctx: Context) -> Figure:
    """One real next-token distribution with what top-k, top-p and min-p keep, and what `sample` draws."""
    model = ctx.model
    ids = encode(ctx, SAMPLING_PROMPT)
    with torch.no_grad():
        logits = model(ids, logits_index=torch.tensor([ids.shape[1] - 1])) / TEMPERATURE  # (1, V)
    probs = logits.softmax(-1)[0]
    shown = 40
    order = probs.argsort(descending=True)[:shown]
    labels = token_labels(ctx, order)
    p = probs[order].numpy()
    kept_by = {
        f"top-k = {TOP_K}": filter_logits(logits, top_k=TOP_K),
        f"top-p = {TOP_P}": filter_logits(logits, top_p=TOP_P),
        f"min-p = {MIN_P}": filter_logits(logits, min_p=MIN_P),
    }
    params = SamplingParams(temperature=1.0, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P)  # logits already / T
    draws = 1000 if ctx.tiny else 20_000
    generator = torch.Generator().manual_seed(0)
    drawn = sample(logits.expand(draws, -1), params, generator)
    frequency = torch.bincount(drawn, minlength=probs.numel()).float()[order].numpy() / draws
    pipeline = filter_logits(logits, TOP_K, TOP_P, MIN_P).softmax(-1)[0][order].numpy()

    fig, axes = plt.subplots(4, 1, figsize=(13, 11), sharex=True)
    x = np.arange(shown)
    for ax, (name, filtered) in zip(axes[:3], kept_by.items(), strict=True):
        kept = filtered[0, order].isfinite().numpy()
        total = int(filtered.isfinite().sum())
        ax.bar(x, p, color=np.where(kept, BLUE, "#c8c8c8"))
        ax.set(ylabel="probability (log)", yscale="log")
        ax.set_title(f"{name}: keeps {total} token{'s' if total != 1 else ''} (blue)", fontsize=10, loc="left")
    cumulative = axes[1].twinx()
    cumulative.plot(x, np.cumsum(p), color=ORANGE, lw=1.2, label="cumulative probability (right axis)")
    cumulative.axhline(TOP_P, color=ORANGE, ls="--", lw=0.8, label=f"top-p = {TOP_P}")
    cumulative.set_ylim(0, 1.02)
    cumulative.legend(fontsize=8, loc="center right")
    axes[2].axhline(MIN_P * p[0], color=RED, ls="--", lw=0.8, label=f"min-p x max probability = {MIN_P * p[0]:.3f}")
    axes[2].legend(fontsize=8, loc="upper right")
    axes[3].bar(x - 0.2, pipeline, width=0.4, color=BLUE, label="top-k, then top-p, then min-p, renormalised")
    axes[3].bar(
        x + 0.2, frequency, width=0.4, color=GREEN, label=f"frequency in {draws:,} draws of qwen3.sampling.sample"
    )
    axes[3].set(ylabel="probability")
    axes[3].set_title("all three in order: the distribution sample() draws from", fontsize=10, loc="left")
    axes[3].legend(fontsize=8, loc="upper right")
    axes[3].set_xticks(x, labels, rotation=90, fontsize=8)
    axes[3].set_xlabel(f"the {shown} most likely next tokens")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    prompt = SAMPLING_PROMPT.replace("\n", "\\n")
    fig.suptitle(
        f"Next token after '{prompt}', {ctx.label}, temperature {TEMPERATURE} "
        "(Qwen3-0.6B's defaults: T 0.6, top-k 20, top-p 0.95)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


# ---------------------------------------------------------------------------------------------------
# Keeping the pages' links to src/qwen3 on the right lines
# ---------------------------------------------------------------------------------------------------

SOURCE_LINK = re.compile(r"\[(`[^`]+`)\]\((\.\./src/qwen3/[\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")


def definition_spans(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Qualified name ("Class.method") -> (first line with decorators, last line) of each def and class."""
    spans: dict[str, list[tuple[int, int]]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans.setdefault(prefix + child.name, []).append((start, child.end_lineno))
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return spans


def update_source_links(page: Path) -> list[str]:
    """Rewrite the line numbers of `page`'s links into src/qwen3 from the current source; return what
    could not be placed (a name or code line that no longer exists, or code found on several lines)."""
    unplaced: list[str] = []

    def relink(match: re.Match) -> str:
        label, target, start, end = match.groups()
        path = (page.parent / target).resolve()
        name, start = label.strip("`").removesuffix("()"), int(start)
        spans = definition_spans(path).get(name) if path.exists() else None
        if spans:
            old = (start, int(end) if end else None)
            a, b = old if old in spans else spans[0]
            return f"[{label}]({target}#L{a}-L{b})"
        lines = path.read_text().splitlines() if path.exists() else []
        found = [i + 1 for i, line in enumerate(lines) if name in line]
        if len(found) != 1:
            unplaced.append(f"{page.name}: `{name}` is on line(s) {found} of {target}")
            return match.group(0)
        span = f"#L{found[0]}" + (f"-L{found[0] + int(end) - start}" if end else "")
        return f"[{label}]({target}{span})"

    text = page.read_text()
    updated = SOURCE_LINK.sub(relink, text)
    if updated != text:
        page.write_text(updated)
    return unplaced


# ---------------------------------------------------------------------------------------------------


def make_figures(out: Path, tiny: bool = False, only: list[str] | None = None) -> list[Path]:
    """Draw the chosen figures (all by default) into `out` as NAME.png; return the paths written."""
    unknown = sorted(set(only or []) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {', '.join(FIGURES)}")
    out.mkdir(parents=True, exist_ok=True)
    ctx = load_context(tiny)
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": ctx.dpi})
    written = []
    for name, draw in FIGURES.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        with torch.no_grad():
            fig = draw(ctx)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=ctx.dpi, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS_FIGURES, help="output folder (default docs/figures)")
    parser.add_argument("--tiny", action="store_true", help="a small random model and low resolution (for CI)")
    parser.add_argument(
        "--update-links", action="store_true", help="re-point docs/*.md links into src/qwen3, then exit"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(FIGURES),
        metavar="NAME",
        help=f"draw only this figure (repeatable): {', '.join(FIGURES)}",
    )
    args = parser.parse_args(argv)
    if args.update_links:
        unplaced = [problem for page in sorted(DOCS.glob("*.md")) for problem in update_source_links(page)]
        print("\n".join(unplaced) or "every link placed")
        return 1 if unplaced else 0
    for path in make_figures(args.out, args.tiny, args.only):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
