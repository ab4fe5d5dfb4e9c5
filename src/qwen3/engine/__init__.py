"""The serving engine: many requests at once over a paged KV cache (see docs/engine.md).

    LLM        offline batches: llm.generate(prompts, sampling_params) -> outputs in prompt order
    AsyncLLM   the streaming interface (one background step loop; requests from many coroutines)
"""

from .async_llm import AsyncLLM
from .engine_loop import EngineStats, StreamOutput
from .llm import LLM, RequestOutput, TokenLogprob

__all__ = ["LLM", "AsyncLLM", "EngineStats", "RequestOutput", "StreamOutput", "TokenLogprob"]
