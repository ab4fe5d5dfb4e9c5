"""qwen3: Qwen3 from scratch in PyTorch."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, ConfigError, Qwen3Config
from .generate import generate
from .model import KVCache, Qwen3ForCausalLM
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Tokenizer",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
]
