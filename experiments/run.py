"""Architecture experiments: train the demo-sized Qwen3 once per variant, same data, budget and seed.

Each variant is the demo config (scripts/demo/config.json) with one change. For each it records held-out
bits per byte, training tokens/s, KV-cache bytes per token, parameter count, and stability: the largest
learning rate of a short sweep that trains without diverging. It writes results.json, a markdown table
and overlaid held-out loss curves under --out.

    python experiments/run.py --data data/shakespeare --out out/experiments          # on a GPU
    python experiments/run.py --tiny --out /tmp/exp                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

import qwen3
from qwen3.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict] = {
    "qwen3 (GQA 6/2, QK-norm, RMSNorm, pre-norm, SwiGLU)": {},
    "MHA (6 KV heads)": {"num_key_value_heads": 6},
    "MQA (1 KV head)": {"num_key_value_heads": 1},
    "no QK-norm": {"qk_norm": False},
    "LayerNorm": {"norm_type": "layernorm"},
    "post-norm": {"norm_position": "post"},
    "GELU MLP (parameter-matched)": {"mlp_type": "gelu"},
    "rope theta 1e6": {"rope_theta": 1e6},
}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_variant(name: str, overrides: dict, args: argparse.Namespace, lr: float, steps: int, tag: str) -> dict:
    base = json.loads((ROOT / "scripts" / "demo" / "config.json").read_text())
    if args.tiny:
        base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)  # fmt: skip
        if "num_key_value_heads" in overrides:
            overrides = {**overrides, "num_key_value_heads": 4 if overrides["num_key_value_heads"] > 2 else 1}
    config = qwen3.Qwen3Config.from_dict({**base, **overrides})
    run_dir = args.out / "runs" / f"{slug(name)}-{tag}"
    config_path = run_dir.with_suffix(".config.json")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config.to_json_string())
    result = train(
        TrainConfig(
            out=str(run_dir), data=[str(args.data / "train")], eval_data=[str(args.data / "heldout")],
            config=str(config_path), tokenizer=str(args.data / "tokenizer"), cache_dir=str(args.out / "cache"),
            block_size=args.block_size, batch_size=args.batch_size, max_steps=steps, lr=lr, min_lr=lr / 20,
            warmup_steps=max(1, steps // 13), weight_decay=0.3, seed=args.seed, eval_every=args.eval_every,
            eval_max_blocks=args.eval_max_blocks, overwrite=True, progress=False,
        )
    )  # fmt: skip
    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if r["type"] == "train"]
    shutil.rmtree(run_dir / f"checkpoint-{steps}", ignore_errors=True)  # keep the logs, not the weights
    return {
        "variant": name,
        "lr": lr,
        "eval_bpb": result.eval_metrics["eval_bpb"] if result.eval_metrics else math.nan,
        "final_loss": train_records[-1]["loss"],
        "first_loss": train_records[0]["loss"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in train_records[1:]) / max(1, len(train_records) - 1),
        "parameters": qwen3.Qwen3ForCausalLM(config).num_parameters() if not args.tiny else None,
        "kv_bytes_per_token_bf16": qwen3.KVCache.bytes_per_token(config, torch.bfloat16),
        "eval_curve": [(r["step"], r["eval_loss"]) for r in records if r["type"] == "eval"],
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


def diverged(run: dict) -> bool:
    return not math.isfinite(run["final_loss"]) or run["final_loss"] > 0.9 * run["first_loss"]


def write_report(results: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, sweep_ax) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=(3, 2))
    for r in results:
        steps, losses = zip(*r["main"]["eval_curve"], strict=True)
        line = ax.plot(steps, losses, marker=".", label=r["variant"])[0]
        lrs = [s["lr"] for s in r["sweep"]]
        finals = [s["final_loss"] if math.isfinite(s["final_loss"]) else math.nan for s in r["sweep"]]
        sweep_ax.plot(lrs, finals, marker="o", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title("main runs: held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sweep_ax.set_xscale("log")
    sweep_lrs = sorted({s["lr"] for r in results for s in r["sweep"]})
    sweep_ax.set_xticks(sweep_lrs, [f"{lr:g}" for lr in sweep_lrs], minor=False)
    sweep_ax.minorticks_off()
    sweep_ax.set_xlabel("peak learning rate")
    sweep_ax.set_ylabel("training loss at the end of the sweep run")
    sweep_ax.set_title("stability sweep (higher = worse; a gap = not finite)")
    sweep_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "experiments_loss.png", dpi=110)
    lines = [
        "| variant | held-out bits/byte | tokens/s | KV bytes/token (bf16) | parameters | largest stable LR |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["main"]
        params = f"{m['parameters']:,}" if m["parameters"] else "-"
        stable = f"{r['stable_lr']:g}" if r["stable_lr"] else "none of the sweep"
        lines.append(f"| {r['variant']} | {m['eval_bpb']:.3f} | {m['tokens_per_s']:,.0f} | "
                     f"{m['kv_bytes_per_token_bf16']:,} | {params} | {stable} |")  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shakespeare")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "experiments")
    parser.add_argument("--steps", type=int, default=800, help="the budget of each main run")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of the main runs")
    parser.add_argument("--sweep", default="2e-3,4e-3,8e-3,1.6e-2,3.2e-2", help="stability sweep learning rates")
    parser.add_argument("--sweep-steps", type=int, default=150)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-max-blocks", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated substrings of variant names to run")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and budget, for a CPU smoke run")
    parser.add_argument("--report-only", action="store_true", help="redraw results.md and the figure from --out")
    args = parser.parse_args()
    if args.report_only:  # redraw the table and the figure from an earlier run's results.json
        write_report(json.loads((args.out / "results.json").read_text()), args)
        return
    if args.tiny:
        args.steps, args.sweep_steps, args.block_size, args.batch_size = 4, 3, 32, 2
        args.eval_every, args.eval_max_blocks, args.sweep = 2, 2, "2e-3,3.2e-2"
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {n: o for n, o in VARIANTS.items() if not args.only or any(s in n for s in args.only.split(","))}
    results = []
    for name, overrides in chosen.items():
        main_run = run_variant(name, overrides, args, args.lr, args.steps, "main")
        sweep = [
            run_variant(name, overrides, args, float(lr), args.sweep_steps, f"lr{lr}") for lr in args.sweep.split(",")
        ]
        stable = [s["lr"] for s in sweep if not diverged(s)]
        results.append({"variant": name, "main": main_run, "sweep": sweep, "stable_lr": max(stable, default=None)})
        print(f"{name}: held-out bpb {main_run['eval_bpb']:.3f}, stable up to lr {max(stable, default=None)}")
    write_report(results, args)


if __name__ == "__main__":
    main()
