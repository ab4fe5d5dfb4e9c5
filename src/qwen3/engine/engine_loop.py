"""The engine's step loop, as AsyncLLM runs it: requests and aborts in, each step's increments out.

One `EngineLoop` owns an LLM and runs wherever AsyncLLM puts it: in a background thread of the serving process,
or alone in an engine process of its own (engine_process.py), so that its Python work does not share a GIL with the
HTTP server's. The loop only talks through two callables:

    receive(block) -> list of ("add", (request_id, prompt, params)) | ("abort", request_id) | ("stop", None)
                      (block=True: wait until there is something; the loop has no work)
    emit(outputs, stats)   outputs: list of (request_id, StreamOutput | Exception), once per pass; stats: EngineStats

A request's validation error (LLM.make_sequence: prompt too long, bad token id, ...) comes back as its only output.
A step that raises fails the requests in flight and the loop goes on serving new ones. Aborts are applied between
steps, so an aborted request's blocks are free before the next step runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .llm import LLM
from .sequence import Sequence, TokenLogprob


@dataclass
class StreamOutput:
    """What one request gained since its last StreamOutput. `new_text` never splits a character and never shows
    text that a stop string later cuts; the pieces concatenate to the whole completion."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    prompt_token_ids: list[int]
    num_cached_tokens: int
    num_output_tokens: int  # cumulative
    new_logprobs: list[TokenLogprob] | None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of the KV blocks held by requests
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int


def delta(seq: Sequence) -> StreamOutput:
    """The part of `seq` not yet streamed, and mark it streamed."""
    tokens = seq.token_ids[seq.num_prompt_tokens + seq.stream_tokens : seq.num_tokens - seq.num_pending]
    seq.stream_tokens += len(tokens)
    text, seq.stream_text = seq.stream_text, ""
    logprobs = None
    if seq.logprobs is not None:
        logprobs = seq.logprobs[seq.stream_logprobs :]
        seq.stream_logprobs = len(seq.logprobs)
    return StreamOutput(seq.request_id, tokens, text, seq.finished, seq.finish_reason, seq.prompt_token_ids,
                        seq.num_cached_tokens or 0, seq.stream_tokens, logprobs)  # fmt: skip


def stats_of(llm: LLM) -> EngineStats:
    return EngineStats(llm.num_running, len(llm.scheduler.waiting), llm.block_manager.usage(),
                       llm.scheduler.num_preemptions, llm.prompt_tokens_total, llm.generation_tokens_total)  # fmt: skip


Output = tuple[str, StreamOutput | Exception]


class EngineLoop:
    """Step `llm` until asked to stop; see the module docstring for `receive` and `emit`."""

    def __init__(self, llm: LLM, receive: Callable[[bool], list], emit: Callable[[list[Output], EngineStats], None]
                 ) -> None:  # fmt: skip
        self.llm, self.receive, self.emit = llm, receive, emit
        self.seqs: dict[str, Sequence] = {}  # request id -> its sequence, while it runs
        if llm.tokenizer is not None:
            llm.tokenizer.byte_pieces  # noqa: B018 - the streams' decoding table, built now, not in the first request

    def run(self) -> None:
        llm = self.llm
        while True:
            outputs: list[Output] = []
            for kind, item in self.receive(not llm.has_work()):
                if kind == "add":
                    self._add(*item, outputs)
                elif kind == "abort":
                    self._abort(item, outputs)
                else:  # stop: the requests in flight end with "abort"
                    for request_id in list(self.seqs):
                        self._abort(request_id, outputs)
                    self.emit(outputs, stats_of(llm))
                    return
            if llm.has_work():
                self._step(outputs)
            if outputs or not llm.has_work():
                self.emit(outputs, stats_of(llm))

    def _add(self, request_id: str, prompt: object, params: object, outputs: list[Output]) -> None:
        try:
            seq = self.llm.make_sequence(repr(request_id), prompt, params, request_id, stream=True)
        except ValueError as error:
            outputs.append((request_id, error))
            return
        self.seqs[request_id] = seq
        self.llm.add(seq)

    def _abort(self, request_id: str, outputs: list[Output]) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.llm.abort(seq)
            outputs.append((request_id, delta(seq)))

    def _step(self, outputs: list[Output]) -> None:
        try:
            touched = self.llm.step()
        except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving new ones
            for request_id, seq in list(self.seqs.items()):
                self.llm.abort(seq)
                outputs.append((request_id, error))
            self.seqs.clear()
            return
        for seq in touched:
            if self.seqs.get(seq.request_id) is not seq:
                continue
            if seq.finished:
                del self.seqs[seq.request_id]
            outputs.append((seq.request_id, delta(seq)))
