"""Train the demo Qwen3 model's tokenizer: byte-level BPE on the training plays, laid out like a Qwen3 snapshot.

The pipeline is Qwen2/Qwen3's, component for component (`tokenizer.json` of Qwen/Qwen3-0.6B): NFC
normalizer, a Split pre-tokenizer on Qwen's regex (single digits, contractions, a leading space or
punctuation mark attached to a word) followed by the byte-level mapping, BPE with no unknown token, and a
byte-level decoder. Byte-level means every string encodes, and decoding gives back its NFC form exactly.
NFC is kept because transformers' `Qwen2Tokenizer` (named in `tokenizer_config.json`, as in Qwen3)
rebuilds this same pipeline from the vocabulary and merges, normalizer included; a tokenizer without it
would encode non-NFC text differently under transformers. The corpus is ASCII, so NFC never fires on it.

Vocabulary: `vocab_size` ids in all (default 4096, a multiple of 64 for the embedding), the last ones
being the added tokens, after the learned ones as in Qwen3: the control tokens <|endoftext|>,
<|im_start|>, <|im_end|> (special: dropped by `skip_special_tokens`), then <tool_call>, </tool_call>,
<tool_response>, </tool_response>, <think>, </think> (added but not special, as in Qwen3, so they
survive `skip_special_tokens`; <tool_response> is there because the chat template writes it). Only the
training plays are seen (`<data-dir>/train/*.txt`, read in sorted order; tokenizers' BPE trainer is
deterministic, so reruns give the same tokenizer.json).

Output directory (default `<data-dir>/tokenizer/`): `tokenizer.json`; `tokenizer_config.json` as in
Qwen3 but with eos_token <|endoftext|> (the demo is a base model) and Qwen3's official chat template,
copied from `tests/assets/qwen3-0.6b/tokenizer_config.json` (pinned by sha256); and
`generation_config.json` (eos [<|endoftext|>, <|im_end|>], sampling at temperature 0.8, top-k 50,
top-p 0.95). The script then checks that transformers' `AutoTokenizer` and this package's
`qwen3.load_tokenizer` load the directory and encode like the `tokenizers` library, and prints bytes per
token on the held-out plays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "shakespeare"
QWEN3_TOKENIZER_CONFIG = REPO_ROOT / "tests" / "assets" / "qwen3-0.6b" / "tokenizer_config.json"
QWEN3_CHAT_TEMPLATE_SHA256 = "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"

# Qwen2/Qwen3's pre-tokenizer regex, as in their tokenizer.json.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
NONSPECIAL_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MODEL_MAX_LENGTH = 1024
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def new_tokenizer() -> Tokenizer:
    """An empty byte-level BPE tokenizer with Qwen3's normalizer, pre-tokenizer, post-processor and decoder."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # The Python class takes no flags, so tokenizer.json shows the defaults where Qwen's shows False; decoding
    # is the byte map either way (no prefix space is stripped: tested).
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Learn BPE merges on `texts` so that, with the added tokens appended, there are `vocab_size` ids."""
    n_added = len(SPECIAL_TOKENS) + len(NONSPECIAL_ADDED_TOKENS)
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NONSPECIAL_ADDED_TOKENS])
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(f"trained {got} ids, wanted {vocab_size}: the corpus is too small for this vocabulary")
    return tokenizer


def read_chat_template(path: Path = QWEN3_TOKENIZER_CONFIG) -> str:
    """Qwen3's official chat template from a Qwen3 tokenizer_config.json, checked against the pinned hash."""
    template = json.loads(path.read_text(encoding="utf-8"))["chat_template"]
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()
    if digest != QWEN3_CHAT_TEMPLATE_SHA256:
        raise ValueError(f"{path}: chat template sha256 {digest} != pinned {QWEN3_CHAT_TEMPLATE_SHA256}")
    return template


