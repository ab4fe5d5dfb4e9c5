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
from .text import TextStream
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
    prompts: Tensor | Sequence[Sequence[int]], pad_token_id: int, device: torch.device, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """A (B, T) tensor or a list of token lists -> right-padded ids (B, T) and lengths (B,); with `vocab_size`,
    an id outside [0, vocab_size) is a ValueError naming it (the embedding would raise a bare IndexError)."""
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            shape = tuple(prompts.shape)
            raise ValueError(f"input_ids: expected a (batch, length) tensor with length > 0, found {shape}")
        check_token_ids(prompts, vocab_size)
        return prompts.to(device), torch.full((prompts.shape[0],), prompts.shape[1], device=device)
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("input_ids: every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        check_token_ids(ids[b, : len(r)], vocab_size)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


def check_token_ids(ids: Tensor, vocab_size: int | None) -> None:
    """ValueError naming the first id of `ids` outside [0, vocab_size) (one host sync, on the prompt)."""
    if vocab_size is not None:
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.numel():
            V = vocab_size
            raise ValueError(f"input_ids: token id {int(bad[0])} is outside the vocabulary of {V} ids (0 to {V - 1})")


class DecodeStep:
    """decode_one + sampling for one token per row: the part of the loop that runs max_new_tokens times.

    Plain, it calls the model eagerly. With `compile=True` the model step goes through torch.compile
    (inductor fuses the norms, RoPE and activations into a few kernels), and on CUDA the whole step,
    sampling included, is captured once in a CUDA graph and replayed: one launch per token and no
    host synchronisation. Both read and write the same cache and counts, so they are interchangeable.
    """

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        cache: KVCache,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        counts: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        compile: bool = False,
    ) -> None:
        self.model, self.cache, self.sampling, self.generator = model, cache, sampling, generator
        self.counts, self.prompt_mask = counts, prompt_mask
        self.decode = torch.compile(decode_one, fullgraph=True, dynamic=False) if compile else decode_one
        self.use_graph = compile and cache.k.is_cuda
        self.graph: torch.cuda.CUDAGraph | None = None

    def eager(self, tokens: Tensor, positions: Tensor) -> Tensor:
        if self.counts is not None:
            update_counts(self.counts, tokens)
        logits = self.decode(self.model, tokens, positions, self.cache)
        return sample(logits, self.sampling, self.generator, self.counts, self.prompt_mask)

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Next ids (B,) after feeding tokens (B,) at positions (B,)."""
        if not self.use_graph:
            return self.eager(tokens, positions)
        if self.graph is None:
            self.capture(tokens, positions)
        self.static_tokens.copy_(tokens)
        self.static_positions.copy_(positions)
        self.graph.replay()
        return self.static_out.clone()

    def capture(self, tokens: Tensor, positions: Tensor) -> None:
        """Warm up (compiles) on a side stream, then record one step into a CUDA graph.

        The warm-up runs write the cache slot that the real step rewrites next, and the penalty counts
        and generator state are restored afterwards, so capturing changes no result."""
        self.static_tokens, self.static_positions = tokens.clone(), positions.clone()
        saved_counts = None if self.counts is None else self.counts.clone()
        saved_rng = None if self.generator is None else self.generator.get_state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.eager(self.static_tokens, self.static_positions)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph):
            self.static_out = self.eager(self.static_tokens, self.static_positions)
        if saved_counts is not None:
            self.counts.copy_(saved_counts)
        if saved_rng is not None:
            self.generator.set_state(saved_rng)


def generate_tokens(
    model: Qwen3ForCausalLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    compile: bool = False,
    speculative: int = 0,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), until all rows hit an EOS id or max_new_tokens.

    `compile` selects the fast decode step (see DecodeStep). `speculative=k` drafts up to k tokens per
    step by prompt lookup and verifies them in one forward (greedy, batch 1; see speculative_tokens).
    """
    sampling = sampling or SamplingParams(temperature=0.0)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, found {max_new_tokens}")
    if speculative < 0:
        raise ValueError(f"speculative: must be a number of draft tokens >= 0 (0 = off), found {speculative}")
    device = model.lm_head.weight.device
    ids, lengths = pad_prompts(input_ids, pad_token_id, device, model.config.vocab_size)
    B, T = ids.shape
    limit = model.config.max_position_embeddings
    if T + max_new_tokens + speculative > limit:
        raise ContextLengthError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens + speculative} "
            f"exceeds the model's context of {limit} tokens"
            + (f" (with {speculative} speculative slots)" if speculative else "")
        )
    if max_new_tokens == 0:
        return
    cache = KVCache.for_model(model, B, T + max_new_tokens + speculative)
    if speculative:
        yield from speculative_tokens(model, ids, cache, max_new_tokens, sampling, eos_token_ids, speculative)
        return
    generator = make_generator(sampling, device)
    counts = prompt_mask = None
    if sampling.presence_penalty or sampling.frequency_penalty or sampling.repetition_penalty != 1.0:
        V = model.config.vocab_size
        counts = torch.zeros(B, V, dtype=torch.long, device=device)
        prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
        valid = torch.arange(T, device=device)[None, :] < lengths[:, None]
        prompt_mask.scatter_(1, torch.where(valid, ids, ids[:, :1]), True)
    step_fn = DecodeStep(model, cache, sampling, generator, counts, prompt_mask, compile=compile)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    with torch.inference_mode():
        next_ids = sample(prefill(model, ids, lengths, cache), sampling, generator, counts, prompt_mask)
        positions = lengths.clone()
        for step in range(max_new_tokens):
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            yield next_ids
            finished |= torch.isin(next_ids, eos)
            if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
                return
            next_ids = step_fn(next_ids, positions)
            positions += 1


