"""`qwen3 train` and `qwen3 merge-lora`: a thin argparse layer over `train()` and `merge_adapter_checkpoint()`.

`add_subcommands(subparsers)` registers both on the `qwen3` parser; `python -m qwen3.train.cli ...` runs
them alone, which is what torchrun needs: `torchrun --nproc-per-node 8 -m qwen3.train.cli train ...`.
A TrainError prints one line, `qwen3: error: ...`, and exits with status 2 (set QWEN3_TRACEBACK=1 to
see the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..parallel import finish
from .data import TrainError
from .lora import LORA_TARGETS

if TYPE_CHECKING:
    from .trainer import TrainConfig

TRAIN_EXAMPLES = """examples:
  # pretrain a 0.6B-shaped model from scratch on a folder of .txt files
  qwen3 train --preset 0.6B --tokenizer Qwen/Qwen3-0.6B --data corpus/ --eval-fraction 0.01 --out runs/pt
  # full fine-tune on chat data (loss on assistant tokens only), 8 GPUs with FSDP2
  torchrun --nproc-per-node 8 -m qwen3.train.cli train --model Qwen/Qwen3-0.6B --data chats.jsonl \\
      --parallel fsdp --out runs/sft
  # LoRA, then fold the adapter into a plain checkpoint
  qwen3 train --model Qwen/Qwen3-0.6B --data chats.jsonl --lora-rank 16 --out runs/lora
  qwen3 merge-lora --model Qwen/Qwen3-0.6B --adapter runs/lora/checkpoint-1000 --out merged/
  # continue an interrupted run exactly where its last checkpoint left it
  qwen3 train ...same flags... --resume
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows each option's default where one exists."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            if "default" not in text:
                text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, found {text}")
    return value


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model (exactly one of --preset, --config, --model)")
    model.add_argument("--preset", help="train from scratch with an official shape: 0.6B, 1.7B, 4B, 8B, 14B, 32B")
    model.add_argument("--config", help="train from scratch with the shape in this config.json")
    model.add_argument("--model", help="fine-tune this checkpoint (directory or Hub id)")
    model.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: --model)")
    model.add_argument("--init-std", type=float, default=0.02, help="std of the normal init from scratch")

    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="a .txt / .jsonl file or a folder of them (repeatable); .jsonl records have a 'text' "
        "field, or 'messages' for chat (loss on assistant tokens only)",
    )
    data.add_argument(
        "--eval-data", action="append", default=[], metavar="PATH", help="held-out files or folders (repeatable)"
    )
    data.add_argument(
        "--eval-fraction", type=float, default=0.0, help="hold out the last fraction of every --data file instead"
    )
    data.add_argument("--block-size", type=positive_int, default=1024, help="tokens per training sequence")
    data.add_argument("--cache-dir", help="where tokenized data is cached (default: OUT/cache)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument(
        "--batch-size", type=positive_int, default=8, help="sequences per micro-step, summed over all processes"
    )
    opt.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    opt.add_argument("--max-steps", type=positive_int, default=1000, help="optimizer steps of the schedule")
    opt.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    opt.add_argument("--min-lr", type=float, default=3e-5, help="learning rate at the end of the cosine")
    opt.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warmup steps (default: min(100, max_steps / 10))"
    )
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (not norms/embeddings)")
    opt.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    opt.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    opt.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    opt.add_argument("--seed", type=int, default=0, help="seeds the init, the data order and dropout")
    opt.add_argument(
        "--loss-chunk-size", type=positive_int, default=2048, help="tokens per chunk of the LM-head cross-entropy"
    )

    hw = p.add_argument_group("hardware")
    hw.add_argument("--device", help="cpu, cuda, cuda:N, ... (default: cuda:LOCAL_RANK if CUDA is available, else cpu)")
    hw.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU",
    )
    hw.add_argument(
        "--parallel",
        choices=["auto", "none", "ddp", "fsdp"],
        default="auto",
        help="under torchrun: DDP (auto) or FSDP2 (fully_shard per decoder layer)",
    )
    hw.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer in backward instead of storing its activations",
    )
    hw.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    hw.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak FLOP/s per device for MFU (default: 989 on H100/H200, else no MFU)",
    )

    run = p.add_argument_group("output, evaluation, checkpoints")
    run.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png")
    run.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (0: at the end only)")
    run.add_argument("--eval-max-blocks", type=int, default=0, help="evaluate on at most N blocks (0: all)")
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    run.add_argument("--keep-checkpoints", type=int, default=0, help="keep the N newest checkpoints (0: all)")
    run.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        help="stop with a checkpoint after this step (the schedule still ends at --max-steps)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from OUT/last, or from the checkpoint directory given",
    )
    run.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    lora = p.add_argument_group("LoRA (with --model)")
    lora.add_argument("--lora-rank", type=int, default=0, help="train rank-r adapters instead of all weights")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale is alpha / rank")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lora.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated projection names")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .trainer import TrainConfig

    return TrainConfig(
        out=args.out,
        data=args.data,
        preset=args.preset,
        config=args.config,
        model=args.model,
        tokenizer=args.tokenizer,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        cache_dir=args.cache_dir,
        block_size=args.block_size,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        beta1=args.beta1,
        beta2=args.beta2,
        adam_eps=args.adam_eps,
        grad_clip=args.grad_clip,
        seed=args.seed,
        init_std=args.init_std,
        precision=args.precision,
        device=args.device,
        parallel=args.parallel,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        loss_chunk_size=args.loss_chunk_size,
        eval_every=args.eval_every,
        eval_max_blocks=args.eval_max_blocks,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        stop_after=args.stop_after,
        resume=args.resume,
        overwrite=args.overwrite,
        peak_tflops=args.peak_tflops,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        progress=not args.no_progress,
    )


