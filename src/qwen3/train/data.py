"""Training data: find the files, tokenize each once into an on-disk cache, pack the tokens into blocks.

Formats, decided per file:
- `*.txt`: the whole file is one document.
- `*.jsonl` whose records have a "text" field: one document per line.
- `*.jsonl` whose records have a "messages" field: one conversation per line, rendered with the
  tokenizer's chat template (`add_generation_prompt=False`) and encoded with its special tokens recognised.
  Only assistant tokens are learned: for every `<|im_start|>assistant` header (matched by token ids, at the
  start of the conversation or right after `<|im_end|>\\n`, where the template opens turns), the tokens
  after the header's newline up to and including the turn's `<|im_end|>`. If byte-level BPE merged the
  header's newline with newlines that open the content (`\\n\\n` is one token), that merged token is learned
  too. Whatever the template renders inside an assistant turn (e.g. Qwen3's empty
  `<think>\\n\\n</think>\\n\\n` block on the last turn) is part of the turn. As in transformers'
  `apply_chat_template`, special-token strings typed inside a message become control tokens; a lone
  `<|im_start|>assistant` inside a user message is not taken for a turn, but a forged whole turn would be.
A folder stands for every `*.txt` and `*.jsonl` file under it, recursively, in sorted order.

Packing. Documents are concatenated, each followed by the separator `<|endoftext|>` (the tokenizer's first
EOS id if it has no such token). The stream is cut into blocks of `block_size + 1` tokens that overlap by
one: block i holds stream tokens [i*T, i*T + T], its inputs are the first T and its targets the last T.
So every token but the stream's first is a target exactly once; the tail that does not fill a block is
dropped. Attention is not reset at document boundaries (as in GPT-2 style pretraining): a token may see
the end of the previous document, after the separator. A target is scored when its mask bit is set: always
for text; for chat, inside assistant spans only (the separator after a chat is not learned).

Cache. Each file's tokens are stored as a raw little-endian uint32 array (`<key>.tokens.u32`, read back
with `np.memmap`) with, for chat files, a uint8 mask beside it (`<key>.mask.u8`) and a JSON description
(`<key>.json`) written last, which marks the entry complete. Every file is written to a temporary name and
renamed into place. The key is a SHA-256 of the file's bytes, the tokenizer's files, the format and the
separator id, so editing any of them re-tokenizes and nothing stale is ever read.

Held-out data is either separate files (`eval_paths`) or, with `eval_fraction` f, the last
round(f * n) tokens of each file of n tokens (deterministic; the rest of each file is training data).

Bits per byte. `scored_bytes` counts the UTF-8 bytes of the text the scored targets decode to: each maximal
run of consecutive scored targets is decoded with special tokens skipped (`<|endoftext|>` and `<|im_end|>`
are separators, not text, so they add no bytes, though their nats count). bpb is then
(sum of nats over scored targets) / ln 2 / (those bytes); see `bits_per_byte`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..files import atomic_path, write_text_atomic
from ..hub import TOKENIZER_FILES, resolve_source

CACHE_VERSION = 2
IGNORE_INDEX = -100
DATA_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_FINGERPRINT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_ENCODE_PIECE_CHARS = 1 << 20  # long documents are encoded in pieces of about this many characters


class TrainError(ValueError):
    """A user error in the training inputs or options: bad data, a bad flag, a mismatched resume.

    The message is one line and names the file, line or option at fault."""


# ---------------------------------------------------------------------------------------------------
# Finding and reading files
# ---------------------------------------------------------------------------------------------------


def find_data_files(paths: Sequence[str | os.PathLike], what: str = "--data") -> list[Path]:
    """Expand files and folders (every *.txt / *.jsonl below, sorted) into a list of files, in order."""
    if not paths:
        raise TrainError(f"{what}: no data given")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not found:
                raise TrainError(f"{what}: no data files (*.txt, *.jsonl) found in {path}")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise TrainError(f"{what}: {path} is neither a .txt nor a .jsonl file")
            files.append(path)
        else:
            raise TrainError(f"{what}: {path}: no such file or directory")
    return files


def _read_text(path: Path) -> tuple[bytes, str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TrainError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: not valid UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise TrainError(f"{path}: empty file")
    return raw, text


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any], int]]:
    """Yield (line number, record, characters of the line) for every non-blank line.

    Lines end at "\\n" only ("\\r\\n" too, as JSON ignores the "\\r"): `str.splitlines` would also split at
    U+2028, U+0085 and other characters that JSON allows raw inside a string."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            where = f"{e.msg.removesuffix(' at')} at column {e.colno}"  # "Unterminated string starting at"
            raise TrainError(f"{path}:{number}: not valid JSON ({where})") from e
        if not isinstance(record, dict):
            raise TrainError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        yield number, record, len(line) + 1


