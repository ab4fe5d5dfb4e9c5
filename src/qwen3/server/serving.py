"""From an OpenAI request to engine inputs, and from engine outputs to OpenAI response bodies.

Shared by the HTTP server (`app`) and `qwen3 batch`, so both render the same prompt, apply the same
defaults and limits, and return the same JSON. Sampling fields a request leaves out take the model's
`generation_config.json` values (as vLLM does); `max_tokens` left out means "up to the context length".
Choices of a request with `n > 1` get seeds `seed, seed + 1, ...` when a seed is given, so they differ
but stay reproducible.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..chat import THINK_END, THINK_START, TOOL_CALL_START
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .parsers import Delta, parse_chat_output, tool_calls_json
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

_CHAT_TEMPLATE_RESERVED = ("messages", "tools", "add_generation_prompt", "tokenize")


@dataclass
class ServingContext:
    """What request handling needs to know about the model being served."""

    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    generation_config: dict[str, Any] = field(default_factory=dict)
    strict_model: bool = True  # a request naming another model is a 404 (batch files run on whatever is loaded)

    @classmethod
    def for_engine(cls, llm: Any, model_name: str, directory: str | Path | None = None) -> ServingContext:
        """The context of a `qwen3.LLM` (or an `AsyncLLM`); `directory` holds its generation_config.json."""
        vocab_size = getattr(llm, "vocab_size", None)  # an AsyncLLM's (its LLM may live in another process)
        if vocab_size is None:
            config = getattr(getattr(llm, "model", None), "config", None)
            vocab_size = getattr(config, "vocab_size", None) or llm.tokenizer.vocab_size
        return cls(
            llm.tokenizer, model_name, int(llm.max_model_len), int(vocab_size), cls.read_generation_config(directory)
        )

    @staticmethod
    def read_generation_config(directory: str | Path | None) -> dict[str, Any]:
        """The model directory's generation_config.json as a dict ({} when there is none)."""
        if directory is None:
            return {}
        path = Path(directory) / "generation_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class Prepared:
    """One prompt of a request, ready for the engine: its ids and one SamplingParams per choice."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    index_base: int = 0  # choice index of params[0] (completions with several prompts)
    reasoning_open: bool = False  # the prompt ends inside an opened <think> block
    parse_tools: bool = False
    prefix: str = ""  # the start of the reply written by the prompt (a forced tool call), read by the parser


class Finished(Protocol):
    """A finished choice, as the engine reports it (RequestOutput) or as the server accumulated it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[Any] | None


@dataclass
class Accumulated:
    """A choice assembled from stream increments (the server's non-streamed responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[Any] | None = None

    def add(self, out: Any) -> None:
        self.text += out.new_text
        self.token_ids.extend(out.new_token_ids)
        self.num_cached_tokens = out.num_cached_tokens
        if out.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.new_logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------
# Requests -> engine inputs


def check_model(ctx: ServingContext, name: str) -> None:
    if ctx.strict_model and name != ctx.model_name:
        raise APIError(
            f"The model `{name}` does not exist (this server serves `{ctx.model_name}`)",
            status=404,
            param="model",
            code="model_not_found",
        )


def _message_text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{where}.content[{i}]: only text parts are supported", param=f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"{where}.content: must be a string or a list of text parts", param=f"{where}.content")


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages, checked and with text parts joined, for the chat template."""
    messages = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise APIError(
                f"{where}.role: must be system, user, assistant or tool, got {role!r}", param=f"{where}.role"
            )
        message = {**message, "role": "system" if role == "developer" else role}
        message["content"] = _message_text(message.get("content"), where)
        if message["content"] is None and not message.get("tool_calls"):
            message["content"] = ""
        messages.append(message)
    return messages


