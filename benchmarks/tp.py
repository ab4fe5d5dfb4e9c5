"""Two GPUs: the tensor-parallel engine and training scaling, in one run (for an nvidia-h200-x2).

    python benchmarks/tp.py                                  # 2 GPUs: all four parts, about 6-9 minutes
    python benchmarks/tp.py --results benchmarks/RESULTS.md  # also append the table
    python benchmarks/tp.py --device cpu --tiny              # every code path on the CPU (gloo), tiny shapes
    python benchmarks/tp.py --skip-train --requests 64       # parts can be skipped or shrunk

Parts (each in its own process(es), each under a time limit; a part that fails or runs out of time gets a row
saying so and the others still run):
1. logits: the engine at TP=2 against TP=1, bf16, the Qwen3-8B shape: the logits of the step that prefills 16
   random prompts of 128 tokens (at each prompt's last position, as the runner returns them): max |TP=2 - TP=1|
   / max |TP=1| (benchmarks/tp_decode.py's measure, where a wrong slice gives errors of order 1 and bf16 rounding
   a few 1e-3 to 1e-2 at depth), and how often the greedy token agrees.
2. decode: one request (128-token prompt), batch-1 decode tokens/s through the engine at TP 1 and 2 (CUDA
   graphs unless --eager): (288 - 32) tokens / (time of a 288-token run - time of a 32-token run).
3. engine throughput, nano-vllm's protocol (benchmarks/throughput.py's workload: prompts and max_tokens
   U(100, 1024), ignore_eos, temperature 0.6, max_model_len 4096, one warm-up) on the 8B shape, TP 1 and 2,
   --requests of them (default 128: 256 at TP=1 on the 8B shape takes too long for the time box).
4. training tokens/s, Qwen3-0.6B shape, 8 x 2048 tokens per GPU, bf16 autocast, each layer compiled
   (benchmarks/train.py's setup): 1 GPU (plain), 2 GPUs with DDP and with FSDP2 (fully_shard per layer, as the
   trainer does); scaling efficiency = tokens/s on 2 / (2 x tokens/s on 1).
The 8B checkpoint is random (init_weights, std 0.02) built once on the GPU and written with qwen3.save_model
(sharded) to a temp dir, removed at the end. NVLink multicast stays off: NCCL_NVLS_ENABLE=0 (and the
PyTorch/NVSHMEM equivalents) are set here, before anything starts NCCL.
"""

from __future__ import annotations

import os

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _name, _value in NO_MULTICAST.items():  # before torch (and NCCL) is imported, for every child too
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import datetime  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
TP = 2
TINY_MODEL = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                  tie_word_embeddings=False)  # fmt: skip
TINY_TRAIN = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512)  # fmt: skip
RESULT = "RESULT "  # a child's result line: RESULT {json}


def child(args: list[str], timeout: float, torchrun: int = 0) -> tuple[dict | None, str]:
    """Run this script (under torchrun with `torchrun` processes if > 0) with `args`; its RESULT json and an
    error note (empty when it worked)."""
    # A child that is still running 10 s before its limit dumps every thread's stack to stderr (faulthandler), so
    # that a timeout says where it was stuck; the stderr tail is printed below.
    args = [*args, "--hang-dump", str(max(timeout - 10.0, 1.0))]
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
                   str(Path(__file__).resolve()), *args]  # fmt: skip
    started = time.monotonic()
    # A session of its own: on a timeout the whole tree goes (torchrun's workers, the engine's worker), so that
    # nothing keeps holding a GPU for the next part.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        sys.stderr.write(f"--- {' '.join(args[:2])}: timed out; its stdout, then its stderr:\n{stdout[-2000:]}\n"
                         f"{stderr[-6000:]}\n---\n")  # fmt: skip
        return None, f"timed out after {timeout:.0f} s"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of a child that ended
        except (ProcessLookupError, PermissionError):
            pass
    sys.stderr.write(stderr[-4000:])
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):]), ""
    sys.stderr.write(stdout[-2000:])
    return None, f"failed (exit status {process.returncode}, {time.monotonic() - started:.0f} s)"


