"""Token sampling: pure functions from logits (B, V) to token ids (B,).

Every function works on any device and input dtype and computes in float32. None of them
synchronises with the host (no ``.item()``, no branching on tensor values, no
``torch.multinomial``), so a decode step that calls them can be captured in a CUDA graph; the
only branches are on the Python values in ``SamplingParams``, which are fixed for a capture.

The pipeline in ``sample`` is: penalties -> temperature -> top-k -> top-p -> min-p -> draw.

* Penalties follow vLLM. ``repetition_penalty`` (CTRL / transformers semantics: a positive
  logit is divided by it, a negative one multiplied) applies to every token seen in the prompt
  *or* the output, because that is what transformers does for decoder-only models (its
  ``input_ids`` hold the prompt) and what vLLM does. ``presence_penalty`` and
  ``frequency_penalty`` (OpenAI semantics: ``logit -= frequency * count + presence * [count > 0]``)
  apply to generated tokens only, as in the OpenAI API and vLLM: they exist to stop the model
  repeating itself, not to steer it away from words of the question. Repetition goes first.
* The filters reproduce transformers' ``TopKLogitsWarper``, ``TopPLogitsWarper`` and
  ``MinPLogitsWarper`` applied in that order (the order of ``GenerationMixin``), each keeping at
  least one token: top-k keeps every logit >= the k-th largest (so ties at the boundary are all
  kept); top-p renormalises what top-k left and keeps the smallest set of most likely tokens whose
  mass reaches ``top_p`` (the same ascending-sort cumulative sum as transformers, so the same set);
  min-p keeps tokens whose probability is >= ``min_p`` times the largest.
* With a top-k of at most TOP_K_CANDIDATES (Qwen3's generation config asks for 20), ``sample`` applies
  the three filters to each row's k + TIE_MARGIN largest logits only (``filter_top_k_candidates``): every
  other token is removed by top-k anyway, so the draw is the same, without sorting the vocabulary.
* The draw is the exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` i.i.d. picks token
  ``i`` with probability ``p_i`` exactly (``E_i / p_i`` is Exp(p_i), and the smallest of independent
  exponentials is ``i`` with probability ``p_i / sum p``). The noise is clamped away from 0 so a
  filtered token (``p = 0``) can never win through ``0 / 0 = nan``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Below this temperature the distribution is a point mass in float32 anyway (and logits / T can
# overflow), so the draw is replaced by argmax; vLLM uses the same threshold (_SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5

MAX_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit)

# Fields that a Hugging Face generation_config.json shares with SamplingParams.
_GENERATION_CONFIG_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; the defaults sample from the unmodified softmax."""

    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy (argmax)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # in (0, 1]; 1 disables
    min_p: float = 0.0  # in [0, 1]; 0 disables
    presence_penalty: float = 0.0  # OpenAI/vLLM, in [-2, 2], output tokens only
    frequency_penalty: float = 0.0  # OpenAI/vLLM, in [-2, 2], output tokens only
    repetition_penalty: float = 1.0  # CTRL/transformers, > 0, prompt and output tokens
    seed: int | None = None
    # The engine's (qwen3.LLM) request fields; qwen3.generate takes its own max_new_tokens and stop arguments.
    max_tokens: int = 16  # >= 1 generated tokens at most
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (a str or list is accepted)
    stop_token_ids: tuple[int, ...] = ()  # ids that end the generation like EOS (kept in token_ids, not in text)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: int | None = None  # None: no logprobs; k in 0..20: the sampled token's logprob and the top k

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            _check(name, value, isinstance(value, numbers.Real) and not isinstance(value, bool), "a number")
            object.__setattr__(self, name, float(value))
        _check("top_k", self.top_k, _is_int(self.top_k), "an integer >= 0 (0 disables top-k)")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            _check("seed", self.seed, _is_int(self.seed) and 0 <= self.seed < 2**64, "None or in [0, 2**64)")
            object.__setattr__(self, "seed", int(self.seed))

        t, rp = self.temperature, self.repetition_penalty
        _check("temperature", t, math.isfinite(t) and t >= 0, "a finite number >= 0 (0 means greedy)")
        _check("top_k", self.top_k, self.top_k >= 0, "an integer >= 0 (0 disables top-k)")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _check("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        _check("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2, "in [-2, 2]")
        _check("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2, "in [-2, 2]")
        _check("repetition_penalty", rp, math.isfinite(rp) and rp > 0, "a finite number > 0 (1 disables)")
        _check("max_tokens", self.max_tokens, _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        _check("stop", self.stop, isinstance(stop, (list, tuple)) and all(isinstance(x, str) and x for x in stop),
               "a non-empty string or a list of non-empty strings")  # fmt: skip
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        _check("stop_token_ids", ids, isinstance(ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in ids),
               "a list of token ids (integers >= 0)")  # fmt: skip
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        _check("ignore_eos", self.ignore_eos, isinstance(self.ignore_eos, bool), "True or False")
        lp = self.logprobs
        _check("logprobs", lp, lp is None or (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS), f"None or 0..{MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_generation_config(cls, source: dict[str, Any] | str | os.PathLike, **overrides: Any) -> SamplingParams:
        """Read temperature/top_k/top_p/min_p/repetition_penalty from a generation_config.json.

        ``source`` is the parsed dict, the file, or the model directory holding it. Fields absent
        (or null) in the file keep this class's defaults, as vLLM does (transformers would fill in
        its own, e.g. top_k=50). An explicit ``"do_sample": false`` means greedy; a missing
        ``do_sample`` is taken as sampling with the listed values. Overrides win; a ``None``
        override keeps the file's value.
        """
        if isinstance(source, dict):
            config = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "generation_config.json"
            config = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown SamplingParams field(s) {unknown}; known: {sorted(known)}")
        values = {name: config[name] for name in _GENERATION_CONFIG_FIELDS if config.get(name) is not None}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it must be {allowed}")


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``params.seed``; None (the global RNG) when unseeded."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def update_counts(token_counts: Tensor, next_ids: Tensor) -> None:
    """Add one to ``token_counts[b, next_ids[b]]`` for every row b, in place."""
    index = next_ids.unsqueeze(-1)  # (B, 1)
    token_counts.scatter_add_(-1, index, torch.ones_like(index, dtype=token_counts.dtype))


def apply_penalties(
    logits: Tensor,
    token_counts: Tensor | None,
    params: SamplingParams,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Penalise repeated tokens; returns new float32 logits (see the module docstring).

    ``token_counts`` (B, V) counts the tokens generated so far; ``prompt_mask`` (B, V) bool marks
    the tokens of the prompt, which only ``repetition_penalty`` looks at. Either may be None.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        if token_counts is not None:
            seen = seen | (token_counts > 0)
        if prompt_mask is not None:
            seen = seen | prompt_mask
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if token_counts is not None:
        if params.frequency_penalty != 0.0:
            logits = logits - params.frequency_penalty * token_counts.float()
        if params.presence_penalty != 0.0:
            logits = logits - params.presence_penalty * (token_counts > 0).float()
    return logits


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Top-k, then top-p, then min-p; removed logits become -inf, kept ones are unchanged (float32)."""
    if top_k < 0 or not 0 < top_p <= 1 or not 0 <= min_p <= 1:
        raise ValueError(f"need top_k >= 0, top_p in (0, 1], min_p in [0, 1]; got {top_k}, {top_p}, {min_p}")
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p < 1.0:
        # Ascending order: drop the low tail whose total mass is <= 1 - top_p, never the top token.
        sorted_logits, order = torch.sort(logits, dim=-1)
        tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = tail_mass <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    return logits


TOP_K_CANDIDATES = 1024  # a top-k at most this filters and draws among each row's largest logits only
TIE_MARGIN = 64  # candidates taken beyond k, so that tokens tied with the k-th value stay in


def filter_top_k_candidates(
    logits: Tensor,
    top_k: int | Tensor,
    k_max: int,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """filter_logits among each row's k_max + TIE_MARGIN largest logits (k_max >= every row's top_k):
    (values (B, C) in descending order, removed ones -inf; their vocabulary ids (B, C)).

    After top-k every other token is removed anyway, so a draw among these candidates is the same draw, without
    sorting the whole vocabulary (Qwen3's generation config asks for top-k 20). The top-p arithmetic is
    filter_logits' (softmax, ascending cumulative sum) on the same values. The one difference: a k-th value tied
    by more than TIE_MARGIN further tokens keeps only TIE_MARGIN of them. top_k, top_p, min_p are numbers or
    (B, 1) tensors (one per row); None skips a stage."""
    V = logits.shape[-1]
    values, ids = torch.topk(logits.float(), min(V, k_max + TIE_MARGIN), dim=-1)  # descending
    last = top_k - 1 if isinstance(top_k, Tensor) else torch.full_like(ids[..., :1], top_k - 1)
    values = values.masked_fill(values < values.gather(-1, last), -math.inf)  # ties with the k-th kept
    if top_p is not None:
        mass = values.flip(-1).softmax(dim=-1).cumsum(dim=-1)  # ascending, as filter_logits
        drop = mass <= 1 - top_p
        drop[..., -1] = False  # never the top token
        values = values.masked_fill(drop.flip(-1), -math.inf)
    if min_p is not None:
        probs = values.softmax(dim=-1)
        values = values.masked_fill(probs < min_p * probs[..., :1], -math.inf)
    return values, ids


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    token_counts: Tensor | None = None,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Next token ids (B,) int64: penalties -> temperature -> filters -> exponential race."""
    logits = apply_penalties(logits, token_counts, params, prompt_mask)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    ids = None
    if 0 < params.top_k <= min(TOP_K_CANDIDATES, logits.shape[-1] - 1):  # the same filters and draw, among the
        # top k only (no sort of the vocabulary)
        top_p = params.top_p if params.top_p < 1.0 else None
        min_p = params.min_p if params.min_p > 0.0 else None
        logits, ids = filter_top_k_candidates(logits, params.top_k, params.top_k, top_p, min_p)
    else:
        logits = filter_logits(logits, params.top_k, params.top_p, params.min_p)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    choice = (probs / noise).argmax(dim=-1)
    return choice if ids is None else ids.gather(-1, choice[..., None])[..., 0]
