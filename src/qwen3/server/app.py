"""The OpenAI-compatible HTTP server: a FastAPI app over `AsyncLLM`, and the uvicorn runner.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
`GET /metrics`, and `GET /` (the chat page, one static file).

* Bodies are parsed by hand (`await request.json()` + pydantic), so malformed JSON and invalid values get
  OpenAI's 400 error shape rather than FastAPI's 422; unknown routes and methods get the same shape; an
  unexpected exception is logged here and the client sees a one-line 500, never a traceback.
* Each choice is one engine request. A streamed response stops iterating when the client goes away
  (Starlette cancels the response task on `http.disconnect`); a non-streamed one races the generation
  against the disconnect message. Either way the engine iterator is closed and the request aborted, which
  frees its KV blocks at once.
* Streaming is the per-token hot path: one choice reads its engine stream directly (no task or queue between),
  `AsyncLLM` hands over everything a lagging stream has not taken as one increment (one chunk), and `ChunkWriter`
  formats chunks from a pre-serialised envelope (`tests/test_server_fast_paths.py` holds it to `json.dumps`).
* Admission: with `max_waiting` set, a request that would make more than `max_waiting` requests wait for a
  batch slot (in-flight requests beyond `max_num_seqs`, or what the engine reports waiting) gets 429 with
  `Retry-After`.
* SIGTERM (and Ctrl-C): uvicorn stops accepting connections and lets in-flight responses finish, for at
  most `drain_timeout` seconds; then the engine shuts down and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE, Metrics
from .parsers import ChatOutputParser, ToolCallDelta
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from .serving import (
    Accumulated,
    Prepared,
    ServingContext,
    chat_finish_reason,
    chat_logprobs,
    chat_response,
    completion_logprobs,
    completion_response,
    envelope,
    new_id,
    prepare_chat,
    prepare_completion,
    usage,
)

logger = logging.getLogger("qwen3.server")
PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class Increment:
    """One or more consecutive engine outputs of a choice, merged (the fields the responses read)."""

    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[Any] | None
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int

    @classmethod
    def of(cls, out: Any) -> Increment:
        logprobs = None if out.new_logprobs is None else list(out.new_logprobs)
        return cls(
            list(out.new_token_ids), out.new_text, logprobs, out.finished, out.finish_reason, out.num_cached_tokens
        )

    def extend(self, out: Any) -> None:
        self.new_token_ids += out.new_token_ids
        self.new_text += out.new_text
        if out.new_logprobs is not None:
            self.new_logprobs = (self.new_logprobs or []) + list(out.new_logprobs)
        self.finished, self.finish_reason, self.num_cached_tokens = (
            out.finished,
            out.finish_reason,
            out.num_cached_tokens,
        )


def _tool_call_deltas(pieces: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The `tool_calls` entries of stream deltas, as OpenAI streams them: a call's first with its index, id, type,
    name and `arguments: ""`, then its arguments text (the pieces of one push joined into one delta)."""
    deltas: list[dict[str, Any]] = []
    for piece in pieces:
        if piece.id is not None:
            function = {"name": piece.name, "arguments": ""}
            deltas.append({"index": piece.index, "id": piece.id, "type": "function", "function": function})
            if not piece.arguments:
                continue
        last = deltas[-1] if deltas else None
        if last is not None and last["index"] == piece.index and "id" not in last:
            last["function"]["arguments"] += piece.arguments
        else:
            deltas.append({"index": piece.index, "function": {"arguments": piece.arguments}})
    return deltas


class _ClientGone(Exception):
    """The client disconnected before its non-streamed response was ready."""


