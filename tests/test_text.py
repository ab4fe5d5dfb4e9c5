"""TextStream (qwen3.text): pieces concatenate to the decoded text, never split a character, never show a stop
string or its beginning, end on EOS / stop token ids / stop strings. The reference is tokenizer.decode of the ids."""

from __future__ import annotations

import random

import pytest

from qwen3.text import TextStream, safe_prefix_length


def run(stream: TextStream, ids: list[int]) -> tuple[list[str], int]:
    """Push ids until the stream finishes; the pieces (the finish() rest included) and the ids consumed."""
    pieces = []
    used = 0
    for token_id in ids:
        pieces.append(stream.push(token_id))
        used += 1
        if stream.finished:
            break
    pieces.append(stream.finish())
    return pieces, used


def test_pieces_concatenate_to_decode_and_never_split_characters(tok):
    text = "Plain words, then 鿰 and 🦜👍🏽 and 龘, then the end."
    ids = tok.encode(text)
    pieces, _ = run(TextStream(tok), ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_split_over_tokens_is_never_shown(tok):
    text = "Answer: 42. END of story"
    ids = tok.encode(text)
    stream = TextStream(tok, stop=["END", "never"])
    pieces, used = run(stream, ids)
    assert "".join(pieces) == stream.text == "Answer: 42. "
    assert stream.finish_reason == "stop"
    # every prefix of the streamed text is a prefix of the final text: nothing shown was taken back
    shown = ""
    for p in pieces:
        shown += p
        assert stream.text.startswith(shown)
    assert used < len(ids)


@pytest.mark.parametrize("seed", range(5))
def test_random_stop_strings_against_a_recomputation(tok, seed):
    """Random text and a random stop string taken from it (or absent): the stream's text is the decoded text cut
    before the first occurrence, and the held-back tail never leaks."""
    rng = random.Random(seed)
    words = ["alpha", "be", "ta", "ga", "mma", " ", ".", "é", "中文", "🙂", "END", "\n"]
    text = "".join(rng.choice(words) for _ in range(40))
    ids = tok.encode(text)
    start = rng.randrange(len(text) - 4)
    stop = text[start : start + rng.randint(1, 4)] if seed % 2 == 0 else "@@@"
    stream = TextStream(tok, stop=[stop])
    pieces, _ = run(stream, ids)
    full = tok.decode(ids)
    expected = full[: full.find(stop)] if stop in full else full
    assert "".join(pieces) == stream.text == expected
    assert stream.finish_reason == ("stop" if stop in full else None)


def test_eos_and_stop_token_ids_end_without_text(tok):
    ids = tok.encode("one two three")
    stream = TextStream(tok, eos_token_ids=[tok.im_end_id], stop_token_ids=[7])
    pieces, used = run(stream, ids + [tok.im_end_id] + ids)
    assert "".join(pieces) == "one two three" and stream.finish_reason == "eos" and used == len(ids) + 1
    stream = TextStream(tok, eos_token_ids=[tok.im_end_id], stop_token_ids=[ids[1]])
    pieces, _ = run(stream, ids)
    assert "".join(pieces) == tok.decode(ids[:1]) and stream.finish_reason == "stop"
    assert stream.push(ids[0]) == "" and stream.finish() == ""  # a finished stream takes nothing more


def test_finish_releases_held_text_and_length_has_no_reason(tok):
    stream = TextStream(tok, stop=["xyz"])
    piece = "".join(stream.push(i) for i in tok.encode("abc x"))
    assert piece == "abc "  # " x" ... "x" might begin "xyz": held back
    assert stream.finish() == "x" and stream.finish_reason is None and stream.text == "abc x"


def test_safe_prefix_length():
    assert safe_prefix_length("hello wor", ["world"]) == 6
    assert safe_prefix_length("hello", ["xyz"]) == 5
    assert safe_prefix_length("ab", ["abc", "b"]) == 0  # "ab" may begin "abc"


def test_empty_stop_string_rejected(tok):
    with pytest.raises(ValueError, match="stop"):
        TextStream(tok, stop=[""])
