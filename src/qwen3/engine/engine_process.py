"""The engine in a process of its own: `AsyncLLM.spawn(qwen3.LLM, model, ...)`.

Why: a server's event loop and the engine's step loop are both Python. In one process they share the GIL, and at
hundreds of streams the HTTP work (a JSON chunk and a socket write per token) and the step loop's host work
(scheduling, packing, detokenizing) no longer fit in one core's time: on the H200 the server then delivered 62% of
what the same engine gives without HTTP at 256 streams. vLLM runs its engine core in a separate process for the
same reason. Here the engine process runs the EngineLoop (engine_loop.py) and the serving process keeps only the
tokenizer (for chat templates) and the streams.

The pipes (multiprocessing Connections; both ends are this package, so their pickling carries only our own
messages, never weights), one per serving process (`qwen3 serve --api-server-count N` runs N HTTP processes in front
of one engine; see server/front_ends.py):

    serving -> engine   ("add", (request_id, prompt, params)) | ("abort", request_id) | ("stop", None): this
                        serving process is done (its requests end with "abort"; the engine exits after the last)
    engine -> serving   ("ready", info) once the LLM is built, or ("error", exception) if building it failed;
                        then ("out", outputs, stats) per pass of the loop with that pipe's requests' outputs (and
                        with none, to a pipe whose stats are stale), outputs compact (see `_pack`): a request's
                        prompt ids travel once, with its first output, not with every token

A thread of each serving process reads its pipe and hands each pass to AsyncLLM's streams. The engine process
ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the server decides when the engine stops) and
exits when every serving process has sent "stop" or gone away (its pipe closes; its requests are aborted). If the
engine process dies, every request in flight fails with an error naming its exit code (where the serving process
started it), and new requests are refused.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .engine_loop import EngineLoop, EngineStats, Output, StreamOutput

STARTUP_TIMEOUT_S = 3600.0  # building the LLM may download a checkpoint and compile kernels
STOP_TIMEOUT_S = 30.0


def portable_error(error: BaseException) -> BaseException:
    """`error` if it survives the pipe, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle
        return RuntimeError(f"{type(error).__name__}: {error}")


def _pack(outputs: list[Output], announced: set[str]) -> list[tuple]:
    """One pass's outputs as tuples: (request_id, tokens, text, finished, reason, cached, count, logprobs, prompt
    ids the first time a request appears, else None) or (request_id, exception)."""
    packed = []
    for request_id, out in outputs:
        if isinstance(out, BaseException):
            packed.append((request_id, portable_error(out)))
            announced.discard(request_id)
            continue
        prompt = None
        if request_id not in announced:
            announced.add(request_id)
            prompt = out.prompt_token_ids
        if out.finished:
            announced.discard(request_id)
        packed.append((request_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason,
                       out.num_cached_tokens, out.num_output_tokens, out.new_logprobs, prompt))  # fmt: skip
    return packed


def engine_main(conns: list[Connection], factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """The engine process: build the LLM, report to every pipe, then run the loop on them."""
    # The serving process decides when the engine stops: a Ctrl-C, or a SIGTERM sent to the whole process group
    # (systemd, `timeout`, `kill -TERM -PGID`), must not end it while the server drains. A handler that does
    # nothing, not SIG_IGN: ignored signals stay ignored across exec, in the tensor-parallel workers too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        llm = factory(*args, **kwargs)
    except BaseException as error:  # noqa: BLE001 - reported to the serving processes, which raise it
        for conn in conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("error", portable_error(error)))
        return
    info = {"tokenizer": llm.tokenizer, "max_model_len": llm.max_model_len, "vocab_size": llm.config.vocab_size}
    live = []
    for conn in conns:
        with contextlib.suppress(BrokenPipeError, OSError):  # a serving process that is gone already
            conn.send(("ready", info))
            live.append(conn)
    pipes = _Pipes(live)
    try:
        EngineLoop(llm, pipes.receive, pipes.emit).run()
    finally:
        llm.shutdown()
        for conn in conns:
            conn.close()


class _Pipes:
    """The engine's side of the pipes: which pipe each request came from, and what each pipe has been sent."""

    def __init__(self, conns: list[Connection]) -> None:
        self.live = list(conns)
        self.owner: dict[str, Connection] = {}  # request id -> the pipe it came from, while it runs
        self.announced: dict[Connection, set[str]] = {conn: set() for conn in conns}
        self.sent_stats: dict[Connection, EngineStats | None] = {conn: None for conn in conns}
        self.closing: list[Connection] = []  # detached: closed after the pass that ends their requests

    def _detach(self, conn: Connection, items: list) -> None:
        """`conn`'s serving process is done (or gone): abort its requests; close it after they have ended."""
        self.live.remove(conn)
        items += [("abort", request_id) for request_id, owner in self.owner.items() if owner is conn]
        self.closing.append(conn)

    def receive(self, block: bool) -> list:
        items: list = []
        ready = multiprocessing.connection.wait(self.live, None if block else 0) if self.live else []
        while ready:
            for conn in ready:
                try:
                    kind, item = conn.recv()
                except (EOFError, OSError):  # the serving process is gone
                    self._detach(conn, items)
                    continue
                if kind == "stop":
                    self._detach(conn, items)
                    continue
                if kind == "add":
                    self.owner[item[0]] = conn
                items.append((kind, item))
            ready = multiprocessing.connection.wait(self.live, 0) if self.live else []
        if not self.live:
            items.append(("stop", None))  # every serving process is done
        return items

    def emit(self, outputs: list[Output], stats: EngineStats) -> None:
        by_conn: dict[Connection, list[Output]] = {}
        for request_id, out in outputs:
            conn = self.owner.get(request_id)
            if conn is None:
                continue
            by_conn.setdefault(conn, []).append((request_id, out))
            if isinstance(out, BaseException) or out.finished:
                del self.owner[request_id]
        for conn in [*self.live, *self.closing]:
            mine = by_conn.get(conn, [])
            if not mine and self.sent_stats[conn] == stats:
                continue
            try:
                conn.send(("out", _pack(mine, self.announced[conn]), stats))
                self.sent_stats[conn] = stats
            except (BrokenPipeError, OSError):
                pass  # that serving process is gone; the next receive detaches it
        for conn in self.closing:
            conn.close()
        self.closing.clear()


