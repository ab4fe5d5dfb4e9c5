"""Resolve a model source (a local directory or a Hugging Face Hub repo id) to a local directory.

Downloads go through `huggingface_hub.snapshot_download`, so the HF cache, `HF_HOME` and
`HF_HUB_OFFLINE=1` behave exactly as they do for transformers. Only the files a caller names are fetched.

Local or Hub: "owner/name" is a Hub id unless it reads as a path: a `Path` object, a leading `.`, `/` or `~`,
a trailing slash, or a first component that is a local directory (`runs/final` with `runs/` present). A
missing local path is "no such model directory", never a Hub lookup.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .files import atomic_path

# What `load_tokenizer` reads from a model directory (chat_template.jinja: where newer transformers save the
# template), plus the generation defaults: the files fetched for a tokenizer and copied beside new weights.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
# What `load_model` needs from a snapshot; nothing else is downloaded.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]

# The project's own small Qwen3 trained on Shakespeare, shipped inside the package (scripts/demo/).
DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "demo"

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelNotFoundError(FileNotFoundError):
    """The source is neither a local directory nor a Hub repo that can be fetched now."""


def looks_local(source: str | os.PathLike) -> bool:
    """True when `source` can only mean a local path (see the module docstring), whether or not it exists."""
    if not isinstance(source, str):
        return True
    if source.startswith((".", "/", "~")) or source.endswith(("/", os.sep)) or not REPO_ID.fullmatch(source):
        return True
    return Path(source.split("/")[0]).is_dir()


def resolve_source(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory for `source`: "demo" (the shipped demo model), a directory, or a (possibly
    cached) Hub snapshot. A local folder that happens to be called demo is reached as ./demo."""
    if isinstance(source, str) and source == DEMO_NAME:
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelNotFoundError(f"the demo model is not installed in {DEMO_DIR}")
        return DEMO_DIR
    text = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{text} is a file; expected a model directory or a Hub repo id")
    if looks_local(source):
        hint = " (the shipped demo model is --model demo)" if text.rstrip("/" + os.sep) == DEMO_NAME else ""
        raise ModelNotFoundError(f"no such model directory: {text}{hint}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {text}: offline or the Hub is unreachable, and it is not in the HF cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); pass a local directory instead"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{text}: no such local directory, and no such repo on the Hugging Face Hub (or it is gated)"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"cannot download {text}: {e.__class__.__name__}: {e}") from e


def copy_tokenizer_files(source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the TOKENIZER_FILES that `source_dir` has into `out_dir` (each written atomically, a file onto
    itself skipped), so that the model written there loads with its tokenizer; returns the names copied."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        source, target = source_dir / name, out_dir / name
        if not source.is_file():
            continue
        if not target.exists() or not source.samefile(target):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        copied.append(name)
    return copied


# Files a model directory may hold (weights, configs, tokenizer): what --overwrite may replace.
CHECKPOINT_FILES = [*MODEL_FILES, *TOKENIZER_FILES, "model-*-of-*.safetensors"]


@contextmanager
def new_model_directory(
    out: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out` to write a model into; when the block succeeds it is
    renamed to `out`, so `out` holds the old model or the new one, never a mix (a failed block removes it).

    Refused before anything is written (ValueError): `out` is the `source` directory; `out` exists and is not an
    empty directory, unless `overwrite`; with `overwrite`, `out` holds anything but model files (it is replaced
    whole, so nothing else may be lost with it)."""
    out = Path(out)
    if source is not None and out.exists() and Path(source).exists() and out.resolve() == Path(source).resolve():
        raise ValueError(f"--out {out}: that is the model being read; write the new model to another directory")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out}: exists and is a file")
        entries = list(out.iterdir())
        if entries and not overwrite:
            raise ValueError(f"--out {out}: exists and is not empty; pass --overwrite to replace the model there")
        foreign = [p.name for p in entries if p.is_dir() or not any(p.match(g) for g in CHECKPOINT_FILES)]
        if foreign:
            raise ValueError(f"--out {out}: holds {foreign[0]!r}, not a model file; not replacing that directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # 0o777 less the umask, like any new directory (not mkdtemp's private 0o700)
    old = out.with_name(f"{tmp.name}.old")
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
