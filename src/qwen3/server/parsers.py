"""Split a chat completion's text, as it streams, into reasoning, content and tool calls.

One incremental parser serves both paths: a streamed response sends each `push`'s deltas, a
non-streamed one pushes the whole text and joins them, so the two can never disagree.

Qwen3's format (vLLM's qwen3 reasoning parser and hermes tool parser read it the same way):
`<think>\\n...reasoning...\\n</think>\\n\\nanswer`, and each tool call a block
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after the reasoning.

* Reasoning starts when the completion opens with `<think>` (leading whitespace allowed), or from the
  first token when the prompt already ends with `<think>` (templates that open the block themselves). If
  `</think>` never comes, everything after the opening is reasoning. With thinking off (`enable_thinking:
  false` puts an empty think block in the prompt) the completion is all content.
* Each section (reasoning, content) loses its leading and trailing newlines, as `qwen3.chat` strips them:
  trailing newlines are held back until more text shows they were inside the section.
* A partial tag at the end of the text so far (`</thi`, `<tool_`) is held back until it resolves.
* Tool calls stream as OpenAI streams them. Once a block's body reads `{"name": "<name>", "arguments": {` (any
  whitespace), a first fragment carries the index, a new id and the name with `arguments: ""`; then the arguments
  object streams as it arrives, checked by `JSONPrefix`: a fragment is sent only while the text so far is a valid
  beginning of a JSON object, and ends where that object closes (the outer `}` and `</tool_call>` are not part of
  it). The fragments join to the arguments exactly as the model wrote them. Once the name is out the call stays a
  call: if the JSON then breaks, or the generation ends inside the block, the arguments end where the valid prefix
  ended and the rest of the block is dropped (the finish_reason, e.g. "length", tells the client). Text after a
  whole arguments object other than the call's `}` and `</tool_call>` (a model that forgot the closing tag) ends
  the call and is content again.
* A body in another shape (`"arguments"` before `"name"`, arguments as a JSON string) is parsed whole when
  `</tool_call>` arrives and sent as one call (header, then its arguments as JSON text); a block that is not a
  JSON object with a string "name", or that is never closed, is returned as plain content.
* `prefix` is text the prompt already wrote for the model (a forced tool call: `<tool_call>\\n{"name": "`): the
  parser reads it as the start of the output.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..chat import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START, _parse_tool_call


@dataclass
class ToolCallDelta:
    """A piece of a tool call: the first piece of a call has its `id` and `name`, later ones only arguments text."""

    index: int
    id: str | None
    name: str | None
    arguments: str  # a fragment of the arguments' JSON text


@dataclass
class Delta:
    """What one push produced: any of reasoning text, content text, tool-call pieces."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: Delta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls


def join_tool_calls(pieces: Iterable[ToolCallDelta]) -> list[ToolCallDelta]:
    """Whole calls from their pieces (in index order): the first piece's id and name, all the arguments text."""
    calls: dict[int, ToolCallDelta] = {}
    for piece in pieces:
        call = calls.get(piece.index)
        if call is None:
            calls[piece.index] = ToolCallDelta(piece.index, piece.id, piece.name, piece.arguments)
        else:
            call.arguments += piece.arguments
    return [calls[i] for i in sorted(calls)]


_WHITESPACE = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = ("true", "false", "null")
_CALL_CLOSE = re.compile(r"\s*(?:\}\s*)?")  # after the arguments: the call object's closing brace


