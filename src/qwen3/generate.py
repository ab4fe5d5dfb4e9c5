"""Token generation with the static KV cache, split into prefill, one decode step, and the loop.

Prompts of different lengths share one batch by right-padding: each row's tokens sit at positions
0..len-1, every row then decodes at its own position (see the position rule in model.py), and the first
logits of row b are read at index len_b - 1. A row that emits an end-of-sequence id is finished; its
later columns hold `pad_token_id`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .model import KVCache, Qwen3ForCausalLM
from .sampling import SamplingParams, make_generator, sample, update_counts


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
