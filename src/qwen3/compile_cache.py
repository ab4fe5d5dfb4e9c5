"""Where `torch.compile` keeps what it compiles, for the CLI's `--compile`.

Inductor caches compiled graphs and kernels on disk, and a later start on the same machine loads them instead of
compiling again: on the H200, `qwen3 chat --compile` printed its first answer 41 s after start with warm caches and
181 s from nothing (benchmarks/RESULTS.md). Inductor's default directory lies in the system's temporary directory
(/tmp/torchinductor_<user>), which many systems empty at every reboot. The CLI moves it to the user's cache
directory, as vLLM does with its own compile cache: `$XDG_CACHE_HOME/qwen3/torchinductor`, by default
`~/.cache/qwen3/torchinductor`. The Triton kernels that inductor compiles go under it too. A
TORCHINDUCTOR_CACHE_DIR set by the user is kept. If the directory cannot be created, torch's default stays.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # read by inductor at its first use of the cache, not at import


def persistent_compile_cache_dir(environ: MutableMapping[str, str]) -> Path:
    """`$XDG_CACHE_HOME/qwen3/torchinductor` (XDG_CACHE_HOME only if absolute, as the XDG spec says), else
    `$HOME/.cache/qwen3/torchinductor`."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path(environ.get("HOME") or os.path.expanduser("~")) / ".cache"
    return base / "qwen3" / "torchinductor"


def use_persistent_compile_cache(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Point inductor's cache (TORCHINDUCTOR_CACHE_DIR in `environ`, by default os.environ) at
    `persistent_compile_cache_dir` unless it is set already. Call it before the first compile; child processes
    (the server's engine, torchrun's ranks) inherit it. Returns the directory set, or None when nothing changed
    (the variable was set, or the directory could not be created)."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return None
    path = persistent_compile_cache_dir(environ)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home, a file in the way: torch's default under the temporary directory stays
        return None
    environ[CACHE_ENV] = str(path)
    return path
