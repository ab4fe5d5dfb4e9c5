"""Several HTTP processes in front of one engine process: `qwen3 serve --api-server-count N` (vLLM's flag).

Why: one Python process writes at most some tens of thousands of server-sent events per second (each is a JSON
chunk, a trip through the ASGI layers and a socket write). At 256 streams on an H200 the engine produces tokens
faster than that, so with one HTTP process the server, not the engine, set the pace.

How: this process (the supervisor) binds the listening socket, starts the engine process with one pipe per HTTP
process (engine/engine_process.py), and starts N HTTP processes. Each gets the socket (the kernel hands each new
connection to one of the processes accepting on it), its pipe (`AsyncLLM.connect`) and its row of the shared latency
histograms, so `/metrics` on any of them shows the whole server (the engine's gauges and counters come from the
engine itself). The supervisor prints the URL once every HTTP process listens. SIGTERM or Ctrl-C: it passes SIGTERM
on; each HTTP process drains its requests (bounded) and detaches from the engine, which exits after the last one.
Each HTTP process admits against the engine's waiting count (`--max-waiting`) and its own requests in flight.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.engine_process import STOP_TIMEOUT_S, portable_error, start_engine


@dataclass(frozen=True)
class FrontEnd:
    """What each HTTP process serves, as `qwen3 serve`'s flags say."""

    model_name: str
    directory: str | Path | None  # for generation_config.json (None: the defaults)
    api_keys: tuple[str, ...] = ()
    max_num_seqs: int = 256
    max_waiting: int | None = None
    stream_interval: int | str = 1
    drain_timeout: float = 30.0


def front_end_main(index: int, conn: Any, sock: socket.socket, options: FrontEnd, histograms: list[Any],
                   started: Any) -> int:  # fmt: skip
    """One HTTP process: its AsyncLLM on its pipe, the app, uvicorn on the shared socket. Reports (index, None)
    on `started` once listening, or (index, error) if the engine could not be reached."""
    from ..engine import AsyncLLM
    from .app import create_app, run_server
    from .serving import ServingContext

    try:
        engine = AsyncLLM.connect(conn, stream_interval=options.stream_interval)
    except BaseException as error:  # noqa: BLE001 - the supervisor raises it
        started.put((index, portable_error(error)))
        return 1
    ctx = ServingContext.for_engine(engine, options.model_name, options.directory)
    app = create_app(engine, ctx, api_keys=options.api_keys, max_num_seqs=options.max_num_seqs,
                     max_waiting=options.max_waiting, shared_metrics=(histograms, index))  # fmt: skip
    return run_server(app, sock=sock, drain_timeout=options.drain_timeout, banner=lambda: started.put((index, None)))


def _front_end_process(*args: Any) -> None:
    raise SystemExit(front_end_main(*args))


def serve_front_ends(count: int, factory: Callable[..., Any], args: tuple, kwargs: dict, sock: socket.socket,
                     options: FrontEnd, banner: str) -> int:  # fmt: skip
    """Serve with `count` HTTP processes over one engine process building `factory(*args, **kwargs)`, on `sock`
    (bound). Prints `banner` (with {url}) once all listen; returns 0 after a clean SIGTERM or Ctrl-C; raises what
    kept the engine from starting."""
    from .app import socket_url
    from .metrics import shared_histograms

    if count < 1:
        raise ValueError(f"--api-server-count: must be at least 1, found {count}")
    context = multiprocessing.get_context("spawn")
    engine, conns = start_engine(factory, args, kwargs, clients=count)
    histograms = shared_histograms(count)
    started = context.Queue()
    fronts = [context.Process(target=_front_end_process, args=(i, conn, sock, options, histograms, started),
                              name=f"qwen3-api-{i}") for i, conn in enumerate(conns)]  # fmt: skip
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for front in fronts:
            if front.pid is not None and front.is_alive():
                os.kill(front.pid, signal.SIGTERM)

    url = socket_url(sock)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for front in fronts:
            front.start()
        for conn in conns:
            conn.close()  # the HTTP processes hold the pipes now
        sock.close()  # and the socket
        error = _wait_until_listening(fronts, started, lambda: stopping)
        if error is not None:
            stop(signal.SIGTERM, None)
            raise error
        if not stopping:
            print(banner.format(url=url), flush=True)
        for front in fronts:
            front.join()
    finally:
        for front in fronts:
            if front.pid is not None:
                front.join(STOP_TIMEOUT_S)
                if front.is_alive():
                    front.kill()
        engine.join(STOP_TIMEOUT_S)  # it exits once every HTTP process has detached
        if engine.is_alive():
            engine.kill()
            engine.join(5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if all(front.exitcode == 0 for front in fronts) else 1


def _wait_until_listening(fronts: list[Any], started: Any, stopping: Callable[[], bool]) -> BaseException | None:
    """Wait until every HTTP process listens: None, or the error that stopped one (none once we are stopping)."""
    listening: set[int] = set()
    while len(listening) < len(fronts):
        try:
            index, error = started.get(timeout=0.5)
        except queue.Empty:
            if stopping():
                return None
            gone = next((front for front in fronts if front.exitcode is not None), None)
            if gone is not None:
                return RuntimeError(f"{gone.name} exited with code {gone.exitcode} before it listened")
            continue
        if stopping():
            return None
        if error is not None:
            return error
        listening.add(index)
    return None
