"""Tokenizer against transformers' AutoTokenizer, on the real Qwen3 files in tests/assets/qwen3-0.6b."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import tokenizers

import qwen3
from qwen3.hub import ModelNotFoundError
from qwen3.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, valid_text

ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n\r  .,;:!?'\"`~@#$%^&*()[]{}<>|/\\-_=+"
    "éèçñüßøåÆœ"  # Latin-1 and beyond
    "αβγΩжЖщЯ"  # Greek, Cyrillic
    "你好世界中文字符鿰㐀"  # CJK (incl. rare ones that byte-level BPE splits)
    "こんにちはカタカナ한국어"  # Japanese, Korean
    "مرحباשלוםनमस्तेสวัสดี"  # RTL scripts, Devanagari, Thai
    "😀🎉👍🏽🇫🇷❤️\u200d\ufe0f🦜𝔘𝕏𠀀"  # emoji, modifiers, ZWJ, variation selector, astral planes
    "\u0301\u0308\u00a0\u2028\u3000\ufffd"  # combining marks, odd spaces, the replacement character
)
FRAGMENTS = [
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "<|",
    "|>",
    "<",
]

CORPUS = [
    "",
    "Hello, world!",
    "Hello, world! 你好",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!!!",
    "I'm sure you'll see they've done what we'd said; it's John's.",
    "你好，世界！今天的天气怎么样？我想去公园散步。",
    "日本語のテキストとカタカナ、ひらがな、漢字の混在。",
    "한국어 문장도 잘 처리되어야 합니다.",
    "Смешанный текст: English, русский, Ελληνικά, עברית, العربية, हिन्दी, ไทย.",
    "Emoji: 😀😃😄 👍🏽 🇫🇷🇯🇵 ❤️ 🦜",
    "ZWJ families: 👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🧑‍🤝‍🧑",
    "Rare CJK: 鿰 𠀀𠀁 㐀 and math letters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n",
    'int main() {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    "    leading spaces, trailing spaces    ",
    "tabs\t\t\tand\n\n\n\nnewlines\r\n\r\nand          long          runs" + " " * 40 + "!",
    "\n\n\n",
    " ",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -2.5e-10 1,000,000 0x1F 2024-06-01",
    "user wrote <|im_end|> in the middle, and <|im_start|>system too",
    "fake think: <think>not really</think> and <tool_call>{}</tool_call>",
    "<|endoftext|><|endoftext|>",
    "half tokens: <|im_end and im_end|> and <|im_end|x",
    "Combining: e\u0301 a\u0308 n\u0303 (NFC folds them) vs é ä ñ",
    "Odd spaces:\u00a0\u2028\u3000|\ufffd|",
    'JSON: {"a": [1, 2, {"b": null}], "c": "<>&\'"}',
    "URL https://example.com/path?q=a+b&x=%20y#frag and email a.b@c.org",
    "a" * 300,
    "🎉" * 20 + "中" * 20,
]


def random_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.08:
                parts.append(rng.choice(FRAGMENTS))
            else:
                parts.append("".join(rng.choices(ALPHABET, k=rng.randint(1, 6))))
        out.append("".join(parts))
    return out


TEXTS = CORPUS + random_strings(seed=1234, count=150)


@pytest.fixture(scope="module")
def added_ids(hf) -> set[int]:
    return set(hf.added_tokens_decoder)


# ---------------------------------------------------------------------------------------------------------
# Encode / decode


def test_encode_matches_transformers(tok, hf):
    for text in TEXTS:
        ref = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, allow_special=True) == ref, text
        assert hf.encode(text) == ref, "transformers adds no BOS for Qwen3 either"


def test_decode_matches_transformers(tok, hf):
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_roundtrip_is_nfc(tok):
    # Independent of transformers: decoding gives back the text, up to the NFC normaliser.
    for text in TEXTS:
        assert tok.decode(tok.encode(text, allow_special=True)) == unicodedata.normalize("NFC", text)


def test_decode_of_random_ids_matches_transformers(tok, hf):
    # Random ids include byte fragments (half a character), so invalid UTF-8 is exercised.
    rng = random.Random(0)
    added = sorted(hf.added_tokens_decoder)
    for _ in range(300):
        ids = [rng.choice(added) if rng.random() < 0.1 else rng.randrange(151643) for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_decode_of_partial_characters(tok, hf):
    for char in ["鿰", "𠀀", "👨‍👩‍👧‍👦"]:
        ids = hf.encode(char)
        assert len(ids) > 1
        for i in range(len(ids)):
            for part in (ids[i : i + 1], ids[:i], ids[i:]):
                assert tok.decode(part) == hf.decode(part)
    assert "\ufffd" in tok.decode(hf.encode("鿰")[:1])


def test_decode_accepts_any_int_sequence(tok):
    ids = tok.encode("Hello, world!")
    assert tok.decode(tuple(ids)) == tok.decode(ids) == "Hello, world!"


# ---------------------------------------------------------------------------------------------------------
# Special tokens


def test_special_token_lookalikes(tok, hf, added_ids):
    # Finding: transformers' default (split_special_tokens=False) turns the text "<|im_end|>" into the control
    # token, wherever it comes from. Our default keeps it text; allow_special=True reproduces transformers.
    text = "please ignore <|im_end|> and <think>"
    ref = hf.encode(text)
    assert hf.convert_tokens_to_ids("<|im_end|>") in ref
    assert tok.encode(text, allow_special=True) == ref
    plain = tok.encode(text)
    assert not added_ids & set(plain) and tok.decode(plain) == text
    assert tok.encode("<|im_end|>") == hf.encode("<|im_end|>", split_special_tokens=True)


def test_plain_encoding_matches_no_added_tokens(tok, hf, added_ids):
    for text in TEXTS:
        ids = tok.encode(text, allow_special=False)
        assert not added_ids & set(ids), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        if not any(f in text for f in ("<think>", "</think>", "<tool_call>")):
            # transformers' split_special_tokens only splits special tokens; for the rest it agrees.
            assert ids == hf.encode(text, split_special_tokens=True), text


def test_named_special_token_ids(tok, hf):
    named = {
        "endoftext_id": "<|endoftext|>",
        "im_start_id": "<|im_start|>",
        "im_end_id": "<|im_end|>",
        "think_start_id": "<think>",
        "think_end_id": "</think>",
        "tool_call_start_id": "<tool_call>",
        "tool_call_end_id": "</tool_call>",
    }
    for attribute, text in named.items():
        assert getattr(tok, attribute) == hf.convert_tokens_to_ids(text), attribute
        assert tok.token_to_id(text) == getattr(tok, attribute)
        assert tok.id_to_token(getattr(tok, attribute)) == text
        assert tok.encode(text, allow_special=True) == [getattr(tok, attribute)]


def test_vocab_eos_pad(tok, hf, tokenizer_files):
    generation_config = json.loads((tokenizer_files / "generation_config.json").read_text())
    assert tok.eos_token_ids == generation_config["eos_token_id"]
    assert tok.eos_token_ids == [
        hf.convert_tokens_to_ids("<|im_end|>"),
        hf.convert_tokens_to_ids("<|endoftext|>"),
    ]
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.vocab_size == len(tok) == len(hf)
    assert isinstance(tok.chat_template, str) and tok.chat_template == hf.chat_template


def test_token_to_id_and_back(tok, hf):
    rng = random.Random(1)
    for token_id in [0, 1, 220, 151642, *rng.sample(range(tok.vocab_size), 200)]:
        token = hf.convert_ids_to_tokens(token_id)
        assert tok.id_to_token(token_id) == token
        assert tok.token_to_id(token) == token_id
    assert tok.token_to_id("definitely not a token") is None


def test_invalid_text_becomes_replacement_characters(tok, hf):
    # Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape: argv, a terminal, stdin); the
    # tokenizers library refused them with "TypeError: TextInputSequence must be str". Reference: Python's own
    # "replace" decoding of the same bytes, encoded by transformers.
    rng = random.Random(5)
    samples = [b"caf\xe9 ok", b"\xff\xfe<|im_end|>", b"half an emoji \xf0\x9f\x98", b"\xc3(\x80 \xed\xa0\x80 end"]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 30))) for _ in range(30)]
    for raw in samples:
        typed = raw.decode("utf-8", "surrogateescape")
        replaced = raw.decode("utf-8", "replace")
        assert valid_text(typed) == replaced, raw
        assert tok.encode(typed, allow_special=True) == hf.encode(replaced, add_special_tokens=False), raw
        assert tok.encode(typed) == tok.encode(replaced), raw
    # A split surrogate pair is joined; lone halves (not escaped bytes) are replaced.
    assert valid_text("\ud83d\ude00 \ud83d \ude00 \udc41") == "\U0001f600 \ufffd \ufffd \ufffd"
    text = "plain text stays the same object"
    assert valid_text(text) is text


# ---------------------------------------------------------------------------------------------------------
# Loading


def test_missing_tokenizer_json_is_named(tmp_path, tokenizer_files):
    shutil.copy(tokenizer_files / "tokenizer_config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_tokenizer(tmp_path / "nope")


def test_eos_falls_back_to_tokenizer_config(tmp_path, tokenizer_files, hf):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files / name, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == [hf.eos_token_id]
    assert tok.pad_token_id == hf.pad_token_id


def test_tokenizer_json_alone(tmp_path, tokenizer_files, hf):
    shutil.copy(tokenizer_files / "tokenizer.json", tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("你好 <|im_end|>", allow_special=True) == hf.encode("你好 <|im_end|>")
    assert tok.chat_template is None and tok.eos_token_ids == [] and tok.pad_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------------
# Streaming


def stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# Every streaming test runs both paths: the byte table (Qwen's decoder is byte-level) and the plain window path.
both_paths = pytest.mark.parametrize("byte_pieces", [True, False], ids=["table", "window"])


@both_paths
def test_stream_concatenation_equals_decode(tok, hf, byte_pieces):
    rng = random.Random(2)
    specials = [tok.im_end_id, tok.endoftext_id, tok.think_start_id]
    for text in TEXTS:
        ids = hf.encode(text)
        if ids and rng.random() < 0.5:  # splice control tokens in, possibly inside a multi-byte character
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        for skip in (False, True):
            chunks = stream(tok, ids, skip_special_tokens=skip, byte_pieces=byte_pieces)
            assert "".join(chunks) == hf.decode(ids, skip_special_tokens=skip), text
            if "\ufffd" not in hf.decode(ids, skip_special_tokens=skip):
                assert not any("\ufffd" in chunk for chunk in chunks), (text, chunks)


@both_paths
def test_stream_emits_split_characters_whole(tok, hf, byte_pieces):
    split = [c for c in "鿰𠀀𠀁㐀🦜👍🏽" if len(hf.encode(c)) > 1]
    assert split, "expected characters that byte-level BPE splits across tokens"
    for char in split:
        ids = hf.encode(char)
        assert all("\ufffd" in hf.decode([i]) for i in ids[:1]), "the first token is a partial character"
        chunks = stream(tok, hf.encode(f"a{char}b"), byte_pieces=byte_pieces)
        assert any(char in chunk for chunk in chunks), chunks  # whole, in one chunk
        assert all("\ufffd" not in chunk for chunk in chunks)
        assert "".join(chunks) == f"a{char}b"
    # A single split character: nothing until its last byte, then the whole character.
    ids = hf.encode("鿰")
    assert stream(tok, ids, byte_pieces=byte_pieces) == [""] * (len(ids) - 1) + ["鿰", ""]


@both_paths
def test_stream_random_ids(tok, hf, byte_pieces):
    # Arbitrary ids (invalid UTF-8, fragments, specials, ids past the tokenizer's vocabulary as the model's padded
    # embedding can sample them): the stream still adds up to decode(all).
    rng = random.Random(3)
    added = sorted(hf.added_tokens_decoder)
    fragments = hf.encode("鿰𠀀👨‍👩‍👧‍👦\ufffd")
    for _ in range(200):
        ids = [
            rng.choice(fragments)
            if rng.random() < 0.5
            else rng.choice(added)
            if rng.random() < 0.1
            else rng.randrange(151936)
            for _ in range(rng.randint(1, 40))
        ]
        for skip in (False, True):
            text = "".join(stream(tok, ids, skip_special_tokens=skip, byte_pieces=byte_pieces))
            assert text == hf.decode(ids, skip_special_tokens=skip)


def test_stream_cost_stays_constant_per_token(tok, hf):
    # Even when every prefix ends in U+FFFD (the model printing "\ufffd", or stray bytes), the decoder keeps
    # its window short: the ids it decodes in total grow linearly with the stream.
    replacement = hf.encode("\ufffd")
    assert len(replacement) == 1
    rng = random.Random(4)
    fragments = [i for i in hf.encode("鿰𠀀") if "\ufffd" in hf.decode([i])]
    for ids in ([replacement[0]] * 2000, [rng.choice(fragments + replacement) for _ in range(2000)]):
        decoder = StreamDecoder(tok, byte_pieces=False)  # the window path (the table path never decodes a window)
        decoded = 0
        plain_decode = decoder._decode

        def counting_decode(window, plain_decode=plain_decode):
            nonlocal decoded
            decoded += len(window)
            return plain_decode(window)

        decoder._decode = counting_decode
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == hf.decode(ids)
        assert decoded < 100 * len(ids)


def test_byte_pieces_only_for_byte_level_decoders(tok):
    # The demo model's tokenizer is byte-level too: streams of random ids add up to its decode on both paths.
    demo = load_tokenizer(Path(qwen3.__file__).parent / "demo")
    assert demo.byte_pieces is not None and tok.byte_pieces is not None
    rng = random.Random(5)
    for _ in range(100):
        ids = [rng.randrange(demo.vocab_size + 10) for _ in range(rng.randint(1, 30))]
        assert "".join(stream(demo, ids)) == "".join(stream(demo, ids, byte_pieces=False)) == demo.decode(ids)
    # A decoder that is not byte-level (WordPiece): no table; its streams take the window path.
    vocab = {"[UNK]": 0, "hello": 1, "##lo": 2, "world": 3, "!": 4, "<|endoftext|>": 5, "<|im_start|>": 6,
             "<|im_end|>": 7}  # fmt: skip
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    backend.decoder = tokenizers.decoders.WordPiece()
    other = Tokenizer(backend)
    assert other.byte_pieces is None
    ids = [1, 2, 3, 4, 1]
    assert stream(other, ids) == stream(other, ids, byte_pieces=False) == ["hello", "##lo", "world", "!", "hello", ""]
