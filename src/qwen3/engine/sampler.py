"""Per-row sampling for a batch of unrelated requests, in one batched pass with no host synchronisation.

Each row has its own temperature, top-k, top-p, min-p, penalties and seed. The pipeline and semantics are those
of qwen3.sampling (penalties -> temperature -> top-k -> top-p -> min-p -> exponential race), with every parameter a
(S,) tensor instead of a Python number. What is decided on the host, from the requests' parameters, is only which
stages any row of the step needs: a step where no row uses top-k/top-p skips the sort entirely, one without
penalties skips the counts, an all-greedy step is just argmax.

Seeds. A seeded row's noise is a counter-based hash of (seed, output index, vocabulary index): a pure function,
so the row draws the same noise whatever else shares the batch, whichever row it lands in, and after a
preemption. The hash is murmur3's 32-bit finaliser applied in int64 arithmetic (values kept below 2**32), giving
23-bit uniforms u in (0, 1) and Exp(1) noise -log(u). Unseeded rows draw from the global RNG.

Penalty state: a (max_num_seqs, V) table of output-token counts and one of prompt-token flags, one row per
running sequence that uses penalties, kept on the device and updated after each sampled token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import sampling
from ..sampling import SamplingParams
from .sequence import Sequence, TokenLogprob

_MASK32 = 0xFFFFFFFF


def _fmix32(h: Tensor) -> Tensor:
    """murmur3's finaliser on int64 tensors holding 32-bit values (products wrap; the low 32 bits are exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def row_key(seed: int, output_index: int) -> int:
    """A 32-bit key for (seed, output index), mixed on the host (seeds go up to 2**64)."""
    h = 0
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, output_index & _MASK32):
        h = _fmix32_int((h ^ word) * 0x9E3779B1 & _MASK32)
    return h


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def seeded_exponential(keys: Tensor, columns: int | Tensor) -> Tensor:
    """Exp(1) noise float32 from row keys (S,) int64: a pure function of (key, vocabulary index), for every index
    below `columns` (an int V: (S, V)) or for the indices in `columns` (S, C) int64: (S, C)."""
    if isinstance(columns, int):
        columns = torch.arange(columns, device=keys.device, dtype=torch.int64)[None, :]
    h = _fmix32((keys[:, None] ^ (columns * 0x27D4EB2F & _MASK32)) & _MASK32)
    h = _fmix32(h ^ 0x165667B1)
    # 23 bits, so that k + 0.5 is exact in float32 and u stays inside (0, 1): with 24, the top value rounded to
    # u = 1.0, noise 0, and that token won the race whatever its probability (once in 2**24 draws)
    uniform = ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(uniform)


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list on `device` without waiting for the stream (pinned memory, non-blocking copy): the engine
    prepares a step while the GPU still runs the previous one, and a blocking copy would wait for it."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _needs_penalty(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


