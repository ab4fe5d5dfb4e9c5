"""`qwen3 batch`: an OpenAI Batch API input file in, its results file out, run offline on `qwen3.LLM`.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" or "/v1/completions",
"body": {...}}`; each output line, in input order, is what OpenAI writes:
`{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
Bodies go through the server's own request handling (`serving`): the same prompt, defaults, limits and
response JSON as `qwen3 serve`. A request the server would refuse gets its 400/404 response in its place;
a line that is not a request at all (bad JSON, a missing field, another URL) gets `response: null` and an
`error`; either way the rest of the batch runs, in one `LLM.generate` call with its progress bar.
`"stream": true` in a body is ignored (results are whole responses). The output is written atomically.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..files import write_text_atomic
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from .serving import ServingContext, chat_response, completion_response, new_id, prepare_chat, prepare_completion

ROUTES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


class _LineError(Exception):
    """A line that is not a batch request; reported with response null (and its custom_id if it has one)."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id


def _read_line(number: int, line: str) -> tuple[str | None, str, dict[str, Any]]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(f"line {number}: not valid JSON ({e})") from e
    if not isinstance(item, dict):
        raise _LineError(f"line {number}: must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        raise _LineError(f"line {number}: custom_id must be a string")
    if item.get("method", "POST") != "POST":
        raise _LineError(f"line {number}: method must be POST, got {item.get('method')!r}", custom_id)
    url = item.get("url")
    if url not in ROUTES:
        raise _LineError(f"line {number}: url must be one of {sorted(ROUTES)}, got {url!r}", custom_id)
    body = item.get("body")
    if not isinstance(body, dict):
        raise _LineError(f"line {number}: body must be a JSON object", custom_id)
    return custom_id, url, body


def _result(custom_id: str | None, status: int | None = None, body: Any = None, error: Any = None) -> dict[str, Any]:
    response = None if status is None else {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def run_batch(llm: Any, ctx: ServingContext, lines: list[str], use_tqdm: bool = True) -> list[dict[str, Any]]:
    """The result of every non-blank input line, in order."""
    results: list[dict[str, Any] | None] = []
    jobs = []  # (result slot, custom_id, url, prepared list)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        custom_id = None
        try:
            custom_id, url, body = _read_line(number, line)
            try:
                request = ROUTES[url].model_validate({**body, "stream": False})
            except ValidationError as e:
                raise validation_error(e) from e
            prepared = (
                [prepare_chat(ctx, request)] if url == "/v1/chat/completions" else prepare_completion(ctx, request)
            )
        except _LineError as e:
            results.append(_result(e.custom_id, error={"code": "invalid_request", "message": str(e)}))
            continue
        except APIError as e:
            results.append(_result(custom_id, e.status, e.body()))
            continue
        jobs.append((len(results), custom_id, url, prepared))
        results.append(None)

    prompts = [p.prompt_ids for *_, prepared in jobs for p in prepared for _ in p.params]
    params = [sp for *_, prepared in jobs for p in prepared for sp in p.params]
    outputs = _generate(llm, prompts, params, use_tqdm)
    created, k = int(time.time()), 0
    for slot, custom_id, url, prepared in jobs:
        grouped = []
        for p in prepared:
            grouped.append(outputs[k : k + len(p.params)])
            k += len(p.params)
        if any(isinstance(o, Exception) for group in grouped for o in group):
            error = next(o for group in grouped for o in group if isinstance(o, Exception))
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            results[slot] = _result(custom_id, 400, APIError(message).body())
        elif url == "/v1/chat/completions":
            results[slot] = _result(custom_id, 200, chat_response(ctx, prepared[0], grouped[0], new_id("chatcmpl"),
                                                                  created))  # fmt: skip
        else:
            results[slot] = _result(
                custom_id, 200, completion_response(ctx, prepared, grouped, new_id("cmpl"), created)
            )
    return results  # type: ignore[return-value]


def _generate(llm: Any, prompts: list[list[int]], params: list[Any], use_tqdm: bool) -> list[Any]:
    """llm.generate on everything at once; if the engine refuses one request, the rest run one by one."""
    if not prompts:
        return []
    try:
        return llm.generate(prompts, params, use_tqdm=use_tqdm)
    except ValueError:
        outputs: list[Any] = []
        for prompt, p in zip(prompts, params, strict=True):
            try:
                outputs.append(llm.generate([prompt], [p], use_tqdm=False)[0])
            except ValueError as e:
                outputs.append(e)
        return outputs


def run_batch_file(llm: Any, ctx: ServingContext, input_path: Path, output_path: Path) -> dict[str, int]:
    """Read `input_path`, run it, write `output_path` atomically; counts of succeeded and failed requests."""
    lines = Path(input_path).read_text(encoding="utf-8").splitlines()
    results = run_batch(llm, ctx, lines)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    write_text_atomic(output_path, text)
    ok = sum(1 for r in results if r["response"] is not None and r["response"]["status_code"] == 200)
    return {"ok": ok, "failed": len(results) - ok}