def tokenizer_config(tokenizer: Tokenizer, chat_template: str, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json in Qwen3's layout, with <|endoftext|> as both eos and pad."""
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    endoftext, im_end = tokenizer.token_to_id(ENDOFTEXT), tokenizer.token_to_id(IM_END)
    return {"eos_token_id": [endoftext, im_end], "pad_token_id": endoftext, **GENERATION_DEFAULTS}


def save_tokenizer_dir(
    tokenizer: Tokenizer, out_dir: Path, chat_template: str, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    for name, content in (
        ("tokenizer_config.json", tokenizer_config(tokenizer, chat_template, model_max_length)),
        ("generation_config.json", generation_config(tokenizer)),
    ):
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts`, each encoded whole."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return n_bytes / n_tokens


def verify_directory(out_dir: Path, samples: Sequence[str]) -> list[str]:
    """Load `out_dir` with transformers' AutoTokenizer and with qwen3.load_tokenizer and check they encode and
    decode `samples` (and a rendered chat) as the `tokenizers` library does; returns what was checked."""
    from transformers import AutoTokenizer

    import qwen3

    reference = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(out_dir)
    ours = qwen3.load_tokenizer(out_dir)
    if len(hf) != reference.get_vocab_size(with_added_tokens=True) or hf.eos_token != ENDOFTEXT:
        raise AssertionError(f"transformers sees {len(hf)} ids and eos {hf.eos_token!r}")
    messages = [{"role": "user", "content": "Speak the speech, I pray you."}, {"role": "assistant", "content": "Ay."}]
    chat = hf.apply_chat_template(messages, tokenize=False)
    if chat != ours.apply_chat_template(messages, add_generation_prompt=False):
        raise AssertionError("qwen3's chat template renders differently from transformers'")
    for text in [*samples, chat]:
        ids = reference.encode(text, add_special_tokens=False).ids
        hf_ids = hf.encode(text, add_special_tokens=False, verbose=False)
        if hf_ids != ids or ours.encode(text, allow_special=True) != ids:
            raise AssertionError(f"encodings differ on {text[:60]!r}")
        if hf.decode(ids) != reference.decode(ids, skip_special_tokens=False):
            raise AssertionError(f"decodings differ on {text[:60]!r}")
    return [f"{len(samples) + 1} samples (held-out text, unicode, special tokens, a rendered chat)"]


def _read_dir(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {folder}; run scripts/demo/prepare_data.py first")
    return {p.stem: p.read_text(encoding="utf-8") for p in files}


def _verification_samples(heldout: Mapping[str, str]) -> list[str]:
    samples = [text[:20_000] for text in heldout.values()]
    samples += [
        "Hello, world! 你好 — naïve café, cafe\u0301 (not NFC), ﬁne “quotes” 123456 😀\n\n\tTabs and  double  spaces.",
        f"{IM_START}user\nTo be, or not to be?{IM_END}\n{IM_START}assistant\n<think>\n\n</think>\n\nAy.{ENDOFTEXT}",
        "<tool_call>\n{}\n</tool_call> <tool_response>x</tool_response>",
    ]
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="prepare_data.py's output")
    parser.add_argument("--out-dir", type=Path, help="default: <data-dir>/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="ids in all, added tokens included")
    parser.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    parser.add_argument("--no-verify", action="store_true", help="skip the transformers / qwen3 loading check")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or args.data_dir / "tokenizer"

    train, heldout = _read_dir(args.data_dir / "train"), _read_dir(args.data_dir / "heldout")
    tokenizer = train_tokenizer(train.values(), args.vocab_size)
    save_tokenizer_dir(tokenizer, out_dir, read_chat_template(), args.model_max_length)
    ids = {t: tokenizer.token_to_id(t) for t in (*SPECIAL_TOKENS, *NONSPECIAL_ADDED_TOKENS)}
    print(f"trained on {len(train)} works; {tokenizer.get_vocab_size(with_added_tokens=True)} ids; wrote {out_dir}")
    print("added tokens:", ", ".join(f"{t} {i}" for t, i in ids.items()))
    if not args.no_verify:
        for line in verify_directory(out_dir, _verification_samples(heldout)):
            print("verified: transformers AutoTokenizer and qwen3.load_tokenizer match tokenizers on", line)
    print("bytes per token:")
    for work, text in heldout.items():
        print(f"  heldout/{work + '.txt':22s} {bytes_per_token(tokenizer, [text]):.3f}")
    print(f"  {'all held-out':30s} {bytes_per_token(tokenizer, heldout.values()):.3f}")
    print(f"  {'all training':30s} {bytes_per_token(tokenizer, train.values()):.3f}")


if __name__ == "__main__":
    main()