class Sampler:
    """`fused_sample(logits, temperature, keys) -> ids` (triton_sampling.sample on CUDA) takes the steps where no
    row asks for penalties, filters or logprobs: the same draws in one pass (see triton_sampling.py)."""

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device,
                 fused_sample: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> None:  # fmt: skip
        self.vocab_size, self.device = vocab_size, device
        self.fused_sample = fused_sample
        self.max_rows = max_num_seqs
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.counts: Tensor | None = None  # (max_num_seqs, V) int32, allocated when a request first needs it
        self.prompt_mask: Tensor | None = None  # (max_num_seqs, V) bool

    # -------------------------------------------------------------------------------------------
    # Penalty rows

    def _row(self, seq: Sequence) -> int:
        """The penalty row of `seq`, (re)built from its tokens when it first needs one."""
        if seq.sampler_row >= 0:
            return seq.sampler_row
        if self.counts is None:
            shape = (self.max_rows, self.vocab_size)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        row = seq.sampler_row = self.free_rows.pop()
        self.counts[row].zero_()
        self.prompt_mask[row].zero_()
        prompt = on_device(seq.prompt_token_ids, torch.long, self.device)
        self.prompt_mask[row, prompt] = True
        output = on_device(seq.known_output_token_ids, torch.long, self.device)
        self.counts[row].scatter_add_(0, output, torch.ones_like(output, dtype=torch.int32))
        return row

    def release(self, seq: Sequence) -> None:
        if seq.sampler_row >= 0:
            self.free_rows.append(seq.sampler_row)
            seq.sampler_row = -1

    # -------------------------------------------------------------------------------------------
    # One step

    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """logits (S, V) for seqs -> next ids (S,) int64; plus, when a row asked for logprobs, the sampled
        tokens' logprobs (S,) and the top k (S, k, 2: ids, logprobs) for the largest k asked (see logprobs_for_row)."""
        params = [s.params for s in seqs]
        S, V = logits.shape
        device = logits.device
        if not any(_needs_penalty(p) or _filters(p) or p.logprobs is not None for p in params):
            if all(p.greedy for p in params):  # argmax, as below, without the float32 copy and the host columns
                return logits.argmax(-1), None, None
            if self.fused_sample is not None:
                return self._fused(logits, seqs), None, None
        raw = logits.float()
        logits = raw

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
            return on_device(values, dtype, device)[:, None]

        penalised_rows = {i for i, p in enumerate(params) if _needs_penalty(p)}
        rows = None
        if penalised_rows:
            rows = on_device([self._row(seqs[i]) if i in penalised_rows else 0 for i in range(S)], torch.long, device)
            counts = self.counts[rows]  # (S, V)
            seen = (counts > 0) | self.prompt_mask[rows]
            rep = column([p.repetition_penalty for p in params])
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
            logits = logits - column([p.frequency_penalty for p in params]) * counts.float()
            logits = logits - column([p.presence_penalty for p in params]) * (counts > 0).float()

        greedy = [p.greedy for p in params]
        if all(greedy):
            next_ids = logits.argmax(-1)
        else:
            temperature = column([1.0 if p.greedy else p.temperature for p in params])
            values, ids = filter_candidates(logits / temperature, params)
            probs = values.softmax(-1)
            noise = torch.empty_like(probs).exponential_()
            seeded = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
            if seeded:  # their rows of noise, replaced by the hash of (seed, output index, vocabulary index)
                keys = [row_key(params[i].seed, seqs[i].num_output_tokens) for i in seeded]
                keys_t = on_device(keys, torch.int64, device)
                at = on_device(seeded, torch.long, device)
                noise[at] = seeded_exponential(keys_t, V if ids is None else ids[at])
            noise.clamp_min_(torch.finfo(noise.dtype).tiny)
            next_ids = (probs / noise).argmax(-1)
            if ids is not None:
                next_ids = ids.gather(1, next_ids[:, None])[:, 0]
            if any(greedy):
                next_ids = torch.where(column(greedy, torch.bool)[:, 0], logits.argmax(-1), next_ids)

        if penalised_rows:
            ones = on_device([i in penalised_rows for i in range(S)], torch.int32, device)
            self.counts.index_put_((rows, next_ids), ones, accumulate=True)

        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if k is None:
            return next_ids, None, None
        logprobs = torch.log_softmax(raw, -1)
        chosen = logprobs.gather(1, next_ids[:, None])[:, 0]
        top = torch.topk(logprobs, k, dim=-1) if k > 0 else None
        top_pairs = None if top is None else torch.stack((top.indices.float(), top.values), -1)
        return next_ids, chosen, top_pairs

    def _fused(self, logits: Tensor, seqs: list[Sequence]) -> Tensor:
        """Temperature and greedy rows through fused_sample: seeded rows keyed as in the plain path, the others
        from torch's generator."""
        params = [seq.params for seq in seqs]
        temperature = on_device([0.0 if p.greedy else p.temperature for p in params], torch.float32, self.device)
        seeded = [p.seed is not None and not p.greedy for p in params]
        keys = torch.randint(0, 1 << 32, (len(seqs),), dtype=torch.int64, device=self.device)
        if any(seeded):
            host = [row_key(p.seed, seq.num_output_tokens) if s else 0 for p, seq, s in zip(params, seqs, seeded,
                                                                                            strict=True)]  # fmt: skip
            keys = torch.where(on_device(seeded, torch.bool, self.device), on_device(host, torch.int64, self.device),
                               keys)  # fmt: skip
        return self.fused_sample(logits, temperature, keys)


def _filters(p: SamplingParams) -> bool:
    return not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


def filter_candidates(logits: Tensor, params: list[SamplingParams]) -> tuple[Tensor, Tensor | None]:
    """Each row's own top-k, then top-p, then min-p (qwen3.sampling's filters, one value per row; removed logits
    -inf), as (values, their vocabulary ids), through qwen3.sampling.filter_top_k_candidates:
    - every sampled row with a top-k of 1..TOP_K_CANDIDATES (Qwen3's generation config has 20): among each row's
      largest k + TIE_MARGIN logits only. Every other token has probability 0 after top-k, so a draw among these
      is the same draw, without sorting the vocabulary;
    - otherwise, with a top-k or top-p anywhere: the whole vocabulary, sorted;
    - min-p alone, or nothing: the logits as they are, in vocabulary order (ids None)."""
    S, V = logits.shape
    device = logits.device

    def column(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
        return on_device(values, dtype, device)[:, None]

    candidates = all(p.greedy or 0 < p.top_k <= min(sampling.TOP_K_CANDIDATES, V - 1) for p in params)
    min_p = column([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None
    if not candidates and not any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        if min_p is not None:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
        return logits, None
    k_max = max((p.top_k for p in params if not p.greedy), default=1) if candidates else V
    top_k = column([min(p.top_k, k_max) if p.top_k > 0 else k_max for p in params], torch.long)  # 0: no top-k
    top_p = column([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None
    return sampling.filter_top_k_candidates(logits, top_k, k_max, top_p, min_p)


def logprobs_for_row(chosen: Tensor, top: Tensor | None, i: int, k: int, token_id: int) -> TokenLogprob:
    """Row i's TokenLogprob from host copies of the sampler's logprob outputs (top trimmed to the row's k)."""
    pairs = [] if top is None or k == 0 else [(int(a), float(b)) for a, b in top[i, :k].tolist()]
    return TokenLogprob(token_id, float(chosen[i]), pairs)