def detect_format(path: Path, text: str) -> str:
    """'text' for .txt and for .jsonl records with "text"; 'chat' for .jsonl records with "messages"."""
    if path.suffix == ".txt":
        return "text"
    for number, record, _ in _jsonl_records(path, text):
        if "messages" in record:
            return "chat"
        if "text" in record:
            return "text"
        raise TrainError(f"{path}:{number}: expected a 'text' or a 'messages' field, found {sorted(record)}")
    raise TrainError(f"{path}: empty file")


def split_for_encoding(text: str, piece_chars: int = _ENCODE_PIECE_CHARS) -> list[str]:
    """Cut a long text into pieces at line starts ("\\n" followed by a non-space), where Qwen's (and GPT-2's)
    pre-tokenizer always splits, so encoding the pieces one by one gives the ids of the whole."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        match = re.compile(r"\n(?=\S)").search(text, start + piece_chars)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


# ---------------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(source: str | os.PathLike) -> str:
    """SHA-256 over the tokenizer's files (vocabulary, merges, special tokens, chat template)."""
    directory = resolve_source(source, TOKENIZER_FILES)
    digest = hashlib.sha256()
    for name in TOKENIZER_FINGERPRINT_FILES:
        path = directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def separator_id(tokenizer: Any) -> int:
    """The token put after every document: <|endoftext|>, else the tokenizer's first EOS."""
    token_id = tokenizer.token_to_id("<|endoftext|>")
    if token_id is None:
        if not tokenizer.eos_token_ids:
            raise TrainError("tokenizer: has neither <|endoftext|> nor an EOS token to separate documents")
        token_id = tokenizer.eos_token_ids[0]
    return int(token_id)


def assistant_mask(ids: Sequence[int], tokenizer: Any) -> np.ndarray:
    """1 for the tokens of each assistant turn's content through its <|im_end|>, 0 elsewhere (uint8)."""
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    if im_start is None or im_end is None:
        raise TrainError("tokenizer: chat data needs the <|im_start|> and <|im_end|> tokens")
    role = tokenizer.encode("assistant")
    newline = tokenizer.encode("\n")
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    ends = np.flatnonzero(ids == im_end)
    for start in np.flatnonzero(ids == im_start):
        if start > 0 and ids[max(0, start - 1 - len(newline)) : start].tolist() != [im_end, *newline]:
            continue  # the template opens every turn at the start or after "<|im_end|>\n"; not a header
        header_end = start + 1 + len(role)
        if ids[start + 1 : header_end].tolist() != role:
            continue
        if ids[header_end : header_end + len(newline)].tolist() == newline:
            header_end += len(newline)
        later = ends[ends >= header_end]
        stop = int(later[0]) + 1 if len(later) else len(ids)
        mask[header_end:stop] = 1
    return mask


@dataclass(frozen=True)
class TokenizedFile:
    """One data file in the cache: tokens (uint32 memmap), mask (uint8 memmap, chat only), description."""

    path: Path
    key: str
    format: str
    tokens: np.ndarray
    mask: np.ndarray | None
    num_documents: int
    max_token_id: int


def _cache_key(raw: bytes, fmt: str, tokenizer_hash: str, sep: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"qwen3-train-cache v{CACHE_VERSION}\0{fmt}\0{tokenizer_hash}\0{sep}\0".encode())
    digest.update(raw)
    return digest.hexdigest()[:32]


