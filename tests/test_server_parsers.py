"""The streaming reasoning/tool-call parser: any split of the text gives the same result as the whole text, and
well-formed completions split exactly as qwen3.chat.parse_completion (the non-streaming reference) splits them."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")

from qwen3.chat import parse_completion  # noqa: E402
from qwen3.server.parsers import ChatOutputParser, parse_chat_output  # noqa: E402

WELL_FORMED = [
    "<think>\nLet me think.\nTwo lines.\n</think>\n\nThe answer is 42.",
    "<think>\n\n</think>\n\nJust content\nover two lines.",
    "Plain text with no reasoning at all.",
    '<think>\nneed a tool\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris", "days": 3}}\n</tool_call>',
    '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
    '{"x": [1, 2]}}\n</tool_call>',
    "<think>\nmath: 1 < 2 and </thin is not a tag\n</think>\n\n<b>bold?</b> a < b",
]


def streamed(text: str, cuts: list[int], **kwargs):
    parser = ChatOutputParser(**kwargs)
    reasoning, content, calls = "", "", []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for delta in [parser.push(p) for p in pieces] + [parser.finish()]:
        reasoning += delta.reasoning
        content += delta.content
        calls += delta.tool_calls
    return reasoning, content, [(c.index, c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_any_split_matches_whole_text_and_parse_completion(text):
    whole = parse_chat_output(text, parse_tools=True)
    expected = parse_completion(text)
    assert whole.reasoning == expected.reasoning
    assert whole.content == expected.content
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [
        (c.name, c.arguments) for c in expected.tool_calls
    ]
    rng = random.Random(len(text))
    for trial in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        if trial == 0:
            cuts = list(range(1, len(text)))  # one character at a time
        got = streamed(text, cuts, parse_tools=True)
        assert got == (
            whole.reasoning,
            whole.content,
            [(i, c.name, json.loads(c.arguments)) for i, c in enumerate(whole.tool_calls)],
        )


def test_malformed_or_unclosed_tool_calls_are_content():
    for text in [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}',
    ]:
        parsed = parse_chat_output(text, parse_tools=True)
        assert parsed.tool_calls == [] and parsed.content == text.strip("\n")
        assert streamed(text, list(range(1, len(text))), parse_tools=True) == ("", parsed.content, [])


def test_without_tools_the_tags_stay_text_and_open_think_from_prompt():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_chat_output(text).content == text and not parse_chat_output(text).tool_calls
    # the template opened <think> in the prompt: the completion starts inside the reasoning
    parsed = parse_chat_output("still thinking\n</think>\n\nanswer", reasoning_open=True)
    assert (parsed.reasoning, parsed.content) == ("still thinking", "answer")
    # cut off while thinking: all reasoning, no content
    parsed = parse_chat_output("<think>\nhalf a thought")
    assert (parsed.reasoning, parsed.content) == ("half a thought", "")


def test_a_partial_tag_is_held_back_until_it_resolves():
    parser = ChatOutputParser()
    assert parser.push("<thi").content == "" and parser.push("nk>\nhm").reasoning == "hm"
    assert parser.push("</thi").reasoning == ""
    delta = parser.push("nk>\n\nok")
    assert (delta.reasoning, delta.content) == ("", "ok")
