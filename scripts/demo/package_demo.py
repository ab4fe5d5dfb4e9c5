"""Package a training run's final checkpoint as the demo model shipped in `src/qwen3/demo/`.

Writes the weights in bf16 as one `model.safetensors` (the package must stay small: 22 MB), the config,
the tokenizer files and generation config (so the folder is laid out like a Hub snapshot), and
`results.json` with the held-out figures, measured here with `text_bits_per_byte` on the held-out plays.

    python scripts/demo/package_demo.py --run out/demo --heldout data/shakespeare/heldout --out src/qwen3/demo
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

import qwen3

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@torch.no_grad()
def text_bits_per_byte(model, tokenizer, text: str, block_size: int = 512) -> float:
    """Bits per UTF-8 byte of `text` under the model: the text is encoded after one <|endoftext|> (the
    document separator used in training), cut into consecutive windows of `block_size` inputs, and every
    token after the separator is scored once, given the tokens before it in its window."""
    ids = torch.tensor([tokenizer.endoftext_id, *tokenizer.encode(text)])
    nats = 0.0
    for start in range(0, len(ids) - 1, block_size):
        window = ids[start : start + block_size + 1]
        logits = model(window[None, :-1]).float()[0]
        nats += F.cross_entropy(logits, window[1:], reduction="sum").item()
    return nats / math.log(2) / len(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="training run directory (its `last` file names the checkpoint)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory instead of --run")
    parser.add_argument("--heldout", type=Path, default=Path("data/shakespeare/heldout"))
    parser.add_argument("--out", type=Path, default=Path("src/qwen3/demo"))
    args = parser.parse_args()
    checkpoint = args.checkpoint or args.run / (args.run / "last").read_text().strip()
    model = qwen3.load_model(checkpoint, dtype=torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    qwen3.save_model(model, args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(checkpoint / name, args.out / name)

    model = qwen3.load_model(args.out, dtype=torch.float32)  # evaluate exactly what ships
    tokenizer = qwen3.load_tokenizer(args.out)
    plays = {p.stem: p.read_text(encoding="utf-8") for p in sorted(args.heldout.glob("*.txt"))}
    per_play = {name: round(text_bits_per_byte(model, tokenizer, text), 4) for name, text in plays.items()}
    total_bytes = sum(len(t.encode()) for t in plays.values())
    overall = sum(per_play[n] * len(t.encode()) for n, t in plays.items()) / total_bytes
    results = {
        "parameters": model.num_parameters(),
        "heldout_bits_per_byte": round(overall, 4),
        "heldout_bits_per_byte_per_play": per_play,
        "heldout_bytes": total_bytes,
        "block_size": 512,
        "checkpoint": checkpoint.name,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(json.dumps(results, indent=2))
    print(f"packaged {args.out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