def forced_tool(request: ChatCompletionRequest) -> str | None:
    """What `tool_choice` forces: None (`"auto"`, `"none"` or absent), "" (`"required"`: any tool) or the name of
    the one tool to call; an APIError (param `tool_choice`) if it is malformed or names no tool in `tools`."""
    choice = request.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required":
        name = ""
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        name = choice["function"]["name"]
    else:
        raise APIError(
            'tool_choice: must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if not request.tools:
        raise APIError("tool_choice: a tool call is required but the request has no tools", param="tool_choice")
    if name and name not in [tool.function.name for tool in request.tools]:
        raise APIError(f"tool_choice: no function named {name!r} in tools", param="tool_choice")
    return name


def chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> tuple[str, str]:
    """(prompt, prefix): the chat template's prompt, and the start of the reply that the prompt writes for the
    model when `tool_choice` forces a call (`<tool_call>\n{"name": "` for "required", up to `"arguments": ` for a
    named function; "" otherwise). The engine's prompt is `prompt + prefix`; the output parser reads `prefix` as
    the start of the output. A forced call closes the think block empty first (`<think>\n\n</think>\n\n`, what
    Qwen3's template writes for enable_thinking=false): a call is due, not reasoning."""
    kwargs = dict(request.chat_template_kwargs or {})
    for name in _CHAT_TEMPLATE_RESERVED:
        if name in kwargs:
            raise APIError(f"chat_template_kwargs.{name}: cannot be set here", param="chat_template_kwargs")
    forced = forced_tool(request)
    tools = None
    if request.tools and request.tool_choice != "none":
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    try:
        prompt = ctx.tokenizer.apply_chat_template(
            chat_messages(request), tools=tools, add_generation_prompt=True, **kwargs
        )
    except APIError:
        raise
    except Exception as e:  # a template error (raise_exception, a missing key) is the request's fault
        raise APIError(
            f"messages: the chat template failed: {str(e).splitlines()[0] if str(e) else e!r}", param="messages"
        ) from e
    if forced is None:
        return prompt, ""
    if prompt.rstrip().endswith(THINK_START):  # the template opened the block: close it
        prompt = prompt.rstrip() + "\n\n" + THINK_END + "\n\n"
    elif not prompt.rstrip().endswith(THINK_END):
        prompt += f"{THINK_START}\n\n{THINK_END}\n\n"
    prefix = TOOL_CALL_START + '\n{"name": "'
    if forced:
        # ends at the colon: the model's own ` {` token follows (a trailing space would be a lone token)
        prefix = TOOL_CALL_START + '\n{"name": ' + json.dumps(forced, ensure_ascii=False) + ', "arguments":'
    return prompt, prefix


def render_chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> str:
    """The whole prompt the engine gets for the request (the template's, and a forced call's start)."""
    prompt, prefix = chat_prompt(ctx, request)
    return prompt + prefix


def _check_length(ctx: ServingContext, prompt_len: int, max_tokens: int | None, param: str) -> int:
    limit = ctx.max_model_len
    if prompt_len == 0:
        raise APIError(f"{param}: the prompt is empty", param=param)
    if prompt_len >= limit:
        raise APIError(
            f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} "
            "tokens (leaving no room for the completion)",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


_PARAM_IN_MESSAGE = re.compile(r"SamplingParams\.(\w+)=")


def sampling_params(ctx: ServingContext, request: Any, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice: the request's fields over the generation_config.json defaults."""
    overrides = {
        name: getattr(request, name)
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "seed",
        )
    }
    if request.top_k is not None:
        overrides["top_k"] = max(request.top_k, 0)  # vLLM's -1 means off, like our 0
    stop = request.stop if request.stop is not None else ()
    try:
        base = SamplingParams.from_generation_config(
            ctx.generation_config,
            **overrides,
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
        )
    except (ValueError, TypeError) as e:
        match = _PARAM_IN_MESSAGE.search(str(e))
        raise APIError(str(e).replace("SamplingParams.", ""), param=match.group(1) if match else None) from e
    if base.seed is None:
        return [base] * request.n
    return [replace(base, seed=(base.seed + j) % 2**63) for j in range(request.n)]


def prepare_chat(ctx: ServingContext, request: ChatCompletionRequest) -> Prepared:
    check_model(ctx, request.model)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError("top_logprobs: needs logprobs set to true", param="top_logprobs")
    prompt, prefix = chat_prompt(ctx, request)
    ids = ctx.tokenizer.encode(prompt + prefix, allow_special=True)
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = _check_length(ctx, len(ids), max_tokens, "messages")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return Prepared(
        ids,
        sampling_params(ctx, request, max_tokens, logprobs),
        reasoning_open=prompt.rstrip().endswith(THINK_START),
        parse_tools=bool(request.tools) and request.tool_choice != "none",
        prefix=prefix,
    )


def prepare_completion(ctx: ServingContext, request: CompletionRequest) -> list[Prepared]:
    check_model(ctx, request.model)
    if request.echo:
        raise APIError("echo: not supported", param="echo")
    if request.suffix is not None:
        raise APIError("suffix: not supported", param="suffix")
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError("prompt: is empty", param="prompt")
    prepared = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = ctx.tokenizer.encode(p)
        else:
            ids = list(p)
            bad = next((t for t in ids if not 0 <= t < ctx.vocab_size), None)
            if bad is not None:
                raise APIError(
                    f"prompt: token id {bad} is outside the vocabulary [0, {ctx.vocab_size})", param="prompt"
                )
        max_tokens = _check_length(ctx, len(ids), request.max_tokens, "prompt")
        params = sampling_params(ctx, request, max_tokens, request.logprobs)
        prepared.append(Prepared(ids, params, index_base=i * request.n))
    return prepared


# ---------------------------------------------------------------------------------------------------
# Engine outputs -> response bodies


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[Any] | None) -> dict[str, Any] | None:
    """`choices[i].logprobs` of a chat completion (one entry per generated token)."""
    if logprobs is None:
        return None
    content = []
    for lp in logprobs:
        token = _token_text(tokenizer, lp.token_id)
        top = [{"token": (t := _token_text(tokenizer, i)), "logprob": v, "bytes": list(t.encode())} for i, v in lp.top]
        content.append({"token": token, "logprob": lp.logprob, "bytes": list(token.encode()), "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, logprobs: Sequence[Any] | None, offset: int = 0) -> dict[str, Any] | None:
    """`choices[i].logprobs` of a text completion (the legacy shape: tokens, token_logprobs, ...)."""
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        token = _token_text(tokenizer, lp.token_id)
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, i): v for i, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_message(parsed: Delta) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": parsed.content if parsed.content or not parsed.tool_calls else None,
        "reasoning_content": parsed.reasoning or None,
        "reasoning": parsed.reasoning or None,
    }
    if parsed.tool_calls:
        message["tool_calls"] = tool_calls_json(parsed.tool_calls)
    return message


