"""The streaming reasoning/tool-call parser: any split of the text gives the same result as the whole text, and
well-formed completions split exactly as qwen3.chat.parse_completion (the non-streaming reference) splits them;
tool-call arguments stream in pieces that join to the arguments the model wrote, and JSONPrefix (which decides
which pieces may go out) agrees with json.loads on random documents and random corruptions of them."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")

from qwen3.chat import parse_completion  # noqa: E402
from qwen3.server.parsers import ChatOutputParser, JSONPrefix, join_tool_calls, parse_chat_output  # noqa: E402

WELL_FORMED = [
    "<think>\nLet me think.\nTwo lines.\n</think>\n\nThe answer is 42.",
    "<think>\n\n</think>\n\nJust content\nover two lines.",
    "Plain text with no reasoning at all.",
    '<think>\nneed a tool\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris", "days": 3}}\n</tool_call>',
    '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
    '{"x": [1, 2]}}\n</tool_call>',
    "<think>\nmath: 1 < 2 and </thin is not a tag\n</think>\n\n<b>bold?</b> a < b",
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}, "id": "x"}\n</tool_call>\nAfter.',  # a key after the arguments
]


def streamed(text: str, cuts: list[int], **kwargs):
    """(reasoning, content, [(index, name, arguments)]) of `text` pushed in pieces cut at `cuts`; checks that each
    call's first piece has its id and name and no arguments, and later pieces only arguments."""
    parser = ChatOutputParser(**kwargs)
    reasoning, content, pieces = "", "", []
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for delta in [parser.push(p) for p in chunks] + [parser.finish()]:
        reasoning += delta.reasoning
        content += delta.content
        pieces += delta.tool_calls
    seen = set()
    for piece in pieces:
        first = piece.index not in seen
        assert (piece.id is not None, piece.name is not None) == (first, first), piece
        assert not first or piece.arguments == ""
        seen.add(piece.index)
    return reasoning, content, [(c.index, c.name, c.arguments) for c in join_tool_calls(pieces)]


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
            [(i, c.name, c.arguments) for i, c in enumerate(whole.tool_calls)],
        )


def test_malformed_or_unclosed_tool_calls_are_content():
    for text in [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>',
        '<tool_call>\n{"name": "f", "argum',
        "<tool_call>\n",
    ]:
        parsed = parse_chat_output(text, parse_tools=True)
        assert parsed.tool_calls == [] and parsed.content == text.strip("\n")
        assert streamed(text, list(range(1, len(text))), parse_tools=True) == ("", parsed.content, [])


def test_tool_call_arguments_stream_as_written():
    # the arguments are the model's own JSON text, sent as it arrives (a number only once it is whole)
    args = '{"city": "Par\\"is\\u00e9", "days": [1, -2.5e3, true, null], "x": {}}'
    text = f'Checking.\n<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>\nDone.'
    parser = ChatOutputParser(parse_tools=True)
    shown = []  # the arguments text sent after each character
    for c in text:
        for piece in parser.push(c).tool_calls:
            shown.append(piece.arguments)
    parser.finish()
    assert "".join(shown) == args and json.loads("".join(shown))["days"][1] == -2500.0
    assert "".join(shown[:-1]).startswith('{"city"') and not any("}\n" in p for p in shown)
    # name in another order, or arguments as a JSON string: one call when the block closes, arguments re-serialised
    for body in ['{"arguments": {"a": 1}, "name": "f"}', '{"name": "f", "arguments": "{\\"a\\": 1}"}']:
        parsed = parse_chat_output(f"<tool_call>\n{body}\n</tool_call>", parse_tools=True)
        assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1}')]
    # once the name is out the call stays a call: cut off, or broken JSON, it keeps the valid beginning of its
    # arguments and the rest of the block is dropped (the stream already sent them; the non-streamed text agrees)
    for text, arguments in [
        ('<tool_call>\n{"name": "f", "arguments": {"a": 12', '{"a": 12'),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_c', '{"a": 1}'),
        ('<tool_call>\n{"name": "f", "arguments": {"a": tru', '{"a": '),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1,, "b": 2}}\n</tool_call>after', '{"a": 1,'),
    ]:
        parsed = parse_chat_output(text, parse_tools=True)
        assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", arguments)]
        assert parsed.content == ("after" if text.endswith("after") else "")
        assert streamed(text, list(range(1, len(text))), parse_tools=True) == (
            "",
            parsed.content,
            [(0, "f", arguments)],
        )
    # a whole call without its closing tag: the text after it is content again
    for text in ['<tool_call>\n{"name": "f", "arguments": {"a": 1}}\nSome text', '<tool_call>\n{"name": "f", '
                 '"arguments": {"a": 1}}\n</tool_call>\nSome text']:  # fmt: skip
        parsed = parse_chat_output(text, parse_tools=True)
        assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1}')]
        assert parsed.content == "Some text"
        assert streamed(text, list(range(1, len(text))), parse_tools=True) == ("", "Some text", [(0, "f", '{"a": 1}')])


def test_a_prefix_is_read_as_the_start_of_the_output():
    prefix = '<tool_call>\n{"name": "'
    parsed = parse_chat_output('f", "arguments": {"a": 1}}\n</tool_call>', parse_tools=True, prefix=prefix)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1}')] and parsed.content == ""
    parsed = parse_chat_output("no call after all", parse_tools=True, prefix=prefix)
    assert parsed.tool_calls == [] and parsed.content == prefix + "no call after all"


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**6), 10**6)
    if kind == 2:
        return rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)
    if kind in (3, 4):
        return "".join(rng.choice('ab "\\/\n\té€😀\x01') for _ in range(rng.randrange(6)))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        f"k{i}{_random_json(rng, 3) if kind == 6 else ''}": _random_json(rng, depth + 1)
        for i in range(rng.randrange(4))
    }


def _dumps_randomly(rng: random.Random, value) -> str:
    return json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]),
                      separators=rng.choice([None, (",", ":"), (" , ", " : ")]))  # fmt: skip


def test_json_prefix_agrees_with_json_loads():
    rng = random.Random(0)
    alphabet = '{}[]",:\\ 0123456789.-+eEtrufalsn\nx'
    for _ in range(300):
        text = _dumps_randomly(rng, {f"k{i}": _random_json(rng) for i in range(rng.randrange(1, 4))})
        # every beginning of a JSON object is accepted, and the whole object ends exactly at its end
        for cut in sorted({0, len(text), *(rng.randrange(len(text)) for _ in range(10))}):
            check = JSONPrefix()
            assert check.feed(text[:cut]) == cut and not check.error and check.safe <= cut
            assert check.done == (cut == len(text))
        check = JSONPrefix()
        assert check.feed(text + ' {"more"') == len(text) and check.done and check.safe == len(text)
        # a corrupted document: JSONPrefix says "a whole value" exactly when json.loads parses it
        chars = list(text)
        for _ in range(rng.randint(1, 2)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        bad = "".join(chars)
        check = JSONPrefix()
        whole = check.feed(bad) == len(bad) and check.done
        try:
            json.loads(bad)
            loads = True
        except json.JSONDecodeError:
            loads = False
        assert whole == loads, bad


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
