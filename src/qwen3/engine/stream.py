"""One conversation on the engine: `stream` steps an LLM on the caller's thread for one request and yields its
increments; `complete` turns such a stream into the `Completion` that `qwen3.generate_text` returns.

This is the decode path of `qwen3 chat` and `qwen3 generate` on CUDA: the engine at batch 1, whose decode steps
replay a CUDA graph and whose host work runs one step ahead of the GPU (see llm.py). `generate_text` stays the
readable reference; on the same model and greedy sampling the two give the same tokens, text and finish reason.

Unlike AsyncLLM there is no thread: the caller's loop is the step loop, so Ctrl-C lands in the caller. Closing the
stream early (an exception, KeyboardInterrupt, `break`) aborts the request and frees its KV blocks; the blocks keep
their content for the prefix cache, so a chat that keeps one LLM prefills only each turn's new tokens.

`Completion.finish_reason` keeps generate_text's words: "eos" (an EOS id from generation_config), "stop" (a stop
string or a stop token id), "length", "interrupted" (Ctrl-C). Its token ids leave out a final EOS, as there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..generate import Completion, ContextLengthError
from ..model import Qwen3ForCausalLM
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .attention import KVPool
from .engine_loop import StreamOutput, delta
from .llm import LLM
from .sequence import Sequence as EngineSequence

DEFAULT_MAX_NUM_SEQS = 1  # one conversation: one graph bucket, one sampler row
CUDA_FREE_SHARE = 0.5  # the pool of a conversation takes at most this share of the free GPU memory


@dataclass
class StreamCompletion(Completion):
    """A Completion from the engine, plus the prompt tokens the prefix cache held (not computed again)."""

    num_cached_tokens: int = 0


def single_llm(model: Qwen3ForCausalLM, tokenizer: Tokenizer, max_model_len: int,
               max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, **options: Any) -> LLM:  # fmt: skip
    """An LLM over a loaded model sized for one conversation: a pool of `max_model_len` tokens (not a share of the
    GPU), at most the model's context and, on CUDA, at most half the free memory. `options` go to LLM."""
    max_model_len = min(max_model_len, model.config.max_position_embeddings)
    weight = model.model.norm.weight
    if weight.device.type == "cuda":
        config = model.config
        per_token = KVPool.bytes_per_block(config.num_hidden_layers, 1, model.num_kv_heads, config.head_dim,
                                           weight.dtype)  # fmt: skip
        free, _ = torch.cuda.mem_get_info(weight.device)
        max_model_len = max(1, min(max_model_len, int(free * CUDA_FREE_SHARE) // per_token))
    return LLM(model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
               kv_cache_tokens=max_model_len, **options)  # fmt: skip


def stream(llm: LLM, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[StreamOutput]:
    """Run one request to its end on this thread, yielding what it gained after each step (the last one has
    finished=True). Bad input raises ValueError here, before anything runs."""
    seq = llm.make_sequence("prompt", prompt, params, f"stream-{next(llm._request_counter)}", stream=True)
    return _steps(llm, seq)


def _steps(llm: LLM, seq: EngineSequence) -> Iterator[StreamOutput]:
    llm.add(seq)
    try:
        while not seq.finished:
            llm.step()
            if seq.stream_text or seq.finished or seq.num_output_tokens - seq.num_pending > seq.stream_tokens:
                yield delta(seq)
    finally:
        if not seq.finished:  # the consumer stopped early (Ctrl-C, an error): free the request's blocks now
            llm.abort(seq)
            if not llm.scheduler.has_work():
                llm._in_flight = None  # nothing else was in that step: drop it, as LLM.generate does


def complete(
    llm: LLM,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    interruptible: bool = False,
) -> StreamCompletion:
    """generate_text on the engine: the same arguments, chunks, text, token ids and finish reasons.

    A prompt plus max_new_tokens beyond the LLM's max_model_len is a ContextLengthError (generate_text's error
    beyond the model's context)."""
    tok = llm.tokenizer
    prompt_ids = tok.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
    if len(prompt_ids) + max_new_tokens > llm.max_model_len:
        raise ContextLengthError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{len(prompt_ids) + max_new_tokens} exceeds the engine's max_model_len of {llm.max_model_len} tokens"
        )
    start = time.perf_counter()
    if max_new_tokens == 0:
        return StreamCompletion("", [], "length", len(prompt_ids), 0.0, time.perf_counter() - start)
    params = dataclasses.replace(sampling or SamplingParams(temperature=0.0), max_tokens=max_new_tokens,
                                 stop=tuple(stop))  # fmt: skip
    seq = llm.make_sequence("prompt", prompt_ids, params, f"stream-{next(llm._request_counter)}", stream=True)
    eos = set(llm.config.eos_token_ids)
    token_ids: list[int] = []
    finish_reason, first_token_at = "length", None

    def emit(piece: str) -> None:
        if on_text is not None and piece:
            on_text(piece)

    steps = _steps(llm, seq)
    try:
        for out in steps:
            if first_token_at is None and out.new_token_ids:
                first_token_at = time.perf_counter() - start
            token_ids += [i for i in out.new_token_ids if i not in eos]
            emit(out.new_text)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        finish_reason = "interrupted"
    finally:
        steps.close()  # aborts the request if it has not finished
    text = seq.text
    emit(text.finish())  # the text held back for a possible stop string (nothing after a finished stream)
    finish_reason = text.finish_reason or finish_reason
    seconds = time.perf_counter() - start
    return StreamCompletion(text.text, token_ids, finish_reason, len(prompt_ids), first_token_at or seconds, seconds,
                            num_cached_tokens=seq.num_cached_tokens or 0)  # fmt: skip