def _encode_documents(
    path: Path, fmt: str, text: str, tokenizer: Any, progress: Callable[[int], None]
) -> Iterator[tuple[list[int], np.ndarray | None]]:
    """Yield (ids, mask) per document of one file; `progress(n)` is told about characters consumed."""
    if path.suffix == ".txt":
        for piece in split_for_encoding(text):
            yield tokenizer.encode(piece), None
            progress(len(piece))
        return
    field, other = ("messages", "text") if fmt == "chat" else ("text", "messages")
    first = None
    for number, record, length in _jsonl_records(path, text):
        first = first or number
        if field not in record and other in record:
            raise TrainError(
                f"{path}:{number}: a '{other}' record, but line {first} is a '{field}' record; "
                f"a .jsonl file holds one kind (all 'text' or all 'messages')"
            )
        value = record.get(field)
        if fmt == "text":
            if not isinstance(value, str):
                raise TrainError(f"{path}:{number}: expected a string 'text' field, found {value!r:.60}")
            yield tokenizer.encode(value), None
        else:
            if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
                raise TrainError(f"{path}:{number}: 'messages' must be a list of objects")
            try:
                rendered = tokenizer.apply_chat_template(value, tools=record.get("tools"), add_generation_prompt=False)
            except Exception as e:  # the template raises jinja2 errors on a bad conversation
                raise TrainError(f"{path}:{number}: cannot render the chat template ({e})") from e
            ids = tokenizer.encode(rendered, allow_special=True)
            yield ids, assistant_mask(ids, tokenizer)
        progress(length)


def _open_atomic(stack: ExitStack, target: Path) -> BinaryIO:
    """`target` open for writing under a temporary name; renamed into place if `stack` closes without error."""
    return stack.enter_context(open(stack.enter_context(atomic_path(target)), "wb"))


def _open_cached(path: Path, key: str, cache_dir: Path) -> TokenizedFile | None:
    meta_path = cache_dir / f"{key}.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    n = meta["num_tokens"]
    tokens = np.memmap(cache_dir / f"{key}.tokens.u32", dtype="<u4", mode="r", shape=(n,))
    mask = np.memmap(cache_dir / f"{key}.mask.u8", dtype=np.uint8, mode="r", shape=(n,)) if meta["mask"] else None
    return TokenizedFile(path, key, meta["format"], tokens, mask, meta["num_documents"], meta["max_token_id"])


def tokenize_files(
    files: Sequence[Path],
    tokenizer: Any,
    tokenizer_hash: str,
    cache_dir: str | os.PathLike,
    show_progress: bool = True,
) -> list[TokenizedFile]:
    """Tokenize every file not yet in `cache_dir` (with a tqdm bar) and return all of them as memmaps.

    Files are read twice when not cached (once to hash, once to tokenize) so that only one is in memory."""
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    sep = separator_id(tokenizer)
    loaded: list[TokenizedFile | None] = []
    pending: list[tuple[int, Path, str, str, int]] = []
    for path in files:
        raw, text = _read_text(path)
        fmt = detect_format(path, text)
        key = _cache_key(raw, fmt, tokenizer_hash, sep)
        cached = _open_cached(path, key, cache_dir)
        if cached is None:
            pending.append((len(loaded), path, fmt, key, len(text)))
        loaded.append(cached)
        del raw, text
    if pending:
        cache_dir.mkdir(parents=True, exist_ok=True)
        total = sum(chars for *_, chars in pending)
        with tqdm(total=total, desc="tokenize", unit="char", unit_scale=True, disable=not show_progress) as bar:
            for index, path, fmt, key, _ in pending:
                text = _read_text(path)[1]
                loaded[index] = _tokenize_one(path, fmt, key, text, tokenizer, sep, cache_dir, bar.update)
    return [f for f in loaded if f is not None]