def start_engine(factory: Callable[..., Any], args: tuple, kwargs: dict, clients: int = 1
                 ) -> tuple[multiprocessing.process.BaseProcess, list[Connection]]:  # fmt: skip
    """Spawn the engine process with one pipe per serving process; returns it and the serving ends of the pipes.
    It builds `factory(*args, **kwargs)` and then answers "ready" (or "error") on every pipe."""
    context = multiprocessing.get_context("spawn")
    pairs = [context.Pipe() for _ in range(clients)]
    # Not a daemon: an engine with tensor parallelism starts worker processes of its own.
    process = context.Process(target=engine_main, args=([child for _, child in pairs], factory, args, kwargs),
                              name="qwen3-engine")  # fmt: skip
    process.start()
    for _, child in pairs:
        child.close()
    return process, [conn for conn, _ in pairs]


class EngineProcess:
    """One serving process's side of the engine process: sends requests on its pipe, and a reader thread delivers
    what comes back. `process`: the engine process, where this serving process started it (and so stops it, and
    names its exit code); None for a serving process that was only handed a pipe (server/front_ends.py)."""

    def __init__(self, conn: Connection, process: multiprocessing.process.BaseProcess | None,
                 deliver: Callable[[list[Output], EngineStats | None], None], in_flight: Callable[[], list[str]]
                 ) -> None:  # fmt: skip
        self._conn, self.process = conn, process
        self._send_lock = threading.Lock()
        self._prompts: dict[str, list[int]] = {}
        self.dead: str | None = None  # why the engine process is gone, once it is
        atexit.register(self.close)  # runs before multiprocessing's own exit hook joins the process
        try:
            message = self._conn.recv() if self._conn.poll(STARTUP_TIMEOUT_S) else ("timeout", None)
        except (EOFError, OSError):
            message = ("error", None)
        except BaseException:  # Ctrl-C while the model loads: the loading process cannot read "stop", end it now
            self._kill()
            raise
        if message[0] != "ready":
            self._kill()
            error = message[1]
            if isinstance(error, BaseException):
                raise error
            if message[0] == "timeout":
                raise RuntimeError(f"the engine process did not load the model within {STARTUP_TIMEOUT_S:.0f} s")
            code = None if process is None else process.exitcode
            raise RuntimeError(f"the engine process exited while loading the model (exit code {code})")
        info = message[1]
        self.tokenizer, self.max_model_len = info["tokenizer"], info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self._deliver, self._in_flight = deliver, in_flight
        self._reader = threading.Thread(target=self._read, name="qwen3-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def spawn(cls, factory: Callable[..., Any], args: tuple, kwargs: dict,
              deliver: Callable[[list[Output], EngineStats | None], None], in_flight: Callable[[], list[str]]
              ) -> EngineProcess:  # fmt: skip
        """Start an engine process of its own for this serving process; returns once the model is loaded."""
        process, (conn,) = start_engine(factory, args, kwargs)
        return cls(conn, process, deliver, in_flight)

    def send(self, kind: str, item: Any) -> None:
        if self.dead is not None:
            if kind == "add":
                raise RuntimeError(f"AsyncLLM: {self.dead}")
            return
        try:
            with self._send_lock:
                self._conn.send((kind, item))
        except (BrokenPipeError, OSError):
            if kind == "add":
                raise RuntimeError("AsyncLLM: the engine process has exited") from None

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            _, packed, stats = message
            outputs: list[Output] = []
            for item in packed:
                request_id = item[0]
                if len(item) == 2:
                    outputs.append((request_id, item[1]))
                    self._prompts.pop(request_id, None)
                    continue
                _, tokens, text, finished, reason, cached, count, logprobs, prompt = item
                if prompt is not None:
                    self._prompts[request_id] = prompt
                prompt = self._prompts.pop(request_id, []) if finished else self._prompts.get(request_id, [])
                outputs.append((request_id, StreamOutput(request_id, tokens, text, finished, reason, prompt, cached,
                                                         count, logprobs)))  # fmt: skip
            self._deliver(outputs, stats)
        code = None
        if self.process is not None:
            self.process.join(2.0)  # for its exit code; the requests in flight must not wait longer than that
            code = self.process.exitcode
        self.dead = f"the engine process has exited (exit code {code})" if code is not None else (
            "the engine process closed its pipe")
        # A clean stop has ended every request already; after a crash these fail.
        self._deliver([(request_id, RuntimeError(f"AsyncLLM: {self.dead}")) for request_id in self._in_flight()], None)

    def join(self) -> None:
        self._reader.join(STOP_TIMEOUT_S)
        self.close()

    def close(self) -> None:
        """Tell the engine this serving process is done; if it started the engine process, make sure that is gone
        (it exits once every serving process is done; killed if it does not, since it ignores SIGTERM)."""
        atexit.unregister(self.close)
        if self.process is None or self.process.is_alive():
            try:
                with self._send_lock:
                    self._conn.send(("stop", None))
            except (BrokenPipeError, OSError, AttributeError):
                pass
            if self.process is not None:
                self.process.join(STOP_TIMEOUT_S)
        self._kill()

    def _kill(self) -> None:
        atexit.unregister(self.close)
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self._conn.close()
