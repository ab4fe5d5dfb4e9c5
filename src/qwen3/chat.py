"""Chat prompts in, structured replies out: the model's Jinja chat template and a parser for completions.

`ChatTemplate` renders the template that ships in `tokenizer_config.json` the way transformers'
`apply_chat_template` does, so the prompt string (and therefore the token ids) is identical:

* a sandboxed, immutable Jinja environment with `trim_blocks` and `lstrip_blocks` and the
  `loopcontrols` extension (`{% break %}`, `{% continue %}`);
* `tojson` is `json.dumps` with `ensure_ascii=False` (Jinja's own filter escapes `<`, `>`, `&` and `'`
  to HTML entities, which would change the prompt); globals `raise_exception(msg)`, `strftime_now(fmt)`
  and guarded `namespace` / `dict`; `{% generation %}` blocks render their body;
* the inputs are normalised first: keys whose value is None are dropped from each message (so
  `tool_calls=None` is the same as no tool calls), a reasoning given as `reasoning_content`, `thinking`
  or `reasoning` is visible to the template as `reasoning_content` (and `thinking`), and the template
  sees plain copies, never the caller's objects; the tokenizer's named special tokens (`eos_token`, ...)
  are template variables.

`parse_completion` splits what the model generated into reasoning, content and tool calls, following
Qwen3's format: reasoning ends at the last `</think>` (the opening `<think>` may be in the completion or,
with some templates, already in the prompt), and each tool call is a
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block after it. Malformed blocks are
reported in `errors`; parsing never raises.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")

# Names a message's reasoning may come under; templates read the first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """Plain `json.dumps`; unlike Jinja's built-in filter it keeps `<`, `>`, `&`, `'` and non-ASCII as is."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names so a template cannot reach Python internals."""

    def __init__(*args, **kwargs):  # same signature trick as Jinja's Namespace: `namespace(self=1)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _plain(value: Any) -> Any:
    """A copy made of JSON-like types only (dataclasses and pydantic models become dicts), for the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (str enums...) carry extra methods: strip them
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"  # an inert placeholder: templates never read media objects


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain copies of `messages` with None values dropped and the reasoning under `reasoning_content`."""
    normalized = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


class ChatTemplate:
    """A compiled chat template; build one per tokenizer and reuse it."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            namespace=_Namespace,
            dict=_DictFactory(),
        )
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt for `messages`; extra keyword arguments (`enable_thinking`...) reach the template."""
        if not messages:
            raise ValueError("cannot render an empty conversation")
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise TypeError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        variables = {**self.special_tokens, **_plain(kwargs)}  # explicit kwargs win over token names
        return self._template.render(
            messages=normalize_messages(messages),
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


# ---------------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_message_dict(self) -> dict[str, Any]:
        """The OpenAI-style entry for an assistant message's `tool_calls`."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedCompletion:
    reasoning: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """An assistant message to append to the conversation (the template re-renders it as generated)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.to_message_dict() for call in self.tool_calls]
        return message


_TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|\Z)", re.S)
_TRAILING_END_OF_TURN = re.compile("(?:" + "|".join(map(re.escape, END_OF_TURN_TOKENS)) + r")+\s*\Z")


def _parse_tool_call(body: str, closed: bool) -> tuple[ToolCall | None, str | None]:
    shown = body.strip()
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    if not closed:
        return None, f"tool call without {TOOL_CALL_END}: {shown!r}"
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"tool call is not valid JSON ({e}): {shown!r}"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None, f'tool call needs a JSON object with a string "name": {shown!r}'
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some fine-tunes emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return None, f"tool call arguments are a string that is not JSON ({e}): {shown!r}"
    if not isinstance(arguments, dict):
        return None, f'tool call "arguments" must be a JSON object: {shown!r}'
    return ToolCall(data["name"], arguments), None


def parse_completion(text: str) -> ParsedCompletion:
    """Split a completion (decoded text of the generated tokens only) into reasoning, content and tool calls.

    As in the Qwen3 model card, the split is at the last `</think>` and both parts are stripped of
    surrounding newlines; a leading `<think>` is dropped from the reasoning. Without `</think>` there is no
    reasoning, unless the completion opens `<think>` and never closes it (cut off while thinking): then
    everything after `<think>` is reasoning and `errors` says so. End-of-turn tokens at the end are ignored.
    """
    text = _TRAILING_END_OF_TURN.sub("", text)
    errors: list[str] = []
    reasoning = ""
    if THINK_END in text:
        reasoning, text = text.rsplit(THINK_END, 1)
        stripped = reasoning.lstrip()
        if stripped.startswith(THINK_START):
            reasoning = stripped[len(THINK_START) :]
    elif text.lstrip().startswith(THINK_START):
        reasoning, text = text.lstrip()[len(THINK_START) :], ""
        errors.append(f"reasoning is not closed by {THINK_END} (generation stopped while thinking?)")

    tool_calls: list[ToolCall] = []
    content_parts: list[str] = []
    position = 0
    for match in _TOOL_CALL_BLOCK.finditer(text):
        content_parts.append(text[position : match.start()])
        position = match.end()
        call, error = _parse_tool_call(match.group(1), closed=match.group(0).endswith(TOOL_CALL_END))
        if call is not None:
            tool_calls.append(call)
        else:
            errors.append(error)
    content_parts.append(text[position:])
    content = "\n".join(part.strip("\n") for part in content_parts if part.strip())
    return ParsedCompletion(reasoning.strip("\n"), content.strip("\n"), tool_calls, errors)