class JSONPrefix:
    """Reads one JSON value a character at a time and says how much of it is a valid beginning of JSON.

    `feed(text)` returns how many characters of `text` belong to the value; it stops at the first character that
    breaks the grammar (`error` is then set) or after the value's last character (`done`). `safe` is the length
    of the part that can be shown: everything read, except a number or literal still being read (`tru` or `12`
    might go on to be invalid).
    """

    def __init__(self) -> None:
        self.stack: list[str] = []  # open containers, "{" or "["
        self.state = "value"  # value | value_or_end | key | key_or_end | colon | after | string | escape | hex |
        #                       number | literal | done
        self.is_key = False
        self.hex_left = 0
        self.token = ""  # the number or literal being read
        self.length = 0  # characters read into the value
        self.safe = 0
        self.error = False

    @property
    def done(self) -> bool:
        return self.state == "done"

    def feed(self, text: str) -> int:
        for i, c in enumerate(text):
            if self.done or self.error:
                return i
            if not self._char(c):
                self.error = True
                return i
            self.length += 1
            if self.state not in ("number", "literal"):
                self.safe = self.length
        return len(text)

    def _after_value(self) -> None:
        self.state = "after" if self.stack else "done"

    def _char(self, c: str) -> bool:
        state = self.state
        if state == "string":
            if c == '"':
                if self.is_key:
                    self.state = "colon"
                else:
                    self._after_value()
            elif c == "\\":
                self.state = "escape"
            return c == '"' or c == "\\" or ord(c) >= 0x20
        if state == "escape":
            if c == "u":
                self.state, self.hex_left = "hex", 4
                return True
            self.state = "string"
            return c in '"\\/bfnrt'
        if state == "hex":
            self.hex_left -= 1
            if self.hex_left == 0:
                self.state = "string"
            return c in _HEX
        if state == "number":
            if c in "0123456789+-.eE":
                self.token += c
                return True
            if not _NUMBER.fullmatch(self.token):
                return False
            self._after_value()
            self.safe = self.length  # the number is whole
            return self._char(c)
        if state == "literal":
            self.token += c
            if self.token in _LITERALS:
                self._after_value()
                return True
            return any(word.startswith(self.token) for word in _LITERALS)
        if c in _WHITESPACE:
            return True
        if state in ("value", "value_or_end"):
            if c == "]" and state == "value_or_end":
                self.stack.pop()
                self._after_value()
            elif c in "{[":
                self.stack.append(c)
                self.state = "key_or_end" if c == "{" else "value_or_end"
            elif c == '"':
                self.state, self.is_key = "string", False
            elif c == "-" or c.isdigit():
                self.state, self.token = "number", c
            elif c in "tfn":
                self.state, self.token = "literal", c
            else:
                return False
            return True
        if state in ("key", "key_or_end"):
            if c == "}" and state == "key_or_end":
                self.stack.pop()
                self._after_value()
                return True
            if c == '"':
                self.state, self.is_key = "string", True
                return True
            return False
        if state == "colon":
            if c == ":":
                self.state = "value"
                return True
            return False
        if state == "after":
            top = self.stack[-1]
            if c == ",":
                self.state = "key" if top == "{" else "value"
            elif (c == "}" and top == "{") or (c == "]" and top == "["):
                self.stack.pop()
                self._after_value()
            else:
                return False
            return True
        return False


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def call_header(body: str) -> tuple[str, str | None, int]:
    """Whether a tool call's body starts `{"name": "<name>", "arguments": {`: ("yes", name, index of the arguments'
    `{`), ("maybe", None, 0) while the text so far could still become that, or ("no", None, 0)."""
    i = 0
    for literal in ("{", '"name"', ":", None, ",", '"arguments"', ":"):
        i = _skip_ws(body, i)
        if literal is None:  # the name: a JSON string
            if i == len(body):
                return "maybe", None, 0
            if body[i] != '"':
                return "no", None, 0
            j, escaped = i + 1, False
            while j < len(body) and (escaped or body[j] != '"'):
                escaped = not escaped and body[j] == "\\"
                j += 1
            if j == len(body):
                return "maybe", None, 0
            try:
                name = json.loads(body[i : j + 1])
            except json.JSONDecodeError:
                return "no", None, 0
            i = j + 1
            continue
        rest = body[i : i + len(literal)]
        if rest != literal:
            return ("maybe", None, 0) if literal.startswith(rest) and i + len(rest) == len(body) else ("no", None, 0)
        i += len(literal)
    i = _skip_ws(body, i)
    if i == len(body):
        return "maybe", None, 0
    return ("yes", name, i) if body[i] == "{" else ("no", None, 0)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (a tag still arriving)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class _Section:
    """Text of one section with its leading and trailing newlines removed, emitted incrementally."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""  # newlines that may turn out to be the section's trailing ones

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        kept = text.rstrip("\n")
        self.pending = text[len(kept) :]
        return kept


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ChatOutputParser:
    """`push(text) -> Delta` as text streams in; `finish() -> Delta` once the generation ended."""

    def __init__(self, *, reasoning_open: bool = False, parse_tools: bool = False, prefix: str = "") -> None:
        self.mode = "reasoning" if reasoning_open else "undecided"
        self.parse_tools = parse_tools
        self.buffer = prefix
        self.reasoning = _Section()
        self.content = _Section()
        self.num_tool_calls = 0
        self.arguments: JSONPrefix | None = None  # the streaming call's arguments (mode "arguments")
        self.sent = 0  # characters of the buffer already sent as arguments

    def push(self, text: str) -> Delta:
        self.buffer += text
        delta = Delta()
        while self._step(delta, final=False):
            pass
        return delta

    def finish(self) -> Delta:
        delta = Delta()
        while self._step(delta, final=True):
            pass
        return delta

    def _step(self, delta: Delta, final: bool) -> bool:
        """Consume what can be decided from the buffer; True if the mode changed (step again)."""
        buf = self.buffer
        if self.mode == "undecided":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                self.buffer, self.mode = stripped[len(THINK_START) :], "reasoning"
                return True
            if not final and (not stripped or THINK_START.startswith(stripped)):
                return False  # could still open <think>
            self.mode = "content"
            return True
        if self.mode == "reasoning":
            at = buf.find(THINK_END)
            if at >= 0:
                delta.reasoning += self.reasoning.feed(buf[:at])
                self.buffer, self.mode = buf[at + len(THINK_END) :], "content"
                return True
            keep = 0 if final else _partial_suffix(buf, THINK_END)
            delta.reasoning += self.reasoning.feed(buf[: len(buf) - keep])
            self.buffer = buf[len(buf) - keep :]
            return False
        if self.mode == "content":
            if self.parse_tools:
                at = buf.find(TOOL_CALL_START)
                if at >= 0:
                    delta.content += self.content.feed(buf[:at])
                    self.buffer, self.mode = buf[at + len(TOOL_CALL_START) :], "call"
                    return True
            keep = 0 if final or not self.parse_tools else _partial_suffix(buf, TOOL_CALL_START)
            delta.content += self.content.feed(buf[: len(buf) - keep])
            self.buffer = buf[len(buf) - keep :]
            return False
        if self.mode == "call":  # after <tool_call>: is the body's start the name, then the arguments?
            verdict, name, at = call_header(buf)
            if verdict == "yes":
                delta.tool_calls.append(ToolCallDelta(self.num_tool_calls, new_tool_call_id(), name, ""))
                self.buffer, self.mode, self.arguments, self.sent = buf[at:], "arguments", JSONPrefix(), 0
                return True
            if verdict == "no" or TOOL_CALL_END in buf:
                self.mode = "block"
                return True
            if final:  # never closed: plain content
                delta.content += self.content.feed(TOOL_CALL_START + buf)
                self.buffer, self.mode = "", "content"
            return False
        if self.mode == "arguments":  # the buffer starts with the arguments object, `sent` of it already sent
            args = self.arguments
            if not args.done and not args.error:
                args.feed(buf[args.length :])
            if final and args.state == "number" and _NUMBER.fullmatch(args.token):
                args.safe = args.length  # cut off right after a whole number
            if args.safe > self.sent:
                delta.tool_calls.append(ToolCallDelta(self.num_tool_calls, None, None, buf[self.sent : args.safe]))
                self.sent = args.safe
            more_keys = args.done and buf[args.length :].lstrip().startswith(",")
            if more_keys or not args.done:  # more keys after the arguments (an "id", say), or broken JSON (or cut
                end = buf.find(TOOL_CALL_END, args.length)  # off): the rest of the block is dropped
                if end < 0 and not final:
                    return False
                rest = buf[end + len(TOOL_CALL_END) :] if end >= 0 else ""
            else:  # then the outer `}` and `</tool_call>`; other text ends the call and is content again
                close = _CALL_CLOSE.match(buf, args.length)
                tail = buf[close.end() :]
                if not (tail.startswith(TOOL_CALL_END) or final or (tail and not TOOL_CALL_END.startswith(tail))):
                    return False
                if tail.startswith(TOOL_CALL_END):
                    rest = tail[len(TOOL_CALL_END) :]
                else:  # other text; or at the end nothing, or a cut-off `</tool_c`
                    rest = "" if TOOL_CALL_END.startswith(tail) else tail
            self.buffer, self.mode, self.arguments = rest, "content", None
            self.num_tool_calls += 1
            return True
        # mode == "block": a body in another shape, parsed whole once </tool_call> arrives
        at = buf.find(TOOL_CALL_END)
        if at < 0:
            if final:  # never closed: plain content
                delta.content += self.content.feed(TOOL_CALL_START + buf)
                self.buffer, self.mode = "", "content"
            return False
        call, _error = _parse_tool_call(buf[:at], closed=True)
        if call is None:
            delta.content += self.content.feed(TOOL_CALL_START + buf[: at + len(TOOL_CALL_END)])
        else:
            index = self.num_tool_calls
            delta.tool_calls.append(ToolCallDelta(index, new_tool_call_id(), call.name, ""))
            delta.tool_calls.append(ToolCallDelta(index, None, None, json.dumps(call.arguments, ensure_ascii=False)))
            self.num_tool_calls += 1
        self.buffer, self.mode = buf[at + len(TOOL_CALL_END) :], "content"
        return True


def parse_chat_output(text: str, *, reasoning_open: bool = False, parse_tools: bool = False, prefix: str = "") -> Delta:
    """The whole completion at once: the same parser, one push; the tool calls joined, one entry per call."""
    parser = ChatOutputParser(reasoning_open=reasoning_open, parse_tools=parse_tools, prefix=prefix)
    delta = parser.push(text)
    delta.extend(parser.finish())
    delta.tool_calls = join_tool_calls(delta.tool_calls)
    return delta


def tool_calls_json(calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` (from joined calls)."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