def _tokenize_one(
    path: Path,
    fmt: str,
    key: str,
    text: str,
    tokenizer: Any,
    sep: int,
    cache_dir: Path,
    progress: Callable[[int], None],
) -> TokenizedFile:
    chat = fmt == "chat"
    num_tokens = num_documents = learned = 0
    max_token_id = sep
    # Both files are renamed into place only if the whole file tokenizes; the JSON written after them
    # marks the entry complete.
    with ExitStack() as stack:
        tokens_out = _open_atomic(stack, cache_dir / f"{key}.tokens.u32")
        mask_out = _open_atomic(stack, cache_dir / f"{key}.mask.u8") if chat else None
        for ids, mask in _encode_documents(path, fmt, text, tokenizer, progress):
            max_token_id = max(max_token_id, max(ids, default=0))
            if path.suffix == ".txt":  # pieces of one document: the separator comes once, at the end
                tokens_out.write(np.asarray(ids, dtype="<u4").tobytes())
                num_tokens += len(ids)
                continue
            tokens_out.write(np.asarray([*ids, sep], dtype="<u4").tobytes())
            if mask_out is not None:
                mask_out.write(np.append(mask, np.uint8(0)).tobytes())
                learned += int(mask.sum())
            num_tokens += len(ids) + 1
            num_documents += 1
        if path.suffix == ".txt":
            tokens_out.write(np.asarray([sep], dtype="<u4").tobytes())
            num_tokens += 1
            num_documents = 1
        if chat and learned == 0:
            raise TrainError(f"{path}: no assistant turns to train on (the loss covers assistant tokens only)")
    meta = {
        "version": CACHE_VERSION,
        "source": str(path),
        "format": fmt,
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "mask": chat,
        "separator_id": sep,
        "max_token_id": max_token_id,
    }
    write_text_atomic(cache_dir / f"{key}.json", json.dumps(meta, indent=2) + "\n")
    cached = _open_cached(path, key, cache_dir)
    assert cached is not None
    return cached


# ---------------------------------------------------------------------------------------------------
# Streams, blocks and sample order
# ---------------------------------------------------------------------------------------------------


class TokenStream:
    """Several token arrays (memmap slices, never copied) read as one: `read(a, b)` -> ids, mask."""

    def __init__(self, segments: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> None:
        self.segments = [(t, m) for t, m in segments if len(t)]
        self.offsets = np.cumsum([0] + [len(t) for t, _ in self.segments])
        self.has_mask = any(m is not None for _, m in self.segments)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens [start, stop) as int64 and their learn mask as bool."""
        ids, mask = [], []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(first, len(self.segments)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            tokens, learn = self.segments[i]
            ids.append(np.asarray(tokens[a:b], dtype=np.int64))
            mask.append(np.ones(b - a, dtype=bool) if learn is None else np.asarray(learn[a:b]).astype(bool))
        return np.concatenate(ids), np.concatenate(mask)


class PackedBlocks:
    """Fixed-length training examples over a stream: block i is stream tokens [i*T, i*T + T] (module doc)."""

    def __init__(self, stream: TokenStream, block_size: int) -> None:
        self.stream, self.block_size = stream, block_size
        self.num_blocks = (len(stream) - 1) // block_size

    def __len__(self) -> int:
        return self.num_blocks

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(T + 1 token ids, T + 1 learn bits) of block `index`; targets are ids[1:] where bits[1:]."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} of {self.num_blocks}")
        start = index * self.block_size
        return self.stream.read(start, start + self.block_size + 1)

    def batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (b, T) and targets (b, T) as int64, targets IGNORE_INDEX where not learned.

        Index -1 is padding: a block of zeros with no target (keeps every process's batch the same shape)."""
        inputs, targets = [], []
        for index in indices:
            if index < 0:
                inputs.append(np.zeros(self.block_size, dtype=np.int64))
                targets.append(np.full(self.block_size, IGNORE_INDEX, dtype=np.int64))
                continue
            ids, learn = self.example(index)
            inputs.append(ids[:-1])
            targets.append(np.where(learn[1:], ids[1:], IGNORE_INDEX))
        return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))

    def scored(self, indices: Iterable[int]) -> int:
        """How many targets of these blocks are learned (the loss's denominator)."""
        if not self.stream.has_mask:
            return sum(self.block_size for i in indices if i >= 0)
        return sum(int(self.example(i)[1][1:].sum()) for i in indices if i >= 0)


