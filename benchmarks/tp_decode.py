"""Decode speed under tensor parallelism (qwen3.parallel): tokens/s at TP=1 and TP=N, at batch 1 and 64, on one
random-weight checkpoint written on the fly (default: the Qwen3-8B shape in bf16), and a check that the TP=N
logits match TP=1 within bf16 rounding. Run it under torchrun; N is the number of processes.

    torchrun --nproc-per-node 2 benchmarks/tp_decode.py                      # 2 GPUs: Qwen3-8B shape
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --tiny               # CPU smoke test (gloo)
    torchrun --nproc-per-node 4 benchmarks/tp_decode.py --config config.json --batch 1 8 64

What to expect: a decode step reads every weight once, so at batch 1 (bandwidth-bound) TP=N can approach N x
the TP=1 speed, less two all-reduces of (B, 1, H) per layer and one all-gather of the logits per token;
those are latency-bound, and in eager mode the per-kernel launch cost is the same at any N. At batch 64 the
matmuls do more work per byte and the collectives grow with B. --compile takes the fast decode step
(torch.compile + a CUDA graph) on every run; it is tested on CPU (tests/test_tensor_parallel.py traces the
collectives in one graph) but was not run on GPUs when this was written.

TP=1 is the plain single-process model (qwen3.load_model) on rank 0 while the other ranks wait; TP=N is
qwen3.parallel.load_model_tp on every rank. NVLink multicast (NVLS) stays off: this sets NCCL_NVLS_ENABLE=0
(and the PyTorch/NVSHMEM equivalents) unless the environment already sets them.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import qwen3
from qwen3.generate import generate_tokens
from qwen3.parallel import exit_worker, init_distributed, load_model_tp, on_rank0, shard_config
from qwen3.sampling import SamplingParams

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# The logits check. In fp32, TP=N and TP=1 differ only in the order of additions (tests/test_tensor_parallel.py
# asserts 1e-5 of max |logit|). In bf16 each rounds differently (TP=1 rounds each o_proj/down_proj output once,
# TP=N rounds N partial sums, then their sum), and such differences compound through the layers, so no fixed
# bound fits every depth: 7e-3 on the tiny shape, 2e-2 on the 28 layers of the 0.6B shape (measured, CPU).
# So both are compared with the plain fp32 model (TP=1, on rank 0: 4 bytes a parameter must fit one device),
# and TP=N passes when its error is at most TOLERANCE_FACTOR times TP=1's own bf16 error (measured ~1.1-1.2x).
# A wrong slice, a head on the wrong KV head or a missing all-reduce gives errors of order 1.
TOLERANCE_FACTOR = 2.0
FP32_TOLERANCE = 1e-4
TINY = qwen3.Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=False)  # fmt: skip


def make_checkpoint(config: qwen3.Qwen3Config, device: torch.device, dtype: torch.dtype, root: str | None) -> str:
    """Random weights (normal, std 0.02) built on `device` and written with save_model to a new temp dir."""
    with torch.device("meta"):
        model = qwen3.Qwen3ForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.tie_weights()
    torch.manual_seed(0)
    model.init_weights()
    directory = tempfile.mkdtemp(prefix="tp_decode_", dir=root)
    qwen3.save_model(model, directory)
    return directory


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_tokens_per_second(model, batch: int, args: argparse.Namespace, device: torch.device) -> float:  # noqa: ANN001
    """Generated tokens per second over the decode steps (prefill and the first token excluded), greedy."""
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_length), generator=gen)

    def run(new_tokens: int) -> tuple[int, float]:
        steps = generate_tokens(model, prompts, new_tokens, SamplingParams(temperature=0.0), compile=args.compile)
        next(steps)  # prefill and the first token
        sync(device)
        start = time.perf_counter()
        decoded = sum(1 for _ in steps)  # no EOS ids: every step runs
        sync(device)
        return decoded, time.perf_counter() - start

    run(4)  # warm-up (and compilation)
    decoded, seconds = run(args.new_tokens)
    return batch * decoded / seconds


@torch.no_grad()
def check_logits(model, device: torch.device) -> torch.Tensor:  # noqa: ANN001
    """fp32 copies of the logits of two fixed random prompts of 64 tokens."""
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    return model(ids).float().cpu()


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--preset", default="8B", help="an official size (default 8B)")
    shape.add_argument("--config", type=Path, help="a config.json instead of a preset")
    shape.add_argument("--tiny", action="store_true", help="a tiny shape, for a CPU smoke test")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--compile", action="store_true", help="the fast decode step (torch.compile + CUDA graph)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--tmp", help="where to write the checkpoint (default: the system's temp dir)")
    args = parser.parse_args()

    for name, value in NO_MULTICAST.items():  # before NCCL starts; leave NVLink multicast off
        os.environ.setdefault(name, value)
    world = init_distributed(args.device, timeout=timedelta(minutes=30))  # the others wait while rank 0 runs TP=1
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        config, name = TINY, "tiny"
    elif args.config:
        config, name = qwen3.Qwen3Config.from_json(args.config), str(args.config)
    else:
        config, name = qwen3.Qwen3Config.from_preset(args.preset), f"Qwen3-{args.preset} shape"
    shard_config(config, world.world_size)  # a clear error now if the heads do not divide
    directory = on_rank0(lambda: make_checkpoint(config, world.device, dtype, args.tmp))
    speeds: dict[tuple[int, int], float] = {}
    reference = exact = None  # rank 0's TP=1 logits in the benchmark's dtype and in fp32
    try:
        if world.rank == 0:  # TP=1: the plain model, alone
            model = qwen3.load_model(directory, device=world.device, dtype=dtype)
            reference = check_logits(model, world.device)
            for batch in args.batch:
                speeds[1, batch] = decode_tokens_per_second(model, batch, args, world.device)
            del model
            free_memory(world.device)
            if dtype != torch.float32:  # the fp32 reference, plain and independent of qwen3.parallel
                exact = check_logits(qwen3.load_model(directory, device=world.device), world.device)
                free_memory(world.device)
        dist.barrier()
        model = load_model_tp(directory, device=world.device, dtype=dtype)
        logits = check_logits(model, world.device)
        for batch in args.batch:
            speeds[world.world_size, batch] = decode_tokens_per_second(model, batch, args, world.device)
    finally:
        dist.barrier()
        if world.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)

    ok = True
    if world.rank == 0:
        N = world.world_size
        err = rel_error(logits, reference)
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU (gloo)"
        compiled = "compiled + CUDA graph" if args.compile and world.device.type == "cuda" else "eager"
        compiled = "compiled" if args.compile and world.device.type != "cuda" else compiled
        print(f"\n{name}, {args.dtype}, {device}, decode {compiled}, prompt {args.prompt_length}, "
              f"{args.new_tokens} new tokens\n")  # fmt: skip
        print("| TP | batch | decode tokens/s | ms per step | speed-up vs TP=1 |")
        print("|---:|---:|---:|---:|---:|")
        for tp in (1, N):
            for batch in args.batch:
                speed, step_ms = speeds[tp, batch], 1000 * batch / speeds[tp, batch]
                print(f"| {tp} | {batch} | {speed:,.1f} | {step_ms:.2f} | {speed / speeds[1, batch]:.2f}x |")
        print(f"\nlogits TP={N} vs TP=1 ({args.dtype}): max |diff| / max |TP=1| = {err:.2e}; "
              f"same argmax at {agree:.1%} of positions")  # fmt: skip
        if dtype == torch.float32:
            ok = err <= FP32_TOLERANCE
            print(f"fp32: {'ok' if ok else 'FAILED'} (tolerance {FP32_TOLERANCE:g})")
        else:
            err_1, err_n = rel_error(reference, exact), rel_error(logits, exact)
            ok = err_n <= TOLERANCE_FACTOR * err_1
            print(f"against fp32: TP=1 {err_1:.2e}, TP={N} {err_n:.2e}: {'ok' if ok else 'FAILED'} "
                  f"(TP={N} may be at most {TOLERANCE_FACTOR:g}x TP=1's own {args.dtype} error)")  # fmt: skip
    exit_worker(0 if ok else 1)


if __name__ == "__main__":
    main()
