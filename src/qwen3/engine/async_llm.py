"""qwen3.AsyncLLM: the engine as an asyncio service, for servers.

The step loop runs in one background thread and owns the LLM. Coroutines hand it requests and aborts through a
thread-safe queue (plus an event that wakes an idle loop). After each step the loop thread appends each touched
request's increment to that request's `pending` deque and wakes the waiting coroutines with ONE
`call_soon_threadsafe` per event loop (not one per request: each is a self-pipe write and a callback). A coroutine
that wakes takes everything pending at once and yields it merged as one StreamOutput, so a consumer that falls
behind the engine gets one increment with several tokens instead of a backlog of one-token increments (as vLLM's
output aggregation does under load). With `stream_interval=N` a coroutine is woken only for its first token, every
N tokens and its end (vLLM's `--stream-interval`): fewer, larger increments, for servers whose event loop shares the
GIL with this thread under many streams. `stream_interval="auto"` is 1 up to 64 requests in flight and then
ceil(requests / 64), so the event loop handles about as many wake-ups per step as at 64 streams. Aborts are
applied between steps, so an aborted request's blocks are free before the next step runs.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from ..sampling import SamplingParams
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


def merge(outputs: list[StreamOutput]) -> StreamOutput:
    """Consecutive increments of one request as one: tokens, text and logprobs joined, the rest from the last."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = None
    if any(o.new_logprobs is not None for o in outputs):
        logprobs = [lp for o in outputs for lp in o.new_logprobs or ()]
    return StreamOutput(last.request_id, [t for o in outputs for t in o.new_token_ids],
                        "".join(o.new_text for o in outputs), last.finished, last.finish_reason, last.prompt_token_ids,
                        last.num_cached_tokens, last.num_output_tokens, logprobs)  # fmt: skip


class _Stream:
    """A request's way back to its coroutine: increments (or an error) in `pending`, appended by the loop thread and
    taken by the coroutine (deque appends and pops are atomic); `waiter` is the coroutine's future while it waits
    (touched on its event loop only)."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop, phase: int = 0) -> None:
        self.seq, self.loop = seq, loop
        self.pending: collections.deque[StreamOutput | BaseException] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.unannounced = -1  # (step thread) tokens handed over since the last wake-up; -1: none yet
        self.phase = phase  # streams started together wake on different steps (stream_interval > 1)

    def wake(self) -> None:
        """On the stream's event loop: let its coroutine take what is pending."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _wake_all(streams: list[_Stream]) -> None:
    for stream in streams:
        stream.wake()


