"""Peak resident memory for loading the Qwen3-0.6B shape in bf16: qwen3.load_model versus transformers.

Writes a random-weight 0.6B checkpoint (bf16, tied, 1.19 GB) once, then loads it in fresh child
processes, one per loader, and reads each child's peak RSS (VmHWM, Linux). The baseline is a child that
only imports torch and the loader's package, so the table also shows the memory the load itself added.

    python benchmarks/load_memory.py [--dir /tmp/qwen3-0.6b-random]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch

def high_water_kb():  # VmHWM: this process's peak RSS (unlike ru_maxrss, not inherited across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

which, directory = sys.argv[1], sys.argv[2]
if which == "qwen3":
    import qwen3
    load = lambda: qwen3.load_model(directory, dtype=torch.bfloat16)
else:
    from transformers import Qwen3ForCausalLM
    load = lambda: Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
base = high_water_kb()
t = time.perf_counter()
model = load()
seconds = time.perf_counter() - t
# safetensors maps the file; read every weight once so that all of it is resident, as after a forward.
checksum = sum(float(p.sum()) for p in model.parameters())
peak = high_water_kb()
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"base_kb": base, "peak_kb": peak, "weights_bytes": weights, "seconds": seconds}))
"""


def make_checkpoint(directory: Path) -> None:
    import torch

    import qwen3

    if (directory / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config.from_preset("0.6B")).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    qwen3.save_model(model, directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qwen3-0.6b-random-bf16"))
    args = parser.parse_args()
    make_checkpoint(args.dir)
    rows = {}
    for which in ("qwen3", "transformers"):
        out = subprocess.run([sys.executable, "-c", CHILD, which, str(args.dir)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"{'loader':<14}{'peak RSS GiB':>14}{'added GiB':>12}{'weights GiB':>13}{'load s':>9}")
    for which, r in rows.items():
        added = (r["peak_kb"] - r["base_kb"]) * 1024 / gib
        peak, weights = r["peak_kb"] * 1024 / gib, r["weights_bytes"] / gib
        print(f"{which:<14}{peak:>14.2f}{added:>12.2f}{weights:>13.2f}{r['seconds']:>9.2f}")
    ratio = rows["qwen3"]["peak_kb"] / rows["transformers"]["peak_kb"]
    print(f"qwen3 / transformers peak RSS: {ratio:.2f}")


if __name__ == "__main__":
    main()
