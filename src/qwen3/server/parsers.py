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
* A tool-call block is emitted when its closing tag arrives: a first delta with the index, id, type and
  name, then one with the arguments as a JSON string (the shape OpenAI streams). A block that is not valid
  JSON with a string "name", or that is never closed, is returned as plain content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..chat import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START, _parse_tool_call


@dataclass
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Delta:
    """What one push produced: any of reasoning text, content text, finished tool calls."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


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

    def __init__(self, *, reasoning_open: bool = False, parse_tools: bool = False) -> None:
        self.mode = "reasoning" if reasoning_open else "undecided"
        self.parse_tools = parse_tools
        self.buffer = ""
        self.reasoning = _Section()
        self.content = _Section()
        self.num_tool_calls = 0

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
                    self.buffer, self.mode = buf[at:], "tool"
                    return True
            keep = 0 if final or not self.parse_tools else _partial_suffix(buf, TOOL_CALL_START)
            delta.content += self.content.feed(buf[: len(buf) - keep])
            self.buffer = buf[len(buf) - keep :]
            return False
        # mode == "tool": the buffer starts with <tool_call>
        at = buf.find(TOOL_CALL_END)
        if at < 0:
            if final:  # never closed: plain content
                delta.content += self.content.feed(buf)
                self.buffer, self.mode = "", "content"
            return False
        block = buf[: at + len(TOOL_CALL_END)]
        call, _error = _parse_tool_call(block[len(TOOL_CALL_START) : at], closed=True)
        if call is None:
            delta.content += self.content.feed(block)
        else:
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            delta.tool_calls.append(ToolCallDelta(self.num_tool_calls, new_tool_call_id(), call.name, arguments))
            self.num_tool_calls += 1
        self.buffer, self.mode = buf[len(block) :], "content"
        return True


def parse_chat_output(text: str, *, reasoning_open: bool = False, parse_tools: bool = False) -> Delta:
    """The whole completion at once: the same parser, one push."""
    parser = ChatOutputParser(reasoning_open=reasoning_open, parse_tools=parse_tools)
    first, last = parser.push(text), parser.finish()
    return Delta(first.reasoning + last.reasoning, first.content + last.content, first.tool_calls + last.tool_calls)


def tool_calls_json(calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