class SampleOrder:
    """Global sample number g -> block: epoch g // n walks a permutation of the n blocks seeded by
    (seed, epoch). A pure function of g, so a resumed run continues with exactly the same blocks."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks, self.seed = num_blocks, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, sample: int) -> int:
        epoch, position = divmod(sample, self.num_blocks)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            self._epoch = epoch
        return int(self._perm[position])


# ---------------------------------------------------------------------------------------------------
# The whole data set
# ---------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Train and held-out streams, and what identifies them (for the resume check)."""

    train: TokenStream
    eval: TokenStream | None
    files: list[TokenizedFile]
    eval_files: list[TokenizedFile]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"train": [f.key for f in self.files], "eval": [f.key for f in self.eval_files]}

    @property
    def max_token_id(self) -> int:
        return max(f.max_token_id for f in [*self.files, *self.eval_files])


def load_dataset(
    data: Sequence[str | os.PathLike],
    tokenizer: Any,
    tokenizer_hash: str,
    cache_dir: str | os.PathLike,
    block_size: int,
    eval_data: Sequence[str | os.PathLike] = (),
    eval_fraction: float = 0.0,
    show_progress: bool = True,
) -> Dataset:
    """Find, tokenize (cached), split and check the data; every problem is a TrainError."""
    files = tokenize_files(find_data_files(data), tokenizer, tokenizer_hash, cache_dir, show_progress)
    eval_files: list[TokenizedFile] = []
    eval_stream = None
    if eval_data:
        eval_files = tokenize_files(
            find_data_files(eval_data, "--eval-data"), tokenizer, tokenizer_hash, cache_dir, show_progress
        )
        train_stream = TokenStream([(f.tokens, f.mask) for f in files])
        eval_stream = TokenStream([(f.tokens, f.mask) for f in eval_files])
    elif eval_fraction > 0:
        train_parts, eval_parts = [], []
        for f in files:
            cut = len(f.tokens) - round(eval_fraction * len(f.tokens))
            train_parts.append((f.tokens[:cut], None if f.mask is None else f.mask[:cut]))
            eval_parts.append((f.tokens[cut:], None if f.mask is None else f.mask[cut:]))
        train_stream, eval_stream = TokenStream(train_parts), TokenStream(eval_parts)
    else:
        train_stream = TokenStream([(f.tokens, f.mask) for f in files])

    need = block_size + 1
    if len(train_stream) < need:
        names = ", ".join(str(f.path) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise TrainError(
            f"--data: {names} give {len(train_stream)} training tokens; one block needs block_size + 1 = {need}"
        )
    if eval_stream is not None and len(eval_stream) < need:
        source = "--eval-data" if eval_data else f"--eval-fraction {eval_fraction}"
        raise TrainError(f"{source}: the held-out set has {len(eval_stream)} tokens; one block needs {need}")
    return Dataset(train_stream, eval_stream, files, eval_files)


def scored_bytes(blocks: PackedBlocks, num_blocks: int, decode: Callable[[list[int]], str]) -> int:
    """UTF-8 bytes of the text that the scored targets of the first `num_blocks` blocks decode to.

    The targets of consecutive blocks are consecutive stream tokens [1, num_blocks*T + 1), so runs of
    scored targets are decoded whole (a character split across blocks is counted once). `decode` must skip
    special tokens (see the module docstring)."""
    if num_blocks <= 0:
        return 0
    ids, learn = blocks.stream.read(1, num_blocks * blocks.block_size + 1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], learn.astype(np.int8), [0]])))
    total = 0
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        total += len(decode(ids[start:stop].tolist()).encode("utf-8"))
    return total


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """bpb = total nats / ln 2 / total bytes: the model's code length for the text, per UTF-8 byte."""
    return total_nats / math.log(2) / total_bytes if total_bytes else float("nan")