def engine_dead_error(engine: Any) -> APIError | None:
    """503 `engine_dead` when the engine can serve nothing (its process has exited, its loop failed), else None."""
    dead = getattr(engine, "dead", None)
    if not dead:
        return None
    return APIError(f"The engine is not running: {dead}", status=503, type="server_error", code="engine_dead")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {_dumps(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
_json_str = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) writes for a str, in C


class ChunkWriter:
    """The SSE events of one streamed response, serialised cheaply (this runs for every increment of every stream).

    The envelope (id, object, created, model) is serialised once; an event is that head, one choice's JSON, and
    the tail. The common choices (text, content, reasoning) are formatted from pre-split strings; anything else
    goes through `json.dumps`. Each event is byte for byte `_sse(envelope(..., [choice]))`.
    """

    def __init__(self, ctx: ServingContext, kind: str, request_id: str, created: int) -> None:
        self.envelope = lambda choices, **extra: envelope(ctx, kind, request_id, created, choices, **extra)
        head = _dumps(self.envelope([]))
        assert head.endswith('"choices":[]}')
        self.head = "data: " + head[:-2]

    def event(self, choice_json: str) -> str:
        return self.head + choice_json + "]}\n\n"

    def event_with(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse(self.envelope(choices, **extra))


def _finish_json(finish_reason: str | None) -> str:
    return "null" if finish_reason is None else _json_str(finish_reason)


def completion_choice_json(index: int, text: str, logprobs: Any, finish_reason: str | None) -> str:
    """`{"index", "text", "logprobs", "finish_reason"}` of a text-completion chunk, as compact JSON."""
    lp = "null" if logprobs is None else _dumps(logprobs)
    return f'{{"index":{index},"text":{_json_str(text)},"logprobs":{lp},"finish_reason":{_finish_json(finish_reason)}}}'


def chat_choice_json(index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None) -> str:
    """`{"index", "delta", "logprobs", "finish_reason"}` of a chat chunk, as compact JSON."""
    keys = tuple(delta)
    if keys == ("content",):
        body = f'{{"content":{_json_str(delta["content"])}}}'
    elif keys == ("reasoning_content", "reasoning") and delta["reasoning"] == delta["reasoning_content"]:
        text = _json_str(delta["reasoning"])
        body = f'{{"reasoning_content":{text},"reasoning":{text}}}'
    else:
        body = _dumps(delta)
    lp = "null" if logprobs is None else _dumps(logprobs)
    return f'{{"index":{index},"delta":{body},"logprobs":{lp},"finish_reason":{_finish_json(finish_reason)}}}'


class OpenAIServer:
    """Request handling over one engine; `create_app` wires it to routes."""

    def __init__(
        self,
        engine: Any,
        ctx: ServingContext,
        *,
        api_keys: Sequence[str] = (),
        max_num_seqs: int = 256,
        max_waiting: int | None = None,
        shared_metrics: tuple[list[Any], int] | None = None,
    ) -> None:
        self.engine, self.ctx = engine, ctx
        self.api_keys = [key.encode() for key in api_keys]
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.in_flight = 0  # engine requests started and not yet ended (by this process)
        self.metrics = Metrics(engine.stats, ctx.model_name, shared_metrics)

    # -------------------------------------------------------------------------------------------------
    # Checks

    def authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        given = key.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self.api_keys):
            raise APIError(
                "Invalid or missing API key (send `Authorization: Bearer KEY`)",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    def admit(self, num_requests: int) -> None:
        error = engine_dead_error(self.engine)  # 503, as /health says, not a 500 per request
        if error is not None:
            raise error
        if self.max_waiting is None:
            return
        waiting = max(self.in_flight + num_requests - self.max_num_seqs, self.engine.stats().num_waiting)
        if waiting > self.max_waiting:
            raise APIError(
                f"Too many requests waiting (more than {self.max_waiting}); retry shortly",
                status=429,
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )

    @staticmethod
    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"The request body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise APIError("The request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from e

    # -------------------------------------------------------------------------------------------------
    # The engine

    async def _generate(self, prompt_ids: list[int], params: Any, request_id: str) -> AsyncIterator[Any]:
        """One engine request's increments, with latency metrics; aborts it if left unfinished."""
        arrival = last = time.perf_counter()
        first = True
        finished = False
        self.in_flight += 1
        stream = self.engine.generate(prompt_ids, params, request_id=request_id)
        if inspect.isawaitable(stream):
            stream = await stream
        try:
            async for out in stream:
                now = time.perf_counter()
                if out.new_token_ids:
                    if first:
                        self.metrics.time_to_first_token.observe(now - arrival)
                        first = False
                    else:
                        self.metrics.inter_token_latency.observe(now - last)
                    last = now
                if out.finished:
                    finished = True
                    self.metrics.e2e_latency.observe(now - arrival)
                yield out
        finally:
            self.in_flight -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()
            if not finished:
                self.engine.abort(request_id)

    async def _merged(self, prepared: Sequence[Prepared], request_id: str) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, increment) from every choice of every prompt, as they come. The engine merges what a
        choice's consumer has not taken yet into one increment; with one choice (the usual request) its stream is
        read here directly, with several a task per choice feeds one queue."""
        jobs = [(p.index_base + j, p.prompt_ids, params) for p in prepared for j, params in enumerate(p.params)]
        if len(jobs) == 1:
            index, ids, params = jobs[0]
            async for out in self._generate(ids, params, f"{request_id}-{index}"):
                yield index, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int, ids: list[int], params: Any) -> None:
            try:
                async for out in self._generate(ids, params, f"{request_id}-{index}"):
                    queue.put_nowait((index, out, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((index, None, e))
            finally:
                queue.put_nowait((index, None, None))

        tasks = [asyncio.create_task(run(*job)) for job in jobs]
        try:
            remaining = len(tasks)
            while remaining:
                # Take everything that is ready and merge it per choice: when the server falls behind the engine,
                # a chunk carries several tokens instead of the backlog growing one event per token.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                merged: dict[int, Increment] = {}
                for index, out, error in items:
                    if error is not None:
                        raise error
                    if out is None:
                        remaining -= 1
                    elif index in merged:
                        merged[index].extend(out)
                    else:
                        merged[index] = Increment.of(out)
                for index, increment in merged.items():
                    yield index, increment
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, prepared: Sequence[Prepared], request_id: str) -> list[list[Accumulated]]:
        outputs = [[Accumulated() for _ in p.params] for p in prepared]
        where = {p.index_base + j: (i, j) for i, p in enumerate(prepared) for j in range(len(p.params))}
        async for index, out in self._merged(prepared, request_id):
            i, j = where[index]
            outputs[i][j].add(out)
        return outputs

    @staticmethod
    async def _until_disconnect(request: Request, work: Any) -> Any:
        """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler was cancelled (server shutdown)
            task.cancel()
            watcher.cancel()
            raise
        if task in done:
            watcher.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _ClientGone()

    # -------------------------------------------------------------------------------------------------
    # Endpoints

    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        body: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        prepared = prepare_chat(self.ctx, body)
        self.admit(len(prepared.params))
        request_id, created = new_id("chatcmpl"), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream_chat(prepared, request_id, created, body.logprobs, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            outputs = await self._until_disconnect(request, self._collect([prepared], request_id))
        except _ClientGone:
            return Response(status_code=499)
        except ValueError as e:  # the engine refused the request (its own checks, beyond serving's)
            raise APIError(str(e).splitlines()[0] if str(e) else "invalid request") from e
        return JSONResponse(chat_response(self.ctx, prepared, outputs[0], request_id, created))

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        body: CompletionRequest = await self.parse(request, CompletionRequest)
        prepared = prepare_completion(self.ctx, body)
        self.admit(sum(len(p.params) for p in prepared))
        request_id, created = new_id("cmpl"), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream_completion(prepared, request_id, created, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            outputs = await self._until_disconnect(request, self._collect(prepared, request_id))
        except _ClientGone:
            return Response(status_code=499)
        except ValueError as e:  # the engine refused the request (its own checks, beyond serving's)
            raise APIError(str(e).splitlines()[0] if str(e) else "invalid request") from e
        return JSONResponse(completion_response(self.ctx, prepared, outputs, request_id, created))

    async def _stream_chat(
        self, prepared: Prepared, request_id: str, created: int, logprobs: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        chunks = ChunkWriter(self.ctx, "chat.completion.chunk", request_id, created)
        n = len(prepared.params)
        parsers = [
            ChatOutputParser(reasoning_open=prepared.reasoning_open, parse_tools=prepared.parse_tools,
                             prefix=prepared.prefix)
            for _ in range(n)
        ]  # fmt: skip
        saw_tool_call = [False] * n
        completion_tokens, cached = 0, 0
        try:
            role = {"role": "assistant", "content": ""}
            yield chunks.event_with([{"index": j, "delta": role, "logprobs": None, "finish_reason": None}
                                     for j in range(n)])  # fmt: skip
            async for j, out in self._merged([prepared], request_id):
                completion_tokens += len(out.new_token_ids)
                cached = max(cached, out.num_cached_tokens)
                delta = parsers[j].push(out.new_text)
                if out.finished:
                    delta.extend(parsers[j].finish())
                lp = chat_logprobs(self.ctx.tokenizer, out.new_logprobs) if logprobs else None
                text: dict[str, Any] = {}
                if delta.reasoning:
                    text.update(reasoning_content=delta.reasoning, reasoning=delta.reasoning)
                if delta.content:
                    text["content"] = delta.content
                events = []  # the events of one increment go out in one write
                if text or lp is not None:
                    events.append(chunks.event(chat_choice_json(j, text, lp, None)))
                for call in _tool_call_deltas(delta.tool_calls):
                    saw_tool_call[j] = True
                    events.append(chunks.event(chat_choice_json(j, {"tool_calls": [call]}, None, None)))
                if out.finished:
                    finish = chat_finish_reason(out.finish_reason, saw_tool_call[j])
                    events.append(chunks.event(chat_choice_json(j, {}, None, finish)))
                if events:
                    yield "".join(events)
            if include_usage:
                yield chunks.event_with([], usage=usage(len(prepared.prompt_ids), completion_tokens, cached))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            yield _sse(self._stream_error(e))
        yield SSE_DONE

    async def _stream_completion(
        self, prepared: list[Prepared], request_id: str, created: int, include_usage: bool
    ) -> AsyncIterator[str]:
        chunks = ChunkWriter(self.ctx, "text_completion", request_id, created)
        completion_tokens, cached = 0, 0
        offsets: dict[int, int] = {}
        try:
            async for index, out in self._merged(prepared, request_id):
                completion_tokens += len(out.new_token_ids)
                cached = max(cached, out.num_cached_tokens)
                lp = None
                if out.new_logprobs is not None:
                    lp = completion_logprobs(self.ctx.tokenizer, out.new_logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(out.new_text)
                finish = out.finish_reason if out.finished else None
                if out.new_text or lp is not None or finish is not None:
                    yield chunks.event(completion_choice_json(index, out.new_text, lp, finish))
            if include_usage:
                prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
                yield chunks.event_with([], usage=usage(prompt_tokens, completion_tokens, cached))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            yield _sse(self._stream_error(e))
        yield SSE_DONE

    @staticmethod
    def _stream_error(e: Exception) -> dict[str, Any]:
        if isinstance(e, APIError):
            return e.body()
        if isinstance(e, ValueError):
            return APIError(str(e).splitlines()[0] if str(e) else "invalid request").body()
        logger.exception("error while streaming a response")
        return APIError(
            "The server failed while generating", status=500, type="server_error", code="internal_error"
        ).body()

    def models(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.ctx.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "qwen3",
                    "max_model_len": self.ctx.max_model_len,
                }
            ],
        }


def create_app(
    engine: Any,
    ctx: ServingContext,
    *,
    api_keys: Sequence[str] = (),
    max_num_seqs: int = 256,
    max_waiting: int | None = None,
    shared_metrics: tuple[list[Any], int] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncLLM`); the engine is shut down with the app. `shared_metrics`:
    this process's row of histograms shared by several HTTP processes (metrics.shared_histograms)."""
    server = OpenAIServer(engine, ctx, api_keys=api_keys, max_num_seqs=max_num_seqs, max_waiting=max_waiting,
                          shared_metrics=shared_metrics)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            result = shutdown()
            if inspect.isawaitable(result):
                await result

    app = FastAPI(title="qwen3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(f"Invalid request: {e.errors()[0].get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(APIError(message, status=e.status_code, type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("error handling %s %s", request.method, request.url.path)
        return _error_response(
            APIError("The server failed to handle the request", status=500, type="server_error", code="internal_error")
        )

    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])

    @app.get("/health")
    async def health() -> Any:
        error = engine_dead_error(engine)
        return {"status": "ok"} if error is None else _error_response(error)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    return app


class _Server(uvicorn.Server):
    """uvicorn's server that prints the URL once listening and exits 0 after a signal-driven drain."""

    def __init__(self, config: uvicorn.Config, banner: str | Callable[[], None]) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            if callable(self.banner):
                self.banner()
            else:
                print(self.banner, flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True  # not re-raised afterwards (uvicorn's default): a drained server exits 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError naming the address if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    return sock


def socket_url(sock: socket.socket) -> str:
    """http://host:port of a bound socket."""
    address = sock.getsockname()
    return f"http://{f'[{address[0]}]' if sock.family == socket.AF_INET6 else address[0]}:{address[1]}"


def run_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    sock: socket.socket | None = None,
    drain_timeout: float = 30.0,
    banner: str | Callable[[], None] = "qwen3 serve: listening on {url}",
    log_level: str = "warning",
) -> int:
    """Serve `app` until SIGTERM or Ctrl-C, then drain in-flight requests (bounded) and return 0.

    The socket is bound here (or given, already bound), so `port=0` picks a free port and the banner line shows
    the real one. A callable banner is called instead, once listening (server/front_ends.py).
    """
    sock = sock or bind_socket(host, port)
    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=drain_timeout, access_log=False, lifespan="on"
    )
    server = _Server(config, banner if callable(banner) else banner.format(url=socket_url(sock)))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
    return 0 if server.started else 1