def emit(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------
# Children


def build_checkpoint(directory: str, device: str, dtype: str, tiny: bool) -> None:
    import qwen3

    config = qwen3.Qwen3Config(**TINY_MODEL) if tiny else qwen3.Qwen3Config.from_preset("8B")
    with torch.device("meta"):
        model = qwen3.Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.tie_weights()
    torch.manual_seed(0)
    model.init_weights()
    qwen3.save_model(model, directory, max_shard_bytes=(1 << 20) if tiny else 5 << 30)  # sharded either way
    emit({"parameters": sum(p.numel() for p in model.parameters())})


def engine_run(directory: str, tp: int, device: str, dtype: str, requests: int, eager: bool, parts: str,
               tiny: bool) -> None:  # fmt: skip
    """Parts 1-3 on one engine of tensor-parallel size `tp`."""
    import gc
    import random

    from throughput import workload

    from qwen3.engine import LLM
    from qwen3.sampling import SamplingParams

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    vocab = TINY_MODEL["vocab_size"] if tiny else 10000
    started = time.perf_counter()

    def progress(what: str) -> None:  # to stderr, so that a timeout shows how far the child got
        print(f"[engine TP={tp}] {what} at {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    progress("building the engine")
    llm = LLM(directory, device=device, dtype=getattr(torch, dtype), max_model_len=4096 if not tiny else 1024,
              enforce_eager=eager, tensor_parallel_size=tp, max_num_seqs=256 if not tiny else 16)  # fmt: skip
    progress(f"engine built ({llm.config.num_blocks} blocks)")
    result: dict = {"tp": tp, "startup_s": time.perf_counter() - started, "num_blocks": llm.config.num_blocks}
    rng = random.Random(5)
    if "logits" in parts:
        prompts = [[rng.randrange(vocab) for _ in range(128 if not tiny else 16)] for _ in range(16)]
        from safetensors.torch import save_file

        captured = []  # the logits of the one step (16 x 128 prompt tokens, the last of each sampling)
        run = llm.runner.run

        def recording(*a, **k):  # noqa: ANN002, ANN003, ANN202
            logits, sampling = run(*a, **k)
            captured.append(logits.float().cpu())
            return logits, sampling

        llm.runner.run = recording
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
        llm.runner.run = run
        assert len(captured) == 1 and captured[0].shape[0] == len(prompts), [c.shape for c in captured]
        save_file({"logits": captured[0]}, logits_file(directory, tp))
        result["greedy"] = [o.token_ids[0] for o in outs]
        progress("logits done")
    if "decode" in parts:
        prompt = [rng.randrange(vocab) for _ in range(128 if not tiny else 16)]
        times = {}
        for n in (32, 288, 32, 288):  # twice each; the second of each is kept (the first warms up)
            sync()
            t = time.perf_counter()
            out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                               use_tqdm=False)[0]  # fmt: skip
            sync()
            assert len(out.token_ids) == n
            times[n] = time.perf_counter() - t
        result["decode_tok_s"] = 256 / max(times[288] - times[32], 1e-9)
        progress("decode done")
    if "engine" in parts:
        lo, hi = (100, 1024) if not tiny else (10, 100)
        prompts, max_tokens = workload(requests, lo, hi, vocab=vocab - 1 if tiny else 10000, seed=0)
        params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in max_tokens]
        llm.generate(prompts[:2], [SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True)] * 2,
                     use_tqdm=False)  # warm-up, as bench.py  # fmt: skip
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        seconds = time.perf_counter() - t
        produced = sum(len(o.token_ids) for o in outs)
        result.update(engine_tok_s=produced / seconds, engine_seconds=seconds, engine_tokens=produced)
    llm.shutdown()
    del llm
    gc.collect()
    emit(result)
    sys.stderr.flush()
    os._exit(0)  # skip the teardown: a torch process group freed during it can abort the process (parallel.py)