def chat_finish_reason(finish_reason: str | None, has_tool_calls: bool) -> str | None:
    return "tool_calls" if has_tool_calls and finish_reason == "stop" else finish_reason


def envelope(ctx: ServingContext, kind: str, request_id: str, created: int, choices: list[dict[str, Any]],
             **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The fields every OpenAI completion object and stream chunk shares, in OpenAI's order; `extra` follows."""
    return {"id": request_id, "object": kind, "created": created, "model": ctx.model_name, "choices": choices, **extra}


def chat_response(
    ctx: ServingContext,
    prepared: Prepared,
    outputs: Sequence[Finished],
    request_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """The body of a non-streamed chat completion."""
    choices = []
    for j, out in enumerate(outputs):
        parsed = parse_chat_output(out.text, reasoning_open=prepared.reasoning_open, parse_tools=prepared.parse_tools,
                                   prefix=prepared.prefix)  # fmt: skip
        choices.append(
            {
                "index": j,
                "message": chat_message(parsed),
                "logprobs": chat_logprobs(ctx.tokenizer, out.logprobs),
                "finish_reason": chat_finish_reason(out.finish_reason, bool(parsed.tool_calls)),
            }
        )
    tokens = usage(
        len(prepared.prompt_ids),
        sum(len(o.token_ids) for o in outputs),
        max((o.num_cached_tokens for o in outputs), default=0),
    )
    return envelope(ctx, "chat.completion", request_id or new_id("chatcmpl"), created or int(time.time()), choices,
                    usage=tokens, system_fingerprint=None)  # fmt: skip


def completion_response(
    ctx: ServingContext,
    prepared: Sequence[Prepared],
    outputs: Sequence[Sequence[Finished]],
    request_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """The body of a non-streamed text completion; `outputs[i]` are the choices of `prepared[i]`."""
    choices = []
    for prep, outs in zip(prepared, outputs, strict=True):
        for j, out in enumerate(outs):
            choices.append(
                {
                    "index": prep.index_base + j,
                    "text": out.text,
                    "logprobs": completion_logprobs(ctx.tokenizer, out.logprobs),
                    "finish_reason": out.finish_reason,
                }
            )
    tokens = usage(
        sum(len(p.prompt_ids) for p in prepared),
        sum(len(o.token_ids) for os in outputs for o in os),
        sum(max((o.num_cached_tokens for o in os), default=0) for os in outputs),
    )
    return envelope(ctx, "text_completion", request_id or new_id("cmpl"), created or int(time.time()), choices,
                    usage=tokens, system_fingerprint=None)  # fmt: skip
