"""Training for qwen3: pretraining from scratch, full fine-tuning and LoRA, on one or many processes.

- `data`: find text / jsonl / chat files, tokenize once into a memmap cache, pack into blocks.
- `loss`: chunked cross-entropy over the LM head (never all logits at once) and `CausalLMLoss`.
- `lora`: LoRA adapters in PEFT's format, and merging them into a plain checkpoint.
- `trainer`: `train(TrainConfig) -> TrainResult`, the loop, checkpoints, resume, DDP / FSDP2.
- `cli`: the `qwen3 train` and `qwen3 merge-lora` subcommands.

User errors (bad data, bad flags, a resume that does not match) raise `TrainError`, a ValueError whose
one-line message names the file, line or flag.
"""

import importlib
from typing import Any

# Submodules are imported on first use: `qwen3 generate` builds the whole CLI parser, which imports
# qwen3.train.cli, and should not pay for the trainer (torch.distributed.checkpoint, ~0.9 s) to do so.
_EXPORTS = {
    "TrainError": "data",
    "bits_per_byte": "data",
    "LoRAConfig": "lora",
    "FusedLoRALinear": "lora",
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "load_adapter": "lora",
    "merge_adapter_checkpoint": "lora",
    "merge_lora": "lora",
    "CausalLMLoss": "loss",
    "chunked_cross_entropy": "loss",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "evaluate": "trainer",
    "lr_at": "trainer",
    "param_groups": "trainer",
    "train": "trainer",
    "train_step": "trainer",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [
    "CausalLMLoss",
    "FusedLoRALinear",
    "LoRAConfig",
    "LoRALinear",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "apply_lora",
    "bits_per_byte",
    "chunked_cross_entropy",
    "evaluate",
    "load_adapter",
    "lr_at",
    "merge_adapter_checkpoint",
    "merge_lora",
    "param_groups",
    "train",
    "train_step",
]