def train_run(parallel: str, device_type: str, tiny: bool, steps: int, warmup: int, compile_layers: bool) -> None:
    """Part 4 in one process of a torchrun group (or alone): tokens/s of this group, all ranks together."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from qwen3 import Qwen3Config, Qwen3ForCausalLM
    from qwen3.parallel import exit_worker, init_distributed
    from qwen3.train.trainer import build_loss_module, param_groups, train_step

    distributed = "LOCAL_RANK" in os.environ
    if distributed:
        world = init_distributed(device_type)
        rank, size, device = world.rank, world.world_size, world.device
    else:
        rank, size = 0, 1
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    config = Qwen3Config(**TINY_TRAIN) if tiny else Qwen3Config.from_preset("0.6B")
    batch, seq = (2, 64) if tiny else (8, 2048)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.init_weights(0.02)
    model.train()
    module = build_loss_module(model, 2048, False, compile=compile_layers)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (size,))
        model.init_buffers(device)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        wrapped = module
    else:
        module.to(device)
        wrapped = module
        if parallel == "ddp":
            wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(module, 0.1), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    autocast = torch.bfloat16 if device.type == "cuda" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss, _ = train_step(wrapped, optimizer, [(inputs, targets)], targets.numel() * size, world_size=size,
                             grad_clip=1.0, autocast_dtype=autocast)  # fmt: skip
        return loss

    for i in range(warmup):
        step(batches[i % 4])
    sync()
    if distributed:
        dist.barrier()
    t = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 4])
    sync()
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - t
    if rank == 0:
        emit({"parallel": parallel, "gpus": size, "tok_s": batch * seq * steps * size / seconds,
              "step_ms": 1000 * seconds / steps, "loss": float(loss)})  # fmt: skip
    if distributed:
        exit_worker(0)


# ---------------------------------------------------------------------------------------------------
# The parent


def logits_file(directory: str, tp: int) -> str:
    return f"{directory}.logits-tp{tp}.safetensors"  # beside the checkpoint, not in it


def logits_error(directory: str, one: dict, two: dict) -> tuple[float, float]:
    """(max |logits TP=2 - TP=1| / max |logits TP=1| (tp_decode.py's measure), share of equal greedy tokens)."""
    from safetensors.torch import load_file

    a, b = (load_file(logits_file(directory, tp))["logits"] for tp in (1, TP))
    agree = sum(x == y for x, y in zip(one["greedy"], two["greedy"], strict=True)) / len(one["greedy"])
    return ((a - b).abs().max() / a.abs().max()).item(), agree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of every code path)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--requests", type=int, help="engine-throughput requests (default 128; --tiny 8)")
    p.add_argument("--eager", action="store_true", help="the engine without CUDA graphs (TP 1 and 2)")
    p.add_argument("--skip-logits", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="training: layers run eagerly")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run (default 530)")
    p.add_argument("--tmp", help="where to write the 8B checkpoint (default: the system's temp dir)")
    p.add_argument("--results", type=Path, help="append the table to this markdown file")
    # internal: the children
    p.add_argument("--child", choices=["build", "engine", "train"], help=argparse.SUPPRESS)
    p.add_argument("--hang-dump", type=float, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--parts", default="", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    args = p.parse_args()
    requests = args.requests or (8 if args.tiny else 128)

    if args.hang_dump:  # a child: dump every thread's stack if it is still running then (see `child`)
        faulthandler.dump_traceback_later(args.hang_dump, exit=False)
    if args.child == "build":
        return build_checkpoint(args.dir, args.device, args.dtype, args.tiny)
    if args.child == "engine":
        sys.path.insert(0, str(HERE))  # throughput.workload
        return engine_run(args.dir, args.tp, args.device, args.dtype, requests, args.eager, args.parts, args.tiny)
    if args.child == "train":
        steps, warmup = (2, 1) if args.tiny else (args.train_steps, 3)
        return train_run(args.parallel, args.device, args.tiny, steps, warmup, args.compile)

    if args.device == "cuda" and torch.cuda.device_count() < TP:
        p.error(f"{TP} GPUs needed, {torch.cuda.device_count()} visible (use --device cpu --tiny to check the script)")
    deadline = time.monotonic() + args.budget
    left = lambda share: max(1.0, min(share, deadline - time.monotonic()))  # noqa: E731
    common = ["--device", args.device, "--dtype", args.dtype, "--requests", str(requests)]
    common += ["--tiny"] if args.tiny else []
    common += ["--eager"] if args.eager else []
    rows: list[list[str]] = []
    notes: list[str] = []
    parts = [name for name, skip in (("logits", args.skip_logits), ("decode", args.skip_decode),
                                     ("engine", args.skip_engine)) if not skip]  # fmt: skip
    shape = "tiny" if args.tiny else "Qwen3-8B shape"
    if parts:
        directory = tempfile.mkdtemp(prefix="bench_tp_", dir=args.tmp)
        try:
            built, error = child(["--child", "build", "--dir", directory, *common], left(150))
            if built is None:
                notes.append(f"checkpoint build {error}: parts {', '.join(parts)} not run")
            else:
                runs = {}
                for tp in (1, TP):
                    runs[tp], error = child(["--child", "engine", "--dir", directory, "--tp", str(tp),
                                             "--parts", ",".join(parts), *common], left(170))  # fmt: skip
                    if runs[tp] is None:
                        notes.append(f"engine at TP={tp} {error}")
                        if tp > 1 and not args.eager and args.device == "cuda":  # NCCL inside the CUDA graphs?
                            runs[tp], error = child(["--child", "engine", "--dir", directory, "--tp", str(tp),
                                                     "--parts", ",".join(parts), *common, "--eager"],
                                                    left(170))  # fmt: skip
                            notes.append(f"engine at TP={tp} rerun eagerly (no CUDA graphs): "
                                         f"{error or 'worked; its numbers are in the table'}")  # fmt: skip
                one, two = runs[1], runs[TP]
                if "logits" in parts and one and two:
                    err, agree = logits_error(directory, one, two)
                    rows.append(["logits TP=2 vs TP=1 (engine)", shape, f"{args.dtype}, last position of 16 prompts",
                                 "", f"max abs diff / max abs: {err:.2e}", f"argmax agrees {agree:.0%}"])  # fmt: skip
                if "decode" in parts:
                    cells = [f"{r['decode_tok_s']:,.1f}" if r else "n/a" for r in (one, two)]
                    speedup = f"{two['decode_tok_s'] / one['decode_tok_s']:.2f}x" if one and two else ""
                    graphs = "eager" if args.eager or args.device == "cpu" else "CUDA graphs"
                    rows.append(["batch-1 decode tok/s (engine)", shape, f"{args.dtype}, {graphs}", *cells, speedup])
                if "engine" in parts:
                    cells = [f"{r['engine_tok_s']:,.0f}" if r else "n/a" for r in (one, two)]
                    speedup = f"{two['engine_tok_s'] / one['engine_tok_s']:.2f}x" if one and two else ""
                    rows.append(["engine throughput tok/s (nano-vllm protocol)", shape,
                                 f"{requests} requests", *cells, speedup])  # fmt: skip
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            for tp in (1, TP):
                Path(logits_file(directory, tp)).unlink(missing_ok=True)
    if not args.skip_train:
        train_common = ["--child", "train", "--device", args.device, "--train-steps", str(args.train_steps)]
        train_common += ["--tiny"] if args.tiny else []
        train_common += [] if args.compile else ["--no-compile"]
        single, error = child([*train_common, "--parallel", "none"], left(120))
        if single is None:
            notes.append(f"training on 1 {args.device} {error}")
        for parallel in ("ddp", "fsdp"):
            multi, error = child([*train_common, "--parallel", parallel], left(130), torchrun=TP)
            if multi is None:
                notes.append(f"training {parallel} on {TP} {error}")
            efficiency = f"{multi['tok_s'] / (TP * single['tok_s']):.0%} scaling" if single and multi else ""
            rows.append([f"training tok/s, {parallel.upper() if parallel == 'ddp' else 'FSDP2'}",
                         "tiny" if args.tiny else "Qwen3-0.6B shape",
                         ("2 x 64" if args.tiny else "8 x 2048") + " per device"
                         + (", compiled" if args.compile else ""),
                         f"{single['tok_s']:,.0f}" if single else "n/a",
                         f"{multi['tok_s']:,.0f}" if multi else "n/a", efficiency])  # fmt: skip

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Two-device run, {date}, {TP} x {device_name} (NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']})", "",
             "| measurement | shape | setup | 1 device | 2 devices | 2 vs 1 |", "|---|---|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [f"\nnot measured: {note}" for note in notes]
    table = "\n".join(lines)
    print("\n" + table)
    if args.results:
        with args.results.open("a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