def _report(error: TrainError) -> int:
    if os.environ.get("QWEN3_TRACEBACK"):
        raise error
    where = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"qwen3: error{where}: {str(error).splitlines()[0]}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    try:
        result = train(config_from_args(args))
    except TrainError as e:
        return _report(e)
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"step {result.step}: checkpoint {result.checkpoint}", file=sys.stderr)
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from .lora import merge_adapter_checkpoint

    try:
        out = merge_adapter_checkpoint(args.model, args.adapter, args.out, args.dtype, args.overwrite)
    except TrainError as e:
        return _report(e)
    print(f"merged checkpoint written to {out}", file=sys.stderr)
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `train` and `merge-lora` on a parser's subcommands; each handler is `func(args) -> int`."""
    p = subparsers.add_parser(
        "train",
        help="train from scratch, fine-tune or LoRA-tune on text or chat data",
        description="Train a Qwen3 model: from scratch (--preset/--config) or from a checkpoint (--model), "
        "fully or with LoRA, on one process or under torchrun (DDP / FSDP2). Checkpoints are Hugging Face "
        "checkpoints (or PEFT adapters) plus the state to resume exactly.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    m = subparsers.add_parser(
        "merge-lora",
        help="fold a LoRA adapter into its base model, giving a plain checkpoint",
        description="Load --model, add the PEFT-format adapter in --adapter, merge W + (alpha/r) B A in fp32 "
        "and write a plain Hugging Face checkpoint (with the tokenizer files) to --out.",
    )
    m.add_argument("--model", required=True, help="the base checkpoint (directory or Hub id)")
    m.add_argument("--adapter", required=True, help="directory with adapter_config.json + adapter_model.safetensors")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the merged weights (auto: the base checkpoint's)",
    )
    m.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    m.set_defaults(func=cmd_merge_lora)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen3", description="Qwen3 training commands.")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return finish(args.func(args))  # a torchrun worker ends here, without the interpreter's teardown


if __name__ == "__main__":
    sys.exit(main())
