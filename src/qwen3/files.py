"""Atomic file writes, the one writer for the whole project.

`atomic_path(target)` yields a temporary path beside `target` (same directory, so the final rename
is atomic) and renames it onto `target` only if the block succeeds; otherwise it removes it. The
temporary file is created before the block with mode 0o666 filtered by the process umask, exactly as
a plain `open(target, "w")` would create it (not mkstemp's private 0o600, not a fixed 0o644), and the
file gets that mode back before the rename: `safetensors.save_file` replaces the path with its own
private temporary file, so reopening alone would not keep it.
Its contents are flushed to disk (fsync) before the rename, so a crash leaves the old file or the new
one, never a truncated one.

The temporary name ends in `.tmp`, not in the target's suffix: a tool that picks a format from the
suffix (matplotlib's `savefig`) must be told the format explicitly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh empty file beside `target` to write; rename it onto `target` if the block succeeds."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # O_EXCL: never write through a file or link that already exists; 0o666 & ~umask, like open()
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
