"""One request's state as it moves through the engine: its tokens, its KV blocks, how far it has been computed."""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass

from ..sampling import SamplingParams
from ..text import TextStream


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its blocks freed; it will be recomputed)
    RUNNING = "running"  # holds KV blocks; prefilling (in chunks) or decoding
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The sampled token's log-probability under the raw logits (fp32 log-softmax), and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Sequence:
    """A request. `token_ids` = prompt + output; the first `num_computed_tokens` have their keys and values in
    the KV blocks of `block_table` (block i holds positions i*block_size .. (i+1)*block_size - 1).

    After a preemption `num_computed_tokens` is 0 again and the whole of `token_ids` (prompt and output so far)
    is prefilled anew, mostly from the prefix cache."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int,
                 prompt: str | None = None, text: TextStream | None = None) -> None:  # fmt: skip
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self._prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival  # FCFS order, and preemption picks the newest
        self.status = Status.WAITING
        self.block_table = array("i")  # block ids; an array, so the runner copies tables without converting ints
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks registered so far
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prefix-cache hit at the first admission
        self.finish_reason: str | None = None
        self.text = text  # incremental detokenizer with stop strings (None: decode once at the end, or ids only)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.sampler_row = -1  # its row in the sampler's per-request state (penalty counts) while running
        self.num_pending = 0  # 1 while its last token is a placeholder for a sampled id still on the device
        self.length_capped = False  # its last token is in flight and reaches max_tokens or max_model_len
        self.stream_text = ""  # text produced since the last time a stream consumer read it
        self.stream_tokens = 0  # output tokens already handed to a stream consumer
        self.stream_logprobs = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def known_output_token_ids(self) -> list[int]:
        """The output tokens that have reached the host (without a placeholder in flight)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids  # one list for every stream increment (not copied each step)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")  # fmt: skip