def prompt_lookup_draft(tokens: Sequence[int], max_draft: int, max_ngram: int = 3) -> list[int]:
    """Draft the continuation of `tokens` by finding their last n-gram (n = max_ngram..1) earlier in the
    sequence and copying what followed it there (prompt-lookup decoding)."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = list(tokens[-n:])
        for start in range(len(tokens) - n - 1, -1, -1):
            if list(tokens[start : start + n]) == tail:
                return list(tokens[start + n : start + n + max_draft])
    return []


def speculative_tokens(
    model: Qwen3ForCausalLM,
    ids: Tensor,
    cache: KVCache,
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_token_ids: Sequence[int],
    max_draft: int,
) -> Iterator[Tensor]:
    """Greedy prompt-lookup speculative decoding for one row.

    Each step feeds the last token plus a draft of up to `max_draft` tokens at their positions, and keeps
    the draft's longest prefix that agrees with the model's own argmax, plus the model's next token.
    The output is the greedy output: a draft token is kept only where greedy would have produced it.
    Rejected tokens leave stale cache slots beyond the accepted position; the next step rewrites them
    before any query can see them (a query at position p reads slots 0..p only).
    """
    if ids.shape[0] != 1 or not sampling.greedy:
        raise ValueError("speculative: prompt-lookup decoding needs one prompt and greedy sampling (temperature 0)")
    device, eos = ids.device, set(eos_token_ids)
    tokens = ids[0].tolist()
    produced = 0
    with torch.inference_mode():
        logits = prefill(model, ids, torch.tensor([len(tokens)], device=device), cache)
        next_token = int(logits.argmax(-1))
        while True:
            yield torch.tensor([next_token], device=device)
            produced += 1
            tokens.append(next_token)
            if produced == max_new_tokens or next_token in eos:
                return
            draft = prompt_lookup_draft(tokens, min(max_draft, max_new_tokens - produced))
            start = len(tokens) - 1
            feed = torch.tensor([[next_token, *draft]], device=device)
            positions = torch.arange(start, start + feed.shape[1], device=device)[None]
            predicted = model(feed, positions, cache)[0].argmax(-1).tolist()  # (1 + len(draft),)
            accepted = 0
            while accepted < len(draft) and draft[accepted] == predicted[accepted]:
                accepted += 1
            for token in draft[:accepted]:
                yield torch.tensor([token], device=device)
                produced += 1
                tokens.append(token)
                if produced == max_new_tokens or token in eos:
                    return
            next_token = predicted[accepted]


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
    compile: bool = False,
    speculative: int = 0,
) -> Tensor:
    """Generate up to max_new_tokens for each prompt; returns the new tokens, LongTensor (B, N).

    `temperature=0` is greedy. Pass `sampling` for top-k/top-p/min-p and penalties (it then wins over
    `temperature` and `seed`). Generation stops early once every row has produced an id in
    `eos_token_ids` (kept in the output); finished rows are padded with `pad_token_id`.
    `compile=True` takes the fast decode step (torch.compile, plus a CUDA graph on GPU); `speculative=k`
    drafts k tokens at a time by prompt lookup (greedy, one prompt). Both give the plain path's tokens.
    """
    if sampling is None:
        sampling = SamplingParams(temperature=temperature, seed=seed)
    steps = list(
        generate_tokens(model, input_ids, max_new_tokens, sampling, eos_token_ids, pad_token_id, compile, speculative)
    )
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


def generate_text(
    model: Qwen3ForCausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    interruptible: bool = False,
    compile: bool = False,
    speculative: int = 0,
) -> Completion:
    """Generate from one prompt (text or ids), calling `on_text(chunk)` as text completes.

    Stops on the tokenizer's EOS ids (not included in the text), on any of `stop` (cut before it), or
    at max_new_tokens. Streamed chunks never split a UTF-8 character and never show the beginning of a
    stop string that is then cut away; their concatenation equals `Completion.text`. With
    `interruptible`, Ctrl-C ends the generation and returns what was produced so far.
    """
    prompt_ids = tokenizer.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
    eos = sorted(set(tokenizer.eos_token_ids))
    stream = TextStream(tokenizer, stop, eos_token_ids=eos)
    token_ids: list[int] = []
    finish_reason, first_token_at = "length", None
    start = time.perf_counter()

    def emit(piece: str) -> None:
        if on_text is not None and piece:
            on_text(piece)

    pad = tokenizer.pad_token_id or 0
    tokens = generate_tokens(model, [prompt_ids], max_new_tokens, sampling, eos, pad, compile, speculative)
    try:
        for next_ids in tokens:
            token_id = int(next_ids[0])
            if first_token_at is None:
                first_token_at = time.perf_counter() - start
            if token_id not in stream.eos_token_ids:
                token_ids.append(token_id)
            emit(stream.push(token_id))
            if stream.finished:
                break
    except KeyboardInterrupt:
        if not interruptible:
            raise
        finish_reason = "interrupted"
    finally:
        tokens.close()
    emit(stream.finish())
    finish_reason = stream.finish_reason or finish_reason
    text = stream.text
    seconds = time.perf_counter() - start
    return Completion(text, token_ids, finish_reason, len(prompt_ids), first_token_at or seconds, seconds)
