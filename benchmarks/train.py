"""Training throughput: our training step versus transformers' Qwen3ForCausalLM, same shape, same setup.

Both models get the Qwen3-0.6B shape with random weights in fp32 (master weights), run the forward under
bf16 autocast, and step a fused AdamW (weight decay on matrices only) after clipping the gradient norm to 1.
Ours is `qwen3.train.trainer.train_step` on `build_loss_module` (each decoder layer torch.compile'd, the
chunked LM-head cross-entropy, causal SDPA); transformers' model is torch.compile'd whole and computes its
own loss (`labels=`, which materialises fp32 logits for every token). A few warm-up steps (compilation
included) are excluded; then tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated) are measured.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 x (non-embedding parameters + LM head)
+ 12 x layers x seq x heads x head_dim (see qwen3.train.trainer), and peak = 989 TFLOP/s (H100/H200 dense
bf16) unless --peak-tflops says otherwise.

    python benchmarks/train.py                     # on CUDA: batch 8 x 2048, 10 measured steps
    python benchmarks/train.py --results results.md  # also append a markdown row
    python benchmarks/train.py --tiny --no-compile   # a smoke test on CPU: tiny shape, 2 steps
"""

from __future__ import annotations

import argparse
import gc
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qwen3 import Qwen3Config, Qwen3ForCausalLM
from qwen3.train.trainer import build_loss_module, flops_per_token, param_groups, train_step

PEAK_TFLOPS = 989.0
TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
)


def make_batches(config: Qwen3Config, args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len + 1)
    return [torch.randint(0, config.vocab_size, shape, generator=gen).to(device) for _ in range(4)]


def timed_steps(step, batches: list[torch.Tensor], args: argparse.Namespace, device: torch.device) -> dict:
    """Run warm-up then measured steps of `step(tokens) -> loss`; seconds, peak memory and the last loss."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for i in range(args.steps):
        loss = step(batches[i % len(batches)])
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": seconds, "peak_bytes": peak, "loss": float(loss)}


def bench_ours(config: Qwen3Config, args: argparse.Namespace, device: torch.device, autocast) -> dict:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.init_weights(0.02)
    model.to(device).train()
    module = build_loss_module(model, args.loss_chunk_size, args.activation_checkpointing, compile=args.compile)
    optimizer = torch.optim.AdamW(param_groups(module, 0.1), lr=1e-4, fused=device.type == "cuda")

    def step(tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss, _ = train_step(
            module, optimizer, [(inputs, targets)], targets.numel(), grad_clip=1.0, autocast_dtype=autocast
        )
        return loss

    return timed_steps(step, make_batches(config, args, device), args, device)  # the model is freed on return


def bench_transformers(config: Qwen3Config, args: argparse.Namespace, device: torch.device, autocast) -> dict:
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM as HFModel

    torch.manual_seed(0)
    hf_config = HFConfig.from_dict(config.to_dict())
    hf_config._attn_implementation = "sdpa"
    model = HFModel(hf_config).to(device).train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    forward = torch.compile(model) if args.compile else model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed_tokens" in n]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = forward(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return timed_steps(step, make_batches(config, args, device), args, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=3, help="excluded steps, compilation included (--tiny: 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run both models eagerly")
    parser.add_argument("--skip-peer", action="store_true", help="benchmark ours only (no transformers)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute layers, both models")
    parser.add_argument("--loss-chunk-size", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape for a quick check (runs on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, help="append a markdown row to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        config = Qwen3Config(**TINY)
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 64)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    else:
        config = Qwen3Config.from_preset("0.6B")
        if device.type != "cuda":
            parser.error("the 0.6B shape needs CUDA; use --tiny on CPU")
    autocast = torch.bfloat16 if device.type == "cuda" else None  # CPU: plain fp32
    flops = flops_per_token(config, args.seq_len)
    tokens = args.batch_size * args.seq_len * args.steps

    runs = {"qwen3": bench_ours}
    if not args.skip_peer:
        runs["transformers"] = bench_transformers
    rows = {}
    for name, bench in runs.items():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result = bench(config, args, device, autocast)
        tokens_per_s = tokens / result["seconds"]
        result.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops / (args.peak_tflops * 1e12))
        rows[name] = result

    shape = "tiny" if args.tiny else "Qwen3-0.6B"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{shape}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps after {args.warmup} warm-up, "
        f"compile {'on' if args.compile else 'off'}, {'bf16 autocast' if autocast else 'fp32'}, {device_name}"
    )
    print(f"{'':<14}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'step ms':>9}{'loss':>9}")
    for name, r in rows.items():
        memory = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a"
        step_ms = 1000 * r["seconds"] / args.steps
        print(
            f"{name:<14}{r['tokens_per_s']:>12,.0f}{100 * r['mfu']:>7.1f}%{memory:>10}{step_ms:>9.1f}{r['loss']:>9.3f}"
        )
    ratio = memory_ratio = None
    if "transformers" in rows:
        ours, peer = rows["qwen3"], rows["transformers"]
        ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
        if ours["peak_bytes"] and peer["peak_bytes"]:
            memory_ratio = ours["peak_bytes"] / peer["peak_bytes"]
        memory_text = f", peak memory {memory_ratio:.2f}x" if memory_ratio else ""
        print(f"qwen3 / transformers: tokens/s {ratio:.2f}x{memory_text}")

    if args.results:
        header = (
            "| date | device | shape | batch x seq | compile | qwen3 tok/s | qwen3 MFU | qwen3 GiB "
            "| transformers tok/s | transformers MFU | transformers GiB | speed ratio | memory ratio |"
        )
        if not args.results.exists():
            args.results.write_text(header + "\n" + "|---" * header.count(" | ") + "|---|\n")

        def cells(name: str) -> list[str]:
            r = rows.get(name)
            if r is None:
                return ["", "", ""]
            memory = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a"
            return [f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%", memory]

        row = [
            datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            device_name,
            shape,
            f"{args.batch_size} x {args.seq_len}",
            "on" if args.compile else "off",
            *cells("qwen3"),
            *cells("transformers"),
            f"{ratio:.2f}x" if ratio else "",
            f"{memory_ratio:.2f}x" if memory_ratio else "",
        ]
        with args.results.open("a", encoding="utf-8") as f:
            f.write("| " + " | ".join(row) + " |\n")


if __name__ == "__main__":
    main()
