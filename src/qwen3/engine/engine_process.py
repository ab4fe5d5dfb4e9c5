"""The engine in a process of its own: `AsyncLLM.spawn(qwen3.LLM, model, ...)`.

Why: a server's event loop and the engine's step loop are both Python. In one process they share the GIL, and at
hundreds of streams the HTTP work (a JSON chunk and a socket write per token) and the step loop's host work
(scheduling, packing, detokenizing) no longer fit in one core's time: on the H200 the server then delivered 62% of
what the same engine gives without HTTP at 256 streams. vLLM runs its engine core in a separate process for the
same reason. Here the engine process runs the EngineLoop (engine_loop.py) and the serving process keeps only the
tokenizer (for chat templates) and the streams.

The pipe (a multiprocessing Connection; both ends are this package, so its pickling carries only our own
messages, never weights):

    serving -> engine   ("add", (request_id, prompt, params)) | ("abort", request_id) | ("stop", None)
    engine -> serving   ("ready", info) once the LLM is built, or ("error", exception) if building it failed;
                        then ("out", outputs, stats) per pass of the loop, outputs compact (see `_pack`): a
                        request's prompt ids travel once, with its first output, not with every token

A thread of the serving process reads the pipe and hands each pass to AsyncLLM's streams. The engine process
ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the server decides when the engine stops) and
exits when the serving process sends "stop" or goes away (the pipe closes). If the engine process dies, every
request in flight fails with an error naming its exit code, and new requests are refused.
"""

from __future__ import annotations

import atexit
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .engine_loop import EngineLoop, EngineStats, Output, StreamOutput

STARTUP_TIMEOUT_S = 3600.0  # building the LLM may download a checkpoint and compile kernels
STOP_TIMEOUT_S = 30.0


def _portable(error: BaseException) -> BaseException:
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
            packed.append((request_id, _portable(out)))
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


def engine_main(conn: Connection, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """The engine process: build the LLM, report, then run the loop on the pipe."""
    # The serving process decides when the engine stops: a Ctrl-C, or a SIGTERM sent to the whole process group
    # (systemd, `timeout`, `kill -TERM -PGID`), must not end it while the server drains. A handler that does
    # nothing, not SIG_IGN: ignored signals stay ignored across exec, in the tensor-parallel workers too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        llm = factory(*args, **kwargs)
    except BaseException as error:  # noqa: BLE001 - reported to the serving process, which raises it
        conn.send(("error", _portable(error)))
        return
    try:
        conn.send(("ready", {"tokenizer": llm.tokenizer, "max_model_len": llm.max_model_len,
                             "vocab_size": llm.config.vocab_size}))  # fmt: skip
    except (BrokenPipeError, OSError):  # the serving process is gone already
        llm.shutdown()
        return
    announced: set[str] = set()

    def receive(block: bool) -> list:
        items = []
        try:
            while conn.poll(None if block and not items else 0):
                items.append(conn.recv())
        except (EOFError, OSError):  # the serving process is gone
            items.append(("stop", None))
        return items

    def emit(outputs: list[Output], stats: EngineStats) -> None:
        try:
            conn.send(("out", _pack(outputs, announced), stats))
        except (BrokenPipeError, OSError):
            pass  # the serving process is gone; the next receive stops the loop

    try:
        EngineLoop(llm, receive, emit).run()
    finally:
        llm.shutdown()
        conn.close()


class EngineProcess:
    """The serving side of the engine process: sends requests, and a reader thread delivers what comes back."""

    def __init__(self, factory: Callable[..., Any], args: tuple, kwargs: dict,
                 deliver: Callable[[list[Output], EngineStats | None], None], in_flight: Callable[[], list[str]]
                 ) -> None:  # fmt: skip
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        # Not a daemon: an engine with tensor parallelism starts worker processes of its own.
        self.process = context.Process(target=engine_main, args=(child, factory, args, kwargs), name="qwen3-engine")
        self.process.start()
        child.close()
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
            code = self.process.exitcode
            raise RuntimeError(f"the engine process exited while loading the model (exit code {code})")
        info = message[1]
        self.tokenizer, self.max_model_len = info["tokenizer"], info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self._deliver, self._in_flight = deliver, in_flight
        self._reader = threading.Thread(target=self._read, name="qwen3-engine-reader", daemon=True)
        self._reader.start()

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
        """Make sure the engine process is gone: ask it to stop, then kill it if it does not (it ignores SIGTERM)."""
        atexit.unregister(self.close)
        if self.process.is_alive():
            try:
                with self._send_lock:
                    self._conn.send(("stop", None))
            except (BrokenPipeError, OSError, AttributeError):
                pass
            self.process.join(STOP_TIMEOUT_S)
        self._kill()

    def _kill(self) -> None:
        atexit.unregister(self.close)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self._conn.close()
