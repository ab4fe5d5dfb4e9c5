"""qwen3: Qwen3 from scratch in PyTorch."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, ConfigError, Qwen3Config
from .engine import LLM, AsyncLLM, RequestOutput
from .generate import generate, generate_text
from .model import KVCache, Qwen3ForCausalLM
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "LLM",
    "PRESETS",
    "AsyncLLM",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "generate_text",
    "load_model",
    "load_tokenizer",
    "save_model",
]
