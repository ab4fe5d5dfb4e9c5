"""Summarise a `py-spy record --subprocesses -f raw` file: samples per process, then each busy process's functions
by inclusive samples (the share of that process's samples in which the function was on the stack), then by self
samples (the share in which it was the innermost frame: where the time is spent).

    python benchmarks/spy_summary.py serve_spy.txt [--top 40] [--processes 3]

Each line of the raw format is `process A:"cmd";process B:"cmd";...;frame;frame;... COUNT`; the innermost
`process` entry names the process the stack belongs to (h200_engine.sh's serve-spy parts write such files). A file
recorded without `--subprocesses` (`benchmarks/engine_loop.py --py-spy`) is one process.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=40, help="functions per process (default 40)")
    p.add_argument("--processes", type=int, default=3, help="the busiest processes to detail (default 3)")
    args = p.parse_args()
    totals: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    innermost: dict[str, Counter[str]] = defaultdict(Counter)  # samples in which the frame was the running one
    names: dict[str, str] = {}
    for line in args.file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        last = max((i for i, part in enumerate(parts) if part.startswith("process ")), default=None)
        if last is None:  # recorded without --subprocesses: one process
            pid, last = "process", -1
            names[pid] = "the recorded process"
        else:
            first = last
            while not parts[last].endswith('"') and last + 1 < len(parts):  # a command line holding a ';'
                last += 1
            pid, _, command = ";".join(parts[first : last + 1]).partition(":")
            names[pid] = command.strip('"')[:120]
        totals[pid] += int(count)
        for frame in set(parts[last + 1 :]):
            inclusive[pid][frame] += int(count)
        if len(parts) > last + 1:
            innermost[pid][parts[-1]] += int(count)
    for pid, samples in totals.most_common():
        print(f"{samples:7d} samples  {pid}  {names[pid]}")
    for pid, samples in totals.most_common(args.processes):
        print(f"\n== {pid} ({names[pid]}): {samples} samples")
        for frame, n in inclusive[pid].most_common(args.top):
            print(f"{n:7d} {100 * n / samples:5.1f}%  {frame[:130]}")
        print(f"-- innermost frames (self time) of {pid}")
        for frame, n in innermost[pid].most_common(args.top):
            print(f"{n:7d} {100 * n / samples:5.1f}%  {frame[:130]}")


if __name__ == "__main__":
    main()
