"""The Qwen3 tokenizer: Hugging Face `tokenizers` running the model's own `tokenizer.json`, plus chat helpers.

Encoding and decoding are the `tokenizers` library's byte-level BPE, so ids match transformers'
`AutoTokenizer` exactly; this module adds what a chat loop needs around it: end-of-turn ids, the chat
template (rendered by `qwen3.chat`), and streaming decode.

Special-token look-alikes. `encode(text)` encodes every character of `text` as plain text: a user who
types "<|im_end|>" gets the tokens of those nine characters, never the control token 151645, so text
cannot forge turn boundaries. We checked what transformers does, and it differs: its Qwen3 tokenizer
(`split_special_tokens=False` in `tokenizer_config.json`) turns the text "<|im_end|>" into 151645
wherever it appears, and the non-special added tokens "<think>", "<tool_call>" likewise.
`encode(text, allow_special=True)` reproduces transformers' default exactly (tested), and so does
`apply_chat_template(..., tokenize=True)`: a rendered prompt carries its markers as text, and a look-alike
inside a message becomes a control token there too. (transformers' `split_special_tokens=True` still
matches "<think>" and "<tool_call>", which are added tokens not flagged special; plain encoding matches no
added token at all.)

`encode_chat(messages)` is the prompt for untrusted messages (chat, a server): the template's own markers
are tokens, every string in the messages and tools is text. It renders the template with each look-alike
in those strings swapped for a private-use character, so the template neither sees nor emits it; then it
splits the rendered text at the added tokens left (the template's, matched as transformers matches them:
leftmost, longest first) and encodes each piece between them as plain text with the look-alikes put back.
Without look-alikes in the messages this is exactly transformers' encoding of `apply_chat_template`'s
string (tested). An assistant message whose content holds "</think>" is first split into reasoning and
content the way Qwen3's template splits it, so its reasoning markers stay the template's.

Invalid text. Python strings can hold lone surrogates (bytes that are not UTF-8, read from a terminal,
argv or stdin with `surrogateescape`), which the `tokenizers` library refuses with a TypeError.
`valid_text(text)` replaces them by U+FFFD (joining a split surrogate pair); `encode` applies it.

Streaming. Byte-level BPE tokens are bytes, not characters: an emoji or CJK character can be split
across two or three tokens, and decoding such a prefix ends in U+FFFD. With a byte-level decoder (Qwen's
`tokenizer.json` has one) the text of some ids is the UTF-8 decoding of their bytes joined, each token's
bytes spelled in GPT-2's byte-to-character alphabet: `StreamDecoder` looks each id's bytes up in a table
built once (`Tokenizer.byte_pieces`) and feeds them to Python's incremental UTF-8 decoder, which holds an
incomplete character back until its last byte arrives (a server streams hundreds of tokens per engine step:
a table lookup costs far less than a call into the tokenizer). The plain path, for other decoders and as the
reference in the tests, decodes a short window of recent ids with the tokenizer, emits the text before a
trailing U+FFFD and holds that back; once the window decodes with no pending character it is dropped, so
each step costs O(1) there too. Both give exactly `decode(ids)` when joined.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from .chat import THINK_END, THINK_START, ChatTemplate, normalize_messages
from .hub import TOKENIZER_FILES, resolve_source

REPLACEMENT_CHAR = "\ufffd"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_NOT_ESCAPED_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # lone surrogates that surrogateescape did not make
_PRIVATE_USE = re.compile("[\U000f0000-\U0010ffff]")  # where encode_chat draws its stand-in characters


def valid_text(text: str) -> str:
    """`text` made valid Unicode, as Python's `bytes.decode("utf-8", "replace")` would have read it: the bytes
    kept by `surrogateescape` (lone surrogates U+DC80..U+DCFF) are decoded again, each invalid sequence becoming
    one U+FFFD; a split surrogate pair is joined, any other lone surrogate is U+FFFD. Valid text is returned
    as is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")  # joins split pairs
    text = _NOT_ESCAPED_BYTE.sub(REPLACEMENT_CHAR, text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or a dict with "content"."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


class Tokenizer:
    """Qwen3's tokenizer. Build it with `load_tokenizer(source)` or `Tokenizer.from_directory(path)`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        name: str = "tokenizer.json",
    ):
        self.backend = backend
        tokenizer_config = dict(tokenizer_config or {})
        generation_config = dict(generation_config or {})
        self.name = name

        # Text of the named special tokens, e.g. {"eos_token": "<|im_end|>"}; chat templates may use them.
        self.special_tokens = {
            key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_content(tokenizer_config.get(key)))
        }
        template = chat_template if chat_template is not None else tokenizer_config.get("chat_template")
        if isinstance(template, list):  # the older multi-template form: [{"name": ..., "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template

        def require(text: str) -> int:
            token_id = backend.token_to_id(text)
            if token_id is None:
                raise ValueError(f"{name}: the vocabulary has no {text!r} token; is this a Qwen3 tokenizer?")
            return token_id

        self.endoftext_id: int = require("<|endoftext|>")
        self.im_start_id: int = require("<|im_start|>")
        self.im_end_id: int = require("<|im_end|>")
        # Present in Qwen3; None for tokenizers without reasoning or tool use.
        self.think_start_id: int | None = backend.token_to_id("<think>")
        self.think_end_id: int | None = backend.token_to_id("</think>")
        self.tool_call_start_id: int | None = backend.token_to_id("<tool_call>")
        self.tool_call_end_id: int | None = backend.token_to_id("</tool_call>")

        eos = generation_config.get("eos_token_id")
        if eos is None and (text := self.special_tokens.get("eos_token")) is not None:
            eos = require(text)
        self.eos_token_ids: list[int] = (
            [] if eos is None else [int(i) for i in ([eos] if isinstance(eos, int) else eos)]
        )

        pad_text = self.special_tokens.get("pad_token")
        pad = require(pad_text) if pad_text is not None else generation_config.get("pad_token_id")
        self.pad_token_id: int | None = None if pad is None else int(pad)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json (required), tokenizer_config.json, generation_config.json and
        chat_template.jinja (optional) from `directory`."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in {directory}: the tokenizer needs it (tokenizer_config.json "
                f"and generation_config.json beside it are optional)"
            )
        backend = tokenizers.Tokenizer.from_file(str(path))
        template_file = directory / "chat_template.jinja"  # where newer transformers save the template
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls(
            backend,
            tokenizer_config=_read_json(directory / "tokenizer_config.json"),
            generation_config=_read_json(directory / "generation_config.json"),
            chat_template=template,
            name=str(path),
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (151,669 for Qwen3; the model's embedding is padded
        larger, to 151,936). transformers' `len(tokenizer)`; its `vocab_size` leaves the added tokens out."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token as spelled in the vocabulary (byte-level form, e.g. "Ġhello"), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # -----------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with no BOS (Qwen3 adds none).

        By default all of `text` is plain text, special-token look-alikes included. `allow_special=True`
        matches added tokens written in the text, so "<|im_end|>" becomes 151645 (transformers' default).
        Lone surrogates become U+FFFD (see `valid_text`).
        """
        text = valid_text(text)
        if allow_special:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        # The backend's pipeline without the added-token matching: normalise, pre-tokenise, BPE each piece.
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = (
            [text] if backend.pre_tokenizer is None else [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        )
        return [token.id for piece in pieces for token in backend.model.tokenize(piece)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD. `skip_special_tokens` drops the
        tokens flagged special (<|im_end|>, <|endoftext|>...) but keeps <think> and <tool_call>, as
        transformers does."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    @cached_property
    def byte_pieces(self) -> tuple[list[bytes], frozenset[int]] | None:
        """(each id's bytes, the ids of special tokens) where the decoder is byte-level, else None.

        The ByteLevel decoder maps every character of a token back to its byte through GPT-2's alphabet (a token
        with a character outside it, such as an added token written with a space, stands for its own UTF-8), then
        decodes all the bytes as UTF-8 with U+FFFD for invalid sequences; ids outside the vocabulary decode to
        nothing. Built once per tokenizer (0.15 s for Qwen3's 151,669 tokens)."""
        if not isinstance(self.backend.decoder, tokenizers.decoders.ByteLevel):
            return None
        alphabet = _byte_level_alphabet()
        vocab = self.backend.get_vocab(with_added_tokens=True)
        pieces = [b""] * (max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            try:
                pieces[i] = bytes([alphabet[c] for c in token])
            except KeyError:
                pieces[i] = token.encode()
        special = frozenset(i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)
        return pieces, special

    # -----------------------------------------------------------------------------------------------------
    # Chat

    @cached_property
    def _compiled_chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise ValueError(f"{self.name}: this tokenizer has no chat template (none in tokenizer_config.json)")
        return ChatTemplate(self.chat_template, self.special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        *,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """The prompt for `messages` as rendered by transformers' `apply_chat_template`; ids if `tokenize`.

        `messages` are dicts with "role" (system, user, assistant, tool) and "content"; an assistant message
        may carry "reasoning_content" and "tool_calls", `tools` are JSON schemas. Extra keyword arguments
        reach the template. The ids encode the rendered text with special tokens recognised.
        """
        text = self._compiled_chat_template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **kwargs,
        )
        return self.encode(text, allow_special=True) if tokenize else text

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """The prompt's token ids with every string of `messages` and `tools` kept as text: only the template's
        own markers are control tokens, so a message cannot forge a turn. Without look-alikes in the messages,
        equal to `apply_chat_template(..., tokenize=True)` (transformers' ids). See the module docstring."""
        messages = [_split_reasoning(m) for m in normalize_messages(messages)]
        used: set[str] = set()  # stand-ins must not occur in the messages themselves
        _walk_strings([messages, tools], lambda text: used.update(_PRIVATE_USE.findall(text)))
        free = (chr(c) for c in range(0xF0000, 0x110000) if chr(c) not in used)
        stand_in = {token: next(free) for token in self._added_tokens}
        pattern = self._added_token_pattern

        def defuse(text: str) -> str:
            return pattern.sub(lambda m: stand_in[m.group()], valid_text(text)) if pattern else valid_text(text)

        text = self._compiled_chat_template.render(
            _walk_strings(messages, defuse),
            tools=_walk_strings(tools, defuse),
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **kwargs,
        )
        restore = {ord(char): token for token, char in stand_in.items()}
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text) if pattern else ():
            if match.start() > start:
                ids += self._encode_plain(text[start : match.start()].translate(restore))
            ids.append(self._added_tokens[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._encode_plain(text[start:].translate(restore))
        return ids

    @cached_property
    def _added_tokens(self) -> dict[str, int]:
        """Text -> id of the added tokens (special or not), which transformers matches in text."""
        return {token.content: i for i, token in self.backend.get_added_tokens_decoder().items()}

    @cached_property
    def _added_token_pattern(self) -> re.Pattern[str] | None:
        # Longest first, so that the regex's leftmost match is also the longest, as the tokenizers library does.
        tokens = sorted(self._added_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _walk_strings(value: Any, fn: Any) -> Any:
    """A copy of a JSON-like value with fn applied to every string value (dict keys are left alone)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {key: _walk_strings(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk_strings(item, fn) for item in value]
    return value


def _split_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message whose content holds "</think>" (and no separate reasoning), split as Qwen3's
    template splits it: the reasoning before the first </think> (after a <think>), the content after the last."""
    content = message.get("content")
    if message.get("role") != "assistant" or "reasoning_content" in message or not isinstance(content, str):
        return message
    if THINK_END not in content:
        return message
    reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
    return {**message, "content": content.split(THINK_END)[-1].lstrip("\n"), "reasoning_content": reasoning}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the other 68
    bytes (control characters, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


class StreamDecoder:
    """Turns generated ids into text as they arrive: `push(id)` returns the newly completed text and
    `flush()` the rest; the concatenation equals `tokenizer.decode(all_ids)`. See the module docstring:
    `byte_pieces=False` takes the plain path (decoding a window of ids) even where the table path applies."""

    _COMPACT_AFTER = 8  # held-back ids before looking for a place to cut the window (only with invalid UTF-8)

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False, byte_pieces: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # ids since the last point where the text had no pending character
        self._emitted = 0  # characters of decode(window) already returned
        table = tokenizer.byte_pieces if byte_pieces else None
        self._pieces = None if table is None else table[0]
        self._skip = table[1] if table is not None and skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        pieces = self._pieces
        if pieces is not None:
            i = int(token_id)
            return "" if i >= len(pieces) or i in self._skip else self._utf8.decode(pieces[i])
        window = self._window
        window.append(int(token_id))
        text = self._decode(window)
        if not text.endswith(REPLACEMENT_CHAR):  # no character in flight: everything is final
            new = text[self._emitted :]
            window.clear()
            self._emitted = 0
            return new
        # The last U+FFFD may be a character whose remaining bytes are still to come: hold it back.
        # The text before it is final, since UTF-8 decodes left to right.
        stable = len(text) - 1
        new = text[self._emitted : stable]
        self._emitted = max(self._emitted, stable)
        if len(window) > self._COMPACT_AFTER:
            self._compact(text)
        return new

    def _compact(self, text: str) -> None:
        """Drop the head of a long window at a boundary the decoder does not carry state across.

        A window only grows while its text keeps ending in U+FFFD: the model emitting invalid UTF-8 or
        the U+FFFD character itself. A cut is safe where decoding the two halves apart gives the same text
        as decoding them together; try the few boundaries nearest the end.
        """
        window = self._window
        for cut in range(len(window) - 1, max(0, len(window) - 5), -1):
            head = self._decode(window[:cut])
            if len(head) <= self._emitted and head + self._decode(window[cut:]) == text:
                del window[:cut]
                self._emitted -= len(head)
                return

    def flush(self) -> str:
        """The held-back text (a character that never completed decodes as U+FFFD); resets the decoder."""
        if self._pieces is not None:
            new = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return new
        new = self._decode(self._window)[self._emitted :]
        self._window.clear()
        self._emitted = 0
        return new


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model: a local directory or a Hub repo id (only tokenizer files are fetched)."""
    return Tokenizer.from_directory(resolve_source(source, TOKENIZER_FILES))
