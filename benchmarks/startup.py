"""Time from `qwen3 chat` starting to its first answer token, as a person sees it (process start to the first
byte of the answer), and the same for `qwen3 generate`.

    python benchmarks/startup.py [--model DIR]      # default: random-init Qwen3-0.6B with the real tokenizer
    python benchmarks/startup.py --compile          # also `qwen3 chat --compile`, cold then warm
    python benchmarks/startup.py --compile --py-spy spy.txt   # and a third, warm start under py-spy

On CUDA both commands decode with the engine (graph capture included in the start-up). With --compile, `qwen3 chat
--compile` runs twice over one fresh pair of compile caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR): the
first start compiles from nothing, the second finds what the first compiled (issue #13: the first token within
15 s of start). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qwen3

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "qwen3-0.6b"


def first_answer_byte(command: list[str], stdin_text: str, after: bytes, env: dict | None = None
                      ) -> tuple[float, float, str]:  # fmt: skip
    """(seconds to the first byte printed after `after`, seconds to exit, the output) for one process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env)  # fmt: skip
    process.stdin.write(stdin_text.encode())
    process.stdin.close()
    output, first = b"", None
    while True:
        chunk = process.stdout.read1(4096)
        if not chunk:
            break
        output += chunk
        if first is None and after in output and len(output) > output.index(after) + len(after):
            first = time.perf_counter() - start
    process.wait()
    total = time.perf_counter() - start
    return (first if first is not None else float("nan")), total, output.decode(errors="replace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model directory with tokenizer files (default: random-init 0.6B)")
    p.add_argument("--compile", action="store_true", help="also `qwen3 chat --compile`, cold and warm caches")
    p.add_argument("--py-spy", type=Path, metavar="FILE",
                   help="with --compile: one more warm start under `py-spy record --subprocesses --idle -f raw`, "
                        "written to FILE (summarise: benchmarks/spy_summary.py FILE)")  # fmt: skip
    args = p.parse_args()
    if args.py_spy and not args.compile:
        p.error("--py-spy records a warm `qwen3 chat --compile` start: it needs --compile")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            m = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config.from_preset("0.6B")).to(torch.bfloat16)
            m.init_weights()
            qwen3.save_model(m, tmp)
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                shutil.copy(ASSETS / name, Path(tmp) / name)
            model = tmp
        cli = [sys.executable, "-m", "qwen3.cli"]
        env_note = f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
        rows = []

        def add(label: str, first: float, total: float) -> None:  # printed at once: a timed-out run keeps its rows
            rows.append((label, first, total))
            print(f"RESULT {label}: {first:.2f} s to first, {total:.2f} s in all", flush=True)

        chat = [*cli, "chat", "--model", model, "--max-new-tokens", "32", "--temperature", "0"]
        first, total, out = first_answer_byte(chat, "Hello, who are you?\n", after=b"> ")
        add("qwen3 chat: start to first answer byte", first, total)
        if args.compile:
            caches = Path(tmp) / "caches"
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
                   "TRITON_CACHE_DIR": str(caches / "triton")}  # fmt: skip
            for label in ("cold caches", "warm caches"):
                first_c, total_c, out_c = first_answer_byte([*chat, "--compile"], "Hello, who are you?\n", b"> ", env)
                add(f"qwen3 chat --compile, {label}: start to first answer byte", first_c, total_c)
            if args.py_spy:  # where a warm start goes (py-spy's sampling slows it a little)
                spy = ["py-spy", "record", "-r", "100", "--subprocesses", "--idle", "--format", "raw", "-o",
                       str(args.py_spy), "--"]  # fmt: skip
                first_s, total_s, _ = first_answer_byte([*spy, *chat, "--compile"], "Hello, who are you?\n",
                                                        b"\n> ", env)  # not "py-spy> ", which py-spy prints
                add("qwen3 chat --compile, warm caches, under py-spy: start to first answer byte", first_s, total_s)
            out += "\n--- chat --compile, warm (tail) ---\n" + out_c[-400:]
        gen = [*cli, "generate", "--model", model, "--max-new-tokens", "32", "--temperature", "0", "ROMEO:"]
        first_g, total_g, out_g = first_answer_byte(gen, "", after=b"")
        add("qwen3 generate: start to first output byte", first_g, total_g)
        print(f"start-up ({env_note}); model: {'random-init Qwen3-0.6B, bf16' if args.model is None else model}")
        print("| command | first token (s) | whole run (s) |\n|---|---|---|")
        for label, a, b in rows:
            print(f"| {label} | {a:.2f} | {b:.2f} |")
        print("--- chat output (tail) ---\n" + out[-600:])
        print("--- generate output (tail) ---\n" + out_g[-300:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
