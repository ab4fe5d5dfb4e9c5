"""What a model costs: exact parameter counts and memory figures for a config (`model_info`), and the
figure of them (`plot_memory`), behind `qwen3 info`.

Everything is computed from a model built on the meta device (no memory, no weights read), so the counts
are those of the real modules, not a formula that could drift from model.py. The KV cache figures are
for one sequence in bf16 (`KVCache.bytes_per_token`), beside the same model with multi-head attention.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .config import Qwen3Config
from .files import atomic_path
from .model import KVCache, Qwen3ForCausalLM

COMPONENTS = ("embedding", "attention", "mlp", "norms", "lm_head")
PLOT_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")  # by the file's suffix; all written by matplotlib


def model_info(config: Qwen3Config, context: int | None = None) -> dict:
    """Parameter counts, weight bytes (float32, bfloat16, int8) and KV-cache bytes at `context` tokens
    (default: the model's max_position_embeddings)."""
    context = config.max_position_embeddings if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context: expected a number of tokens > 0, found {context!r}")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = model.num_parameters()
    embedding = model.model.embed_tokens.weight.numel()
    matrices = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not config.tie_word_embeddings:
        matrices = [m for m in matrices if m is not model.lm_head] + [model.lm_head]
    linear_params = sum(m.weight.numel() for m in matrices)
    scales = sum(m.weight.shape[0] for m in matrices)  # one bf16 scale per output channel
    other = total - linear_params - (embedding if not config.tie_word_embeddings else 0)
    by_component = dict.fromkeys(COMPONENTS, 0)
    for pname, p in model.named_parameters():  # a tied LM head is the embedding: listed once
        part = pname.split(".")
        component = (
            "embedding" if "embed_tokens" in part else "lm_head" if part[0] == "lm_head"
            else "attention" if "self_attn" in part else "mlp" if "mlp" in part else "norms"
        )  # fmt: skip
        by_component[component] += p.numel()
    mha = dataclasses.replace(config, num_key_value_heads=config.num_attention_heads)
    kv_bf16 = KVCache.bytes_per_token(config, torch.bfloat16)
    kv_mha = KVCache.bytes_per_token(mha, torch.bfloat16)
    return {
        "parameters": total,
        "parameters_non_embedding": total - embedding,
        "parameters_by_component": by_component,  # attention includes q_norm / k_norm
        "weights_bytes": {
            "float32": total * 4,
            "bfloat16": total * 2,
            # int8 linear layers (LM head included) with bf16 per-channel scales; embedding/norms bf16
            "int8": linear_params + scales * 2 + other * 2,
        },
        "kv_cache_bytes_per_token_bf16": kv_bf16,
        "kv_cache_bytes_per_token_mha_bf16": kv_mha,
        "kv_cache_bytes_bf16": kv_bf16 * context,
        "kv_cache_bytes_mha_bf16": kv_mha * context,
        "gqa_saving": 1 - kv_bf16 / kv_mha,
        "context": context,
    }


def plot_format(path: str | os.PathLike) -> str:
    """The image format that `path`'s suffix names (png, jpg, pdf, svg); ValueError for any other."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        found = f"'.{suffix}'" if suffix else "no suffix"
        raise ValueError(f"{path}: {found}; the file name must end in one of .{', .'.join(PLOT_FORMATS)}")
    return suffix


def plot_memory(config: Qwen3Config, name: str, info: dict, path: str | os.PathLike) -> None:
    """Two panels: the bf16 weights by component, and the bf16 KV cache of one sequence by context length
    (this config's KV heads against multi-head attention), beside the weights in bf16 and int8. Written
    atomically, in the format of the file's suffix (`plot_format`)."""
    image_format = plot_format(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'qwen3[train]'") from e
    gib = 2**30
    fig, (weights_ax, kv_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    counts = {k: v for k, v in info["parameters_by_component"].items() if v}
    bars = weights_ax.barh(list(counts), [v * 2 / gib for v in counts.values()], color="tab:blue")
    labels = [f"{v * 2 / gib:.3f} GiB, {v / 1e6:,.2f}M" for v in counts.values()]
    weights_ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    weights_ax.invert_yaxis()
    weights_ax.set_xlabel("GiB in bf16")
    tied = " (LM head tied to the embedding)" if config.tie_word_embeddings else ""
    weights_ax.set_title(f"weights by component{tied}", fontsize=10)
    weights_ax.margins(x=0.25)
    contexts = [2**i for i in range(9, 40) if 2**i < config.max_position_embeddings] + [config.max_position_embeddings]
    per_token = info["kv_cache_bytes_per_token_bf16"]
    per_token_mha = info["kv_cache_bytes_per_token_mha_bf16"]
    kv_ax.plot(contexts, [c * per_token / gib for c in contexts], marker=".",
               label=f"KV cache, {config.num_key_value_heads} KV heads ({per_token / 1024:.0f} KiB/token)")  # fmt: skip
    if config.num_key_value_heads != config.num_attention_heads:
        kv_ax.plot(contexts, [c * per_token_mha / gib for c in contexts], linestyle="--",
                   label=f"KV cache if multi-head ({per_token_mha / 1024:.0f} KiB/token)")  # fmt: skip
    for dtype, style in (("bfloat16", ":"), ("int8", "-.")):
        kv_ax.axhline(info["weights_bytes"][dtype] / gib, color="gray", linestyle=style, label=f"weights, {dtype}")
    kv_ax.set_xscale("log", base=2)
    kv_ax.set_yscale("log")
    kv_ax.set_xlabel("context length (tokens, one sequence)")
    kv_ax.set_ylabel("GiB")
    kv_ax.set_title("KV cache in bf16 by context length", fontsize=10)
    kv_ax.grid(alpha=0.3, which="both")
    kv_ax.legend(fontsize=8)
    fig.suptitle(f"{name}: {info['parameters']:,} parameters", fontsize=11)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # an interrupted run leaves no half-written file at path
            fig.savefig(tmp, dpi=110, format=image_format)  # the temporary name has no suffix to go by
    finally:
        plt.close(fig)
