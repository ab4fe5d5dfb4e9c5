"""Carry torch.compile's caches from one device call to the next: the H200 calls are short and a compiled engine
spends 100-330 s of one compiling from nothing (benchmarks/NOTES.md), while a warm inductor cache skips the code
generation and the Triton compiles.

The cache of one call (inductor's FX graphs and kernels, Triton's binaries: 50-80 MB) is larger than one file the
device tool brings back (16 MiB), so it travels gzipped in parts:

    python benchmarks/compile_cache.py pack .compile_cache OUT    # on the device: OUT/compile_cache.tgz.000, .001, ...
    python benchmarks/compile_cache.py join PARTS... .compile_cache.tgz    # here: the parts back into one archive
    python benchmarks/compile_cache.py unpack .compile_cache.tgz .  # on the device, before the runs

benchmarks/h200_engine.sh packs at its end and unpacks at its start; name `.compile_cache.tgz` in the call's carry
(beside `.whl`). A cache from other sources or another torch is simply not hit: nothing is trusted but the
compiler's own keys.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

PART_BYTES = 15 * 2**20  # under the device tool's 16 MiB per file
MAX_PARTS = 3  # with the wheels (~13 MB), well inside the 64 MiB a call may carry


def pack(cache: Path, out: Path) -> int:
    archive = out / "compile_cache.tgz"
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(cache, arcname=cache.name)
    size = archive.stat().st_size
    if size > PART_BYTES * MAX_PARTS:
        archive.unlink()
        print(f"compile cache: {size / 2**20:.0f} MiB gzipped, over {MAX_PARTS} parts of 15 MiB: not kept")
        return 0
    with archive.open("rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            (out / f"compile_cache.tgz.{i:03d}").write_bytes(chunk)
    archive.unlink()
    print(f"compile cache: {size / 2**20:.1f} MiB gzipped, in {-(-size // PART_BYTES)} part(s)")
    return 0


def join(parts: list[Path], archive: Path) -> int:
    parts = sorted(parts)
    tmp = archive.with_name(archive.name + ".tmp")
    with tmp.open("wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    os.replace(tmp, archive)
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB from {len(parts)} part(s)")
    return 0


def unpack(archive: Path, into: Path) -> int:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(into, filter="data")  # no absolute paths, no links out of `into`
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack")
    a.add_argument("cache", type=Path)
    a.add_argument("out", type=Path)
    a = sub.add_parser("join")
    a.add_argument("parts", type=Path, nargs="+")
    a.add_argument("archive", type=Path)
    a = sub.add_parser("unpack")
    a.add_argument("archive", type=Path)
    a.add_argument("into", type=Path)
    args = p.parse_args()
    if args.verb == "pack":
        return pack(args.cache, args.out)
    if args.verb == "join":
        return join(args.parts, args.archive)
    return unpack(args.archive, args.into)


if __name__ == "__main__":
    sys.exit(main())