def _send(items: Iterable[tuple[_Stream, StreamOutput | BaseException]], stream_interval: int = 1) -> None:
    """Hand increments over, then wake their coroutines (one callback per event loop): each at its first token, its
    end, an error, and otherwise once `stream_interval` tokens have gathered. After the first token a stream counts
    `phase % stream_interval` tokens as gathered already, so that streams which started together (a benchmark's)
    do not all wake on the same step: bursts would hold the GIL against the step thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Stream]] = {}
    for stream, item in items:
        stream.pending.append(item)
        if isinstance(item, StreamOutput) and not item.finished:
            if stream.unannounced >= 0:
                stream.unannounced += len(item.new_token_ids)
                if stream.unannounced < stream_interval:
                    continue
            elif not item.new_token_ids:
                continue
        stream.unannounced = stream.phase % stream_interval if stream.unannounced < 0 else 0
        by_loop.setdefault(stream.loop, []).append(stream)
    for loop, streams in by_loop.items():
        try:
            loop.call_soon_threadsafe(_wake_all, streams)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass


AUTO_STREAMS = 64  # up to this many streams, "auto" streams every token


def auto_stream_interval(num_streams: int) -> int:
    """The "auto" stream interval: 1 up to AUTO_STREAMS requests in flight, then ceil(requests / AUTO_STREAMS)."""
    return max(1, -(-num_streams // AUTO_STREAMS))


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


class AsyncLLM:
    """Serve an LLM to many coroutines: `async for out in engine.generate(prompt, params): ...`.

    `stream_interval`: wake a stream's coroutine every this many tokens (1: every step), or "auto" (see the module
    docstring).
    """

    def __init__(self, llm: LLM, stream_interval: int | str = 1) -> None:
        if stream_interval != "auto" and (not isinstance(stream_interval, int) or stream_interval < 1):
            raise ValueError(f'stream_interval: must be an integer >= 1 or "auto", found {stream_interval!r}')
        self.llm = llm
        self.stream_interval = stream_interval
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids: set[str] = set()  # request ids in flight (added from coroutines, removed by the loop)
        self._ids_lock = threading.Lock()
        self._stopping = False
        self._phases = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="qwen3-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------------------
    # The coroutine side

    async def generate(self, prompt: str | SequenceABC[int], sampling_params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamOutput]:  # fmt: skip
        """Stream one request's increments; the last has finished=True. Closing the iterator early aborts it."""
        if self._stopping:
            raise RuntimeError("AsyncLLM: the engine is shut down")
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        seq = self.llm.make_sequence(repr(request_id), prompt, sampling_params, request_id, stream=True)
        with self._ids_lock:
            if request_id in self._ids:
                raise ValueError(f"request {request_id!r}: a request with this id is already running")
            self._ids.add(request_id)
        loop = asyncio.get_running_loop()
        stream = _Stream(seq, loop, next(self._phases))
        self._inbox.put(("add", stream))
        self._wake.set()
        finished = False
        try:
            while True:
                if not stream.pending:
                    stream.waiter = loop.create_future()
                    try:
                        await stream.waiter
                    finally:
                        stream.waiter = None
                    continue
                items = []
                while stream.pending:
                    items.append(stream.pending.popleft())
                error = next((item for item in items if isinstance(item, BaseException)), None)
                outputs = [item for item in items if not isinstance(item, BaseException)]
                if outputs:
                    out = merge(outputs)
                    finished = out.finished or error is not None
                    yield out
                if error is not None:
                    finished = True
                    raise error
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the next step and its iterator ends with "abort"."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        llm = self.llm
        return EngineStats(len(llm.scheduler.running), len(llm.scheduler.waiting), llm.block_manager.usage(),
                           llm.scheduler.num_preemptions, llm.prompt_tokens_total,
                           llm.generation_tokens_total)  # fmt: skip

    async def shutdown(self) -> None:
        """Stop the loop thread (running requests end with "abort")."""
        self._stopping = True
        self._inbox.put(("stop", None))
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    # -------------------------------------------------------------------------------------------
    # The loop thread

    def _end(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        with self._ids_lock:
            self._ids.discard(request_id)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self.llm.abort(stream.seq)
        self._end(request_id)  # before the last output goes out: its consumer may reuse the id at once
        _send([(stream, delta(stream.seq))])

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; False once asked to stop."""
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                self._streams[item.seq.request_id] = item
                self.llm.add(item.seq)
            elif kind == "abort":
                self._abort(item)
            else:
                for request_id in list(self._streams):
                    self._abort(request_id)
                return False

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            if not self._drain_inbox():
                return
            if not self.llm.has_work():
                self._wake.wait()
                continue
            try:
                touched = self.llm.step()
            except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving new ones
                failed = []
                for request_id, stream in list(self._streams.items()):
                    self.llm.abort(stream.seq)
                    self._end(request_id)
                    failed.append((stream, error))
                _send(failed)
                continue
            ready = []
            for seq in touched:
                stream = self._streams.get(seq.request_id)
                if stream is None:
                    continue
                if seq.finished:
                    self._end(seq.request_id)
                ready.append((stream, delta(seq)))
            interval = self.stream_interval
            if interval == "auto":
                interval = auto_stream_interval(len(self._streams))
            _send(ready, interval)
