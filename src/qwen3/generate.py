"""Token generation with the static KV cache, split into prefill, one decode step, and the loop.

Prompts of different lengths share one batch by right-padding: each row's tokens sit at positions
0..len-1, every row then decodes at its own position (see the position rule in model.py), and the first
logits of row b are read at index len_b - 1. A row that emits an end-of-sequence id is finished; its
later columns hold `pad_token_id`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import KVCache, Qwen3ForCausalLM
from .sampling import SamplingParams, make_generator, sample, update_counts
from .tokenizer import Tokenizer


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit in the model's context."""


def prefill(model: Qwen3ForCausalLM, input_ids: Tensor, lengths: Tensor, cache: KVCache) -> Tensor:
    """Run the (right-padded) prompts (B, T) through the model, filling the cache; logits (B, V) at each
    row's last real token."""
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    return model(input_ids, positions, cache, logits_index=lengths - 1)


def decode_one(model: Qwen3ForCausalLM, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """One token per row, tokens (B,) at positions (B,): logits (B, V). Static shapes, no host sync."""
    return model(tokens[:, None], positions[:, None], cache)[:, 0]


def pad_prompts(
    prompts: Tensor | Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A (B, T) tensor or a list of token lists -> right-padded ids (B, T) and lengths (B,)."""
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            shape = tuple(prompts.shape)
            raise ValueError(f"input_ids: expected a (batch, length) tensor with length > 0, found {shape}")
        return prompts.to(device), torch.full((prompts.shape[0],), prompts.shape[1], device=device)
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("input_ids: every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


def generate_tokens(
    model: Qwen3ForCausalLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), until all rows hit an EOS id or max_new_tokens."""
    sampling = sampling or SamplingParams(temperature=0.0)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, found {max_new_tokens}")
    device = model.lm_head.weight.device
    ids, lengths = pad_prompts(input_ids, pad_token_id, device)
    B, T = ids.shape
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
            f"exceeds the model's context of {limit} tokens"
        )
    if max_new_tokens == 0:
        return
    cache = KVCache(model.config, B, T + max_new_tokens, device=device, dtype=model.lm_head.weight.dtype)
    generator = make_generator(sampling, device)
    counts = prompt_mask = None
    if sampling.presence_penalty or sampling.frequency_penalty or sampling.repetition_penalty != 1.0:
        V = model.config.vocab_size
        counts = torch.zeros(B, V, dtype=torch.long, device=device)
        prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
        valid = torch.arange(T, device=device)[None, :] < lengths[:, None]
        prompt_mask.scatter_(1, torch.where(valid, ids, ids[:, :1]), True)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    with torch.inference_mode():
        logits = prefill(model, ids, lengths, cache)
        positions = lengths.clone()
        for step in range(max_new_tokens):
            next_ids = sample(logits, sampling, generator, counts, prompt_mask)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            yield next_ids
            finished |= torch.isin(next_ids, eos)
            if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
                return
            if counts is not None:
                update_counts(counts, next_ids)
            logits = decode_one(model, next_ids, positions, cache)
            positions += 1


def generate(
    model: Qwen3ForCausalLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    *,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
) -> Tensor:
    """Generate up to max_new_tokens for each prompt; returns the new tokens, LongTensor (B, N).

    `temperature=0` is greedy. Pass `sampling` for top-k/top-p/min-p and penalties (it then wins over
    `temperature` and `seed`). Generation stops early once every row has produced an id in
    `eos_token_ids` (kept in the output); finished rows are padded with `pad_token_id`.
    """
    if sampling is None:
        sampling = SamplingParams(temperature=temperature, seed=seed)
    steps = list(generate_tokens(model, input_ids, max_new_tokens, sampling, eos_token_ids, pad_token_id))
    if not steps:
        batch = input_ids.shape[0] if isinstance(input_ids, Tensor) else len(input_ids)
        return torch.zeros(batch, 0, dtype=torch.long)
    return torch.stack(steps, dim=1)


# ---------------------------------------------------------------------------------------------------
# Text in, text out: streaming, stop strings, timing
# ---------------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One finished generation: the text, its tokens, why it stopped and how long it took."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" | "interrupted" (Ctrl-C)
    prompt_tokens: int
    seconds_to_first_token: float
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        decode_seconds = self.seconds - self.seconds_to_first_token
        return (len(self.token_ids) - 1) / decode_seconds if len(self.token_ids) > 1 and decode_seconds > 0 else 0.0


def _safe_prefix_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown: all of it except a tail that might begin a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


def generate_text(
    model: Qwen3ForCausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    interruptible: bool = False,
) -> Completion:
    """Generate from one prompt (text or ids), calling `on_text(chunk)` as text completes.

    Stops on the tokenizer's EOS ids (not included in the text), on any of `stop` (cut before it), or
    at max_new_tokens. Streamed chunks never split a UTF-8 character and never show the beginning of a
    stop string that is then cut away; their concatenation equals `Completion.text`. With
    `interruptible`, Ctrl-C ends the generation and returns what was produced so far.
    """
    prompt_ids = tokenizer.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
    eos = set(tokenizer.eos_token_ids)
    decoder = tokenizer.stream_decoder()
    text, shown, token_ids = "", 0, []
    finish_reason, first_token_at = "length", None
    start = time.perf_counter()

    def emit(upto: int) -> None:
        nonlocal shown
        if on_text is not None and upto > shown:
            on_text(text[shown:upto])
        shown = max(shown, upto)

    tokens = generate_tokens(model, [prompt_ids], max_new_tokens, sampling, sorted(eos), tokenizer.pad_token_id or 0)
    try:
        for next_ids in tokens:
            token_id = int(next_ids[0])
            if first_token_at is None:
                first_token_at = time.perf_counter() - start
            if token_id in eos:
                finish_reason = "eos"
                break
            token_ids.append(token_id)
            text += decoder.push(token_id)
            hits = [i for i in (text.find(s, max(0, shown - len(s))) for s in stop) if i >= 0]
            if hits:
                text, finish_reason = text[: min(hits)], "stop"
                break
            emit(_safe_prefix_length(text, stop))
    except KeyboardInterrupt:
        if not interruptible:
            raise
        finish_reason = "interrupted"
    finally:
        tokens.close()
    if finish_reason != "stop":
        text += decoder.flush()
    emit(len(text))
    seconds = time.perf_counter() - start
    return Completion(text, token_ids, finish_reason, len(prompt_ids), first_token_at or seconds, seconds)
