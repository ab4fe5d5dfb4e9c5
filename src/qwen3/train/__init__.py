"""Training for qwen3: pretraining from scratch, full fine-tuning and LoRA, on one or many processes.

- `data`: find text / jsonl / chat files, tokenize once into a memmap cache, pack into blocks.
- `loss`: chunked cross-entropy over the LM head (never all logits at once) and `CausalLMLoss`.
- `lora`: LoRA adapters in PEFT's format, and merging them into a plain checkpoint.
- `trainer`: `train(TrainConfig) -> TrainResult`, the loop, checkpoints, resume, DDP / FSDP2.
- `cli`: the `qwen3 train` and `qwen3 merge-lora` subcommands.

User errors (bad data, bad flags, a resume that does not match) raise `TrainError`, a ValueError whose
one-line message names the file, line or flag.
"""

from .data import TrainError, bits_per_byte
from .lora import LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_adapter_checkpoint, merge_lora
from .loss import CausalLMLoss, chunked_cross_entropy
from .trainer import TrainConfig, TrainResult, evaluate, lr_at, param_groups, train, train_step

__all__ = [
    "CausalLMLoss",
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
