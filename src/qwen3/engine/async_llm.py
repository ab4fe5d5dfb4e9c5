"""qwen3.AsyncLLM: the engine as an asyncio service, for servers.

One step loop (engine_loop.py) owns the LLM: in a background thread (`AsyncLLM(llm)`), or in an engine process of
its own (`AsyncLLM.spawn(qwen3.LLM, ...)`, engine_process.py: what `qwen3 serve` runs, so that the loop's Python
work does not share the GIL with the HTTP server), which several serving processes may share (`AsyncLLM.connect`).
Coroutines hand it requests and aborts. After each step the
loop's side (its thread, or the thread reading the engine process's pipe) appends each touched request's increment
to that request's `pending` deque and wakes the waiting coroutines with ONE `call_soon_threadsafe` per event loop
(not one per request: each is a self-pipe write and a callback). A coroutine that wakes takes everything pending
at once and yields it merged as one StreamOutput, so a consumer that falls behind the engine gets one increment
with several tokens instead of a backlog of one-token increments (as vLLM's output aggregation does under load).
With `stream_interval=N` a coroutine is woken only for its first token, every N tokens and its end (vLLM's
`--stream-interval`): fewer, larger increments, for an event loop that cannot keep up with every step.
`stream_interval="auto"` is 1 up to 64 requests in flight and then ceil(requests / 64), so the event loop handles
about as many wake-ups per step as at 64 streams. Aborts are applied between steps, so an aborted request's blocks
are free before the next step runs.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from collections.abc import Sequence as SequenceABC
from typing import Any

from ..sampling import SamplingParams
from .engine_loop import EngineLoop, EngineStats, Output, StreamOutput, stats_of
from .llm import LLM


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

    def __init__(self, request_id: str | None, loop: asyncio.AbstractEventLoop, phase: int = 0) -> None:
        self.request_id, self.loop = request_id, loop
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


class _ThreadCore:
    """The EngineLoop in a background thread of this process, fed through a thread-safe queue."""

    def __init__(self, llm: LLM, deliver: Callable[[list[Output], EngineStats | None], None],
                 in_flight: Callable[[], list[str]]) -> None:  # fmt: skip
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._deliver, self._in_flight = deliver, in_flight
        self.dead: str | None = None  # why the loop has stopped, if it failed
        loop = EngineLoop(llm, self._receive, deliver)
        self._thread = threading.Thread(target=self._run, args=(loop,), name="qwen3-engine", daemon=True)
        self._thread.start()

    def _run(self, loop: EngineLoop) -> None:
        try:
            loop.run()
        except BaseException as error:  # noqa: BLE001 - a bug outside a step: fail what waits, refuse new requests
            self.dead = f"the engine loop failed ({type(error).__name__}: {error})"
            self._deliver([(request_id, RuntimeError(f"AsyncLLM: {self.dead}")) for request_id in self._in_flight()],
                          None)  # fmt: skip

    def _receive(self, block: bool) -> list:
        if block:
            self._wake.wait()
        self._wake.clear()
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def send(self, kind: str, item: Any) -> None:
        if self.dead is not None and kind == "add":
            raise RuntimeError(f"AsyncLLM: {self.dead}")
        self._inbox.put((kind, item))
        self._wake.set()

    def join(self) -> None:
        self._thread.join()


class AsyncLLM:
    """Serve an LLM to many coroutines: `async for out in engine.generate(prompt, params): ...`.

    `AsyncLLM(llm)` steps `llm` in a background thread of this process; `AsyncLLM.spawn(factory, ...)` builds the
    LLM in an engine process of its own (engine_process.py), as `qwen3 serve` does; `AsyncLLM.connect(pipe)` is one
    of several serving processes sharing an engine process (`qwen3 serve --api-server-count N`). All behave the same.
    `stream_interval`: wake a stream's coroutine every this many tokens (1: every step), or "auto" (see the module
    docstring).
    """

    def __init__(self, llm: LLM, stream_interval: int | str = 1) -> None:
        self._setup(stream_interval)
        self.tokenizer, self.max_model_len, self.vocab_size = llm.tokenizer, llm.max_model_len, llm.config.vocab_size
        self.llm = llm
        self._stats = stats_of(llm)
        self._core: Any = _ThreadCore(llm, self._deliver, lambda: list(self._streams))

    @classmethod
    def spawn(cls, factory: Callable[..., LLM], *args: Any, stream_interval: int | str = 1, **kwargs: Any
              ) -> AsyncLLM:  # fmt: skip
        """An AsyncLLM whose engine, `factory(*args, **kwargs)` (e.g. `qwen3.LLM` and its arguments), is built and
        stepped in a process of its own (spawned; the factory and its arguments must pickle, and a script that
        calls this needs the `if __name__ == "__main__":` guard, as always with spawn). Returns once the model is
        loaded; an error building it is raised here."""
        from .engine_process import EngineProcess

        return cls._over_pipe(lambda deliver, in_flight: EngineProcess.spawn(factory, args, kwargs, deliver, in_flight),
                              stream_interval)  # fmt: skip

    @classmethod
    def connect(cls, conn: Any, stream_interval: int | str = 1) -> AsyncLLM:
        """An AsyncLLM over one pipe of an engine process that another process started (`engine_process.
        start_engine(..., clients=N)`: N serving processes share one engine). Returns once the model is loaded.
        `shutdown()` detaches this process; the engine process exits when the last one has."""
        from .engine_process import EngineProcess

        return cls._over_pipe(lambda deliver, in_flight: EngineProcess(conn, None, deliver, in_flight), stream_interval)

    @classmethod
    def _over_pipe(cls, core: Callable[..., Any], stream_interval: int | str) -> AsyncLLM:
        """An AsyncLLM whose engine is in another process, behind `core(deliver, in_flight)` (an EngineProcess)."""
        self = cls.__new__(cls)
        self._setup(stream_interval)
        self._stats = EngineStats(0, 0, 0.0, 0, 0, 0)
        self._core = pipe = core(self._deliver, lambda: list(self._streams))
        self.tokenizer, self.max_model_len, self.vocab_size = pipe.tokenizer, pipe.max_model_len, pipe.vocab_size
        return self

    def _setup(self, stream_interval: int | str) -> None:
        if stream_interval != "auto" and (not isinstance(stream_interval, int) or stream_interval < 1):
            raise ValueError(f'stream_interval: must be an integer >= 1 or "auto", found {stream_interval!r}')
        self.stream_interval = stream_interval
        self._streams: dict[str, _Stream] = {}  # requests in flight (added by coroutines, removed by the loop)
        self._streams_lock = threading.Lock()
        self._stopping = False
        self._phases = itertools.count()

    # -------------------------------------------------------------------------------------------
    # The coroutine side

    async def generate(self, prompt: str | SequenceABC[int], sampling_params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamOutput]:  # fmt: skip
        """Stream one request's increments; the last has finished=True. Closing the iterator early aborts it.
        A request the engine refuses (ValueError naming what is wrong) raises on the first await."""
        if self._stopping:
            raise RuntimeError("AsyncLLM: the engine is shut down")
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, next(self._phases))
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request {request_id!r}: a request with this id is already running")
            self._streams[request_id] = stream
        try:
            self._core.send("add", (request_id, prompt, sampling_params))
        except BaseException:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            raise
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
            # Unfinished: abort it, unless its end was delivered already and the id may belong to a newer request.
            if not finished and self._streams.get(request_id) is stream:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the next step and its iterator ends with "abort"."""
        self._core.send("abort", request_id)

    def stats(self) -> EngineStats:
        """The engine's counts as of its loop's last pass (a step or an abort ago at most)."""
        return self._stats

    @property
    def dead(self) -> str | None:
        """Why the engine can take no more requests (its process has exited, its loop failed), or None."""
        return self._core.dead

    async def shutdown(self) -> None:
        """Stop the engine (running requests end with "abort") and wait for it."""
        if not self._stopping:
            self._stopping = True
            self._core.send("stop", None)
        await asyncio.to_thread(self._core.join)

    # -------------------------------------------------------------------------------------------
    # The engine side (its thread, or the thread reading the engine process's pipe)

    def _deliver(self, outputs: list[Output], stats: EngineStats | None) -> None:
        """Hand one pass's outputs (and the stats after it) to their streams; a request's last output (or error)
        ends it first, so that its consumer may reuse the id at once. The order matters: streams that ended leave
        first, then the stats are replaced, then the consumers wake. So stats never show a request gone whose
        stream still holds its id, and a consumer woken by its last output sees the stats that counted it."""
        ready = []
        for request_id, item in outputs:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                with self._streams_lock:
                    self._streams.pop(request_id, None)
            ready.append((stream, item))
        if stats is not None:
            self._stats = stats
        interval = self.stream_interval
        if interval == "auto":
            interval = auto_stream_interval(len(self._streams))
        _send(ready, interval)
