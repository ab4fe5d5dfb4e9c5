"""Single-stream decode speed: qwen3 (eager, fast path, int8) against transformers, in one process, on the
same random-init Qwen3-0.6B checkpoint (no download).

Two numbers first (see benchmarks/NOTES.md): bytes read per generated token and the memory bandwidth.
At batch 1 every weight is read once per token, so the ceiling is bandwidth / bytes-per-token.

    python benchmarks/decode.py --device cuda [--results benchmarks/RESULTS.md]   # H200: bf16
    python benchmarks/decode.py --device cpu --threads 2                         # CPU: fp32, bf16, int8
    python benchmarks/decode.py --cpu                 # CPU int8 kernels: fp32 vs int8 (PyTorch's kernels, then
                                                      # qwen3's) vs transformers fp32, 2 threads, one run
    python benchmarks/decode.py --gemv                # CUDA: Triton GEMV vs cuBLAS on Qwen3-0.6B's projections
    python benchmarks/decode.py --engine-gemv         # CUDA: the engine at batch 1 with and without use_gemv,
                                                      # bf16 and int8, and the logits of both paths
    python benchmarks/decode.py --engine-gemv --device cpu   # its dry run: a tiny model, the kernel interpreted

--cpu times qwen3 fp32 (PyTorch's GEMV, then qwen3's CPU kernel through use_cpu_gemv, as generate and chat run
it on the CPU), qwen3 int8 with PyTorch's int8pack kernel (Int8Linear's "auto" before the CPU kernel:
x rounded to bf16), qwen3 int8 with qwen3's own CPU kernel (qwen3/kernels/cpu_gemv.py, "auto" now; it is
built first if needed), and transformers fp32, on the same random-init checkpoint in one process.

--gemv (about a minute on an H200) times one GEMV / small-M matmul of every Qwen3-0.6B projection shape, as a
decode step sees them: each timed call reads a different copy of the weights (enough copies to overflow the
L2 cache), and the calls are replayed from one CUDA graph, so launch overhead is not counted (the decode
step is graph-captured too). For bf16 weights: the Triton split-K GEMV (qwen3/kernels/gemv_triton.py)
against cuBLAS (F.linear); for int8 weight-only: the Triton kernel on int8 against cuBLAS on the bf16
matrix (what int8 replaces) and against the eager dequantising path (Int8Linear's plain formula). GB/s counts
the bytes each call must move (weights, scales, x, y). The last table adds up one decode step's GEMVs
(28 layers with fused q/k/v and gate/up, plus the LM head). Options: --gemv-rows, --gemv-sweep (also try a
few launch shapes per matrix, refine the fastest and print it; above 16 rows the shapes include row blocks of
16-128, the kernel as a small-M matmul, and cuBLAS also runs as W x^T), --gemv-weights (bf16, int8 or both),
--gemv-budget (seconds of sweeping, shared among the (rows, matrix) pairs).

--engine-gemv (a few minutes on an H200) runs the engine at batch 1 (LLM, CUDA graphs; what chat and generate use)
on the random-init 0.6B three times per weight type, bf16 and int8 weight-only: the plain model (cuBLAS), the same
model after `use_gemv` (qwen3/kernels/gemv_linear.py: the Triton split-K GEMV for <= --gemv-max-rows rows), and
after `use_gemv(lm_head=False)` (the LM head, run eagerly after each graph replay, keeps its plain path). All three
share every weight tensor, so the engines stay alive and take turns, 3 rounds, best kept. Then the logits:
prefill of the 32-token prompt and 8 decode steps fed the same tokens, plus one 16-row forward (the kernel's
tl.dot path), plain and GEMV, each against a copy of the same weights in fp32 (fp64 for an fp32 model); "ok"
when the GEMV path is no further from that copy than twice the plain path is. With --device cpu it is a dry
run of the same code on a tiny random model, the kernel run by Triton's interpreter (TRITON_INTERPRET=1; needs
the test extra).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from kernels import graph_seconds  # benchmarks/kernels.py (this script's folder is on sys.path)

import qwen3
from qwen3.generate import decode_one, generate_tokens, prefill
from qwen3.model import KVCache

H200_COPY_BANDWIDTH = 4.27e12  # bytes/s, device-to-device copy measured on the lent H200 (KINDS.md)
# Qwen3-0.6B's projections (name, in_features K, out_features N, per decode step), q/k/v and gate/up fused
GEMV_SHAPES = [("qkv", 1024, 4096, 28), ("o", 2048, 1024, 28), ("gate_up", 1024, 6144, 28), ("down", 3072, 1024, 28),
               ("lm_head", 1024, 151936, 1)]  # fmt: skip
L2_FLUSH_BYTES = 256 * 2**20  # distinct weight bytes per timed graph: several times the H200's 50 MB L2


def make_checkpoint(directory: Path) -> None:
    torch.manual_seed(0)
    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config.from_preset("0.6B")).to(torch.bfloat16)
    model.init_weights()
    qwen3.save_model(model, directory)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bytes_per_token(model: torch.nn.Module) -> int:
    """Weights read per decoded token: every matrix once (the embedding row is negligible), norms too."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or name.endswith(("embed_tokens.weight", "rope.cos", "rope.sin")):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    if model.config.tie_word_embeddings and not hasattr(model.lm_head, "weight_scale"):
        total += model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    return total


def time_qwen3(model, prompt, new_tokens, device, **kwargs) -> tuple[float, float]:
    """(tokens/s over the new tokens, seconds of the first call: warm-up/compile included)."""
    start = time.perf_counter()
    qwen3.generate(model, prompt, max_new_tokens=new_tokens, **kwargs)
    sync(device)
    warmup = time.perf_counter() - start
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        out = qwen3.generate(model, prompt, max_new_tokens=new_tokens, **kwargs)
        sync(device)
        best = max(best, out.shape[1] / (time.perf_counter() - start))
    return best, warmup


def time_transformers(model, prompt, new_tokens, device, **kwargs) -> tuple[float, float]:
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    start = time.perf_counter()
    model.generate(prompt, **args)
    sync(device)
    warmup = time.perf_counter() - start
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        out = model.generate(prompt, **args)
        sync(device)
        best = max(best, (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start))
    return best, warmup


def time_to_first_token(model, prompt, device) -> float:
    cache = KVCache(model.config, 1, prompt.shape[1] + 1, device=device, dtype=model.model.norm.weight.dtype)
    with torch.inference_mode():
        prefill(model, prompt, torch.tensor([prompt.shape[1]], device=device), cache)  # warm-up
        sync(device)
        start = time.perf_counter()
        prefill(model, prompt, torch.tensor([prompt.shape[1]], device=device), cache).argmax(-1)
        sync(device)
    return time.perf_counter() - start


def time_engine(model, prompt, new_tokens, device, compile: bool = False, gemv: bool | None = None,
                persistent_decode: bool | None = None) -> tuple[float, float, float, float]:  # fmt: skip
    """The engine at batch 1 (what `qwen3 chat` and `qwen3 generate` use on CUDA): (tokens/s over the new tokens,
    seconds to build the engine (graph capture included), time to first token of a 512-token prompt, and the
    relative logit difference of its greedy tokens against qwen3.generate as the fraction of 64 tokens shared)."""
    from qwen3.engine import LLM

    start = time.perf_counter()
    llm = LLM(model, max_num_seqs=1, max_model_len=1024, kv_cache_tokens=2048, enable_prefix_caching=False,
              compile=compile, gemv=gemv, persistent_decode=persistent_decode)
    sync(device)
    build = time.perf_counter() - start
    params = qwen3.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = prompt[0].tolist()
    llm.generate([ids], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        out = llm.generate([ids], params, use_tqdm=False)[0]
        sync(device)
        best = max(best, len(out.token_ids) / (time.perf_counter() - start))
    long_prompt = torch.randint(0, model.config.vocab_size, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    one = qwen3.SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([long_prompt], one, use_tqdm=False)
    sync(device)
    start = time.perf_counter()
    llm.generate([long_prompt], one, use_tqdm=False)
    sync(device)
    ttft = time.perf_counter() - start
    engine_ids = llm.generate([ids], qwen3.SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
                              use_tqdm=False)[0].token_ids  # fmt: skip
    plain_ids = qwen3.generate(model, prompt, max_new_tokens=64)[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(plain_ids, engine_ids, strict=True)) if a != b), 64)
    del llm
    if gemv:
        from qwen3.kernels.gemv_linear import remove_gemv

        remove_gemv(model)
    # the next engine starts as in a fresh process: no compiled code of this one for dynamo to check guards against
    # (its int8 run came fourth and measured 705 tokens/s where the profile of a fresh process gives int8 a shorter
    # step than bf16), and no graph pools held
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return best, build, ttft, same / 64


def fast_path_agreement(model, prompt, device) -> tuple[float, float]:
    """(max |compiled - eager| / max |eager| of decode logits over 8 steps, fraction of 64 greedy tokens
    that the fast path and the plain path share before the first difference)."""
    from qwen3.generate import decode_one

    compiled = torch.compile(decode_one, fullgraph=True, dynamic=False)
    cache = KVCache(model.config, 1, prompt.shape[1] + 16, device=device, dtype=model.model.norm.weight.dtype)
    err = 0.0
    with torch.inference_mode():
        token = prefill(model, prompt, torch.tensor([prompt.shape[1]], device=device), cache).argmax(-1)
        for i in range(8):
            pos = torch.tensor([prompt.shape[1] + i], device=device)
            fast = compiled(model, token, pos, cache).float()
            plain = decode_one(model, token, pos, cache).float()
            err = max(err, ((fast - plain).abs().max() / plain.abs().max()).item())
            token = plain.argmax(-1)
    plain_ids = qwen3.generate(model, prompt, max_new_tokens=64)[0].tolist()
    fast_ids = qwen3.generate(model, prompt, max_new_tokens=64, compile=True)[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(plain_ids, fast_ids, strict=True)) if a != b), 64)
    return err, same / 64


def speculative_speedup(model_dir: Path, text_file: Path, device: str, new_tokens: int = 128) -> str:
    """Greedy tokens/s with and without prompt-lookup drafts on a repetitive prompt: a passage given twice
    (as when a model is asked to repeat or edit a text it was given). Outputs must be identical."""
    model = qwen3.load_model(model_dir, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    tok = qwen3.load_tokenizer(model_dir)
    passage = text_file.read_text(encoding="utf-8")[:1500]
    prompt = [tok.encode(passage + "\n\n" + passage[:200])]
    rates, outputs = {}, {}
    for k in (0, 6):
        qwen3.generate(model, prompt, max_new_tokens=8, speculative=k)
        sync(device)
        start = time.perf_counter()
        outputs[k] = qwen3.generate(model, prompt, max_new_tokens=new_tokens, speculative=k)
        sync(device)
        rates[k] = new_tokens / (time.perf_counter() - start)
    same = outputs[0].tolist() == outputs[6].tolist()
    speedup = rates[6] / rates[0]
    return (
        f"speculative (prompt lookup, 6 drafts) on a repeated passage, {len(prompt[0])}-token prompt: "
        f"{rates[0]:.1f} -> {rates[6]:.1f} tok/s ({speedup:.2f}x), identical output: {same}"
    )


def cpu_int8_kernels(directory: Path, prompt: torch.Tensor, new_tokens: int, rounds: int = 3) -> list[tuple]:
    """Rows (engine, variant, tok/s, warm-up s, bytes/token) for --cpu: qwen3 fp32, qwen3 int8 with PyTorch's
    kernel and with qwen3's, transformers fp32. The variants take turns, `rounds` times (a busy machine slows
    them alike), and each keeps its best round; each decode step is timed too, and the median step of all
    rounds is printed beside (on a shared machine the median step says more than the whole run)."""
    import os

    from transformers import Qwen3ForCausalLM

    from qwen3.kernels import cpu_gemv
    from qwen3.kernels.cpu_linear import use_cpu_gemv
    from qwen3.quantize import quantize_int8

    fp32 = qwen3.load_model(directory, dtype=torch.float32)
    fp32_kernel = qwen3.load_model(directory, dtype=torch.float32)
    use_cpu_gemv(fp32_kernel)  # what qwen3 generate and chat do on the CPU
    int8 = quantize_int8(qwen3.load_model(directory, dtype=torch.float32))
    ref = Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    isa = cpu_gemv.cpu_isa()
    if not cpu_gemv.available():
        print(f"qwen3's CPU kernel is not available here (instruction set: {isa})")
    hf_args = dict(do_sample=False, pad_token_id=0)

    def qwen3_run(model, kernel_on: bool):
        def run(n: int) -> list[float]:
            os.environ["QWEN3_CPU_KERNEL"] = "1" if kernel_on else "0"  # off: auto takes PyTorch's int8pack
            return [time.perf_counter() for _ in generate_tokens(model, prompt, max_new_tokens=n)]

        return run

    class Streamer:  # transformers calls put() with the prompt, then with each new token
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def hf_run(n: int) -> list[float]:
        streamer = Streamer()
        ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **hf_args)
        return streamer.times[1:]  # one time per new token

    variants = [  # (engine, variant, generate n tokens -> tokens made, bytes per token)
        ("qwen3", "float32 eager", qwen3_run(fp32, True), bytes_per_token(fp32)),
        ("qwen3", "float32 int8 weights, PyTorch int8pack kernel", qwen3_run(int8, False), bytes_per_token(int8)),
    ]
    if cpu_gemv.available():
        variants.insert(1, ("qwen3", f"float32 weights, qwen3 CPU kernel ({isa})", qwen3_run(fp32_kernel, True),
                            bytes_per_token(fp32)))  # fmt: skip
        variants.append(("qwen3", f"float32 int8 weights, qwen3 CPU kernel ({isa})", qwen3_run(int8, True),
                         bytes_per_token(int8)))  # fmt: skip
    variants.append(("transformers", "float32 dynamic cache", hf_run, bytes_per_token(fp32)))
    warmup, best, steps = {}, {}, {}
    for _, variant, run, _ in variants:
        start = time.perf_counter()
        run(8)
        warmup[variant] = time.perf_counter() - start
    for r in range(rounds):
        for engine, variant, run, _ in variants:
            start = time.perf_counter()
            times = run(new_tokens)
            rate = len(times) / (times[-1] - start)
            best[variant] = max(best.get(variant, 0.0), rate)
            steps.setdefault(variant, []).extend(b - a for a, b in itertools.pairwise(times))  # decode steps
            print(f"round {r + 1}: {engine} {variant}: {rate:.2f} tokens/s", flush=True)
    os.environ["QWEN3_CPU_KERNEL"] = "1"
    print("\nmedian decode step over all rounds (the prompt's prefill excluded):")
    for engine, variant, _, _ in variants:
        median = sorted(steps[variant])[len(steps[variant]) // 2]
        print(f"  {engine} {variant}: {median * 1e3:.1f} ms = {1 / median:.2f} tokens/s")
    return [(engine, variant, best[variant], warmup[variant], nbytes) for engine, variant, _, nbytes in variants]


def sweep_configs(M: int, K: int, N: int, size: int, num_sms: int, base) -> list:
    """--gemv-sweep's launch shapes for one matrix: at M <= 16, rows per program, split K (half, the same, twice
    the default) and warps; above 16 rows also the rows per tile (16 up to M) and wider tiles, at 1, 2 and 4
    programs per SM."""
    from qwen3.kernels import gemv_triton as gt

    configs = []
    if M <= gt.BLOCK_M_DOT:
        for block_n, factor, num_warps in itertools.product((16, 32, 64), (1, 2, 4), (4, 8)):
            split_k = max(1, base.split_k * factor // 2)  # half, the same, twice the default split
            configs.append(gt.gemv_config(M, N, K, size, num_sms, block_n, None, split_k, num_warps))
        return configs
    block_ms = [b for b in (16, 32, 64, 128) if b <= max(16, M)]
    for block_m, block_n, per_sm, num_warps in itertools.product(block_ms, (32, 64, 128), (1, 2, 4), (4, 8)):
        tiles = -(-M // block_m) * -(-N // block_n)
        split_k = max(1, -(-per_sm * num_sms // tiles))
        configs.append(gt.gemv_config(M, N, K, size, num_sms, block_n, None, split_k, num_warps, block_m))
    random.Random(0).shuffle(configs)  # a sweep cut short by its time budget has still sampled every kind
    return configs


def refine_configs(config, M: int, K: int, N: int, size: int, num_sms: int) -> list:
    """Neighbours of a fast launch shape: other K steps and pipelining depths."""
    from qwen3.kernels import gemv_triton as gt

    found = []
    for block_k, num_stages in itertools.product((64, 128, 256), (2, 3, 4, 5)):
        found.append(gt.gemv_config(M, N, K, size, num_sms, config.block_n, block_k, config.split_k,
                                    config.num_warps, config.block_m, num_stages))  # fmt: skip
    return [c for c in dict.fromkeys(found) if c != config]


def launch_label(config) -> str:
    return (f"m{config.block_m} n{config.block_n} k{config.block_k} split {config.split_k} warps {config.num_warps} "
            f"stages {config.num_stages}")  # fmt: skip


def gemv_candidates(M: int, K: int, N: int, num_sms: int, sweep: bool, weight_types: tuple[str, ...] = ("bf16", "int8"),
                    device: str = "cuda") -> list[tuple]:  # fmt: skip
    """What --gemv times for one shape: (label, weights, calls, bytes per call, reference, launch), where calls
    are zero-argument functions, one per copy of the weights, and reference is the fp32 result of copy 0; a
    Triton candidate's launch is its GemvConfig (in the sweep's refinement, new calls are made from it by
    `triton_calls`)."""
    import torch.nn.functional as F

    from qwen3.kernels import gemv_triton as gt
    from qwen3.quantize import quantize_per_row

    torch.manual_seed(0)
    w0 = torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5
    q0, s0 = quantize_per_row(w0)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    ws = [w0] + [w0.clone() for _ in range(max(1, min(63, L2_FLUSH_BYTES // (N * K * 2))))]
    qs = [q0] + [q0.clone() for _ in range(max(1, min(63, L2_FLUSH_BYTES // (N * K))))]
    qs = qs if "int8" in weight_types else []
    ref_bf16 = x.float() @ w0.float().T
    ref_int8 = (x.float() @ q0.float().T) * s0.float()
    bf16_bytes, int8_bytes = N * K * 2, N * K + N * 2
    counters = torch.zeros(1 << 16, dtype=torch.int32, device=device)  # one launch per call, as the modules run

    def linear(w):
        return lambda: F.linear(x, w)

    def transposed(w):  # cuBLAS on y^T = W x^T: N, not M, is the GEMM's long side (y left transposed)
        return lambda: torch.mm(w, x.T)

    def dequant(q):
        return lambda: F.linear(x, q.to(x.dtype)) * s0

    found = [("cuBLAS", "bf16", [linear(w) for w in ws], bf16_bytes, ref_bf16, "")]
    if M > 1:
        found.append(("cuBLAS W x^T", "bf16", [transposed(w) for w in ws], bf16_bytes, ref_bf16.T, ""))
    for weights, mats, nbytes, scale, ref in (("bf16", ws, bf16_bytes, None, ref_bf16),
                                              ("int8", qs, int8_bytes, s0, ref_int8)):  # fmt: skip
        if weights not in weight_types:
            continue
        size = mats[0].element_size()
        base = gt.gemv_config(M, N, K, size, num_sms)
        configs = [base] + (sweep_configs(M, K, N, size, num_sms, base) if sweep else [])

        def triton_calls(config, mats=mats, scale=scale):
            n = counters[: gt.gemv_tiles(M, N, config)]
            return [lambda m=m: gt.gemv(x, m, scale, config=config, counters=n) for m in mats]

        for i, config in enumerate(dict.fromkeys(configs)):
            label = "triton" if i == 0 else "triton (sweep)"
            found.append((label, weights, triton_calls, nbytes, ref, config))
    if "int8" in weight_types:
        found.append(("eager dequant (plain)", "int8", [dequant(q) for q in qs], int8_bytes, ref_int8, ""))
    return found


def gemv_benchmark(rows_list: list[int], sweep: bool, weight_types: tuple[str, ...] = ("bf16", "int8"),
                   budget: float = 1e9) -> None:  # fmt: skip
    """--gemv: Triton GEMV against cuBLAS on every Qwen3-0.6B projection shape, bf16 and int8 weight-only.
    With the sweep, each matrix's fastest launch shape is refined (K steps, pipelining) and printed; the sweep
    stops trying new shapes after `budget` seconds, shared out evenly among the (rows, matrix) pairs (cuBLAS and
    the defaults are always timed)."""
    import triton

    began = time.perf_counter()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"GEMV on {torch.cuda.get_device_name()} ({num_sms} SMs), torch {torch.__version__}, triton "
          f"{triton.__version__}; weights from DRAM (distinct copies overflow the L2), calls replayed from a "
          "CUDA graph")  # fmt: skip
    print("| rows | matrix | K x N | weights | kernel | us per call | GB/s | vs cuBLAS bf16 | max rel. err | launch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    step: dict[tuple[int, str], float] = {}  # (rows, kernel label) -> seconds of one decode step's GEMVs
    measured: dict[tuple[int, str], int] = {}  # (rows, kernel label) -> shapes measured

    def measure(calls, ref, replays):
        seconds = graph_seconds(calls, replays=replays)
        y = calls[0]().float()
        return seconds, ((y - ref).abs().max() / ref.abs().max()).item()

    def add(M, label, weights, per_step, seconds):
        key = (M, f"{label}, {weights}")
        step[key] = step.get(key, 0.0) + per_step * seconds
        measured[key] = measured.get(key, 0) + 1

    pairs = [(M, shape) for M in rows_list for shape in GEMV_SHAPES]
    for i, (M, (name, K, N, per_step)) in enumerate(pairs):
        share = (budget - (time.perf_counter() - began)) / (len(pairs) - i)  # this pair's seconds: 70% sweep,
        sweep_deadline, deadline = time.perf_counter() + 0.7 * share, time.perf_counter() + share  # 30% refinement
        cublas, best_sweep = None, {}
        for label, weights, calls, nbytes, ref, launch in gemv_candidates(M, K, N, num_sms, sweep, weight_types):
            swept = "sweep" in label
            if swept and time.perf_counter() > sweep_deadline:
                continue
            try:
                seconds, err = measure(calls(launch) if callable(calls) else calls, ref, 3 if swept else 10)
            except Exception as e:  # report and go on: one failure must not end the run
                first = str(e).splitlines()[0][:150] if str(e) else ""
                print(f"| {M} | {name} | {K} x {N} | {weights} | {label} | failed: {type(e).__name__} {first} "
                      f"| | | | {launch_label(launch) if launch else ''} |", flush=True)  # fmt: skip
                continue
            cublas = seconds if label == "cuBLAS" else cublas
            if label == "triton" or swept:  # the sweep's candidates include the default
                if weights not in best_sweep or seconds < best_sweep[weights][0]:
                    best_sweep[weights] = (seconds, err, launch, nbytes, calls, ref)
            if swept:
                continue
            print_gemv_row(M, name, K, N, weights, label, seconds, err, launch_label(launch) if launch else "",
                           nbytes, cublas)  # fmt: skip
            add(M, label, weights, per_step, seconds)
        if not sweep:
            continue
        for weights, (seconds, err, launch, nbytes, calls, ref) in best_sweep.items():
            for config in refine_configs(launch, M, K, N, 1 if weights == "int8" else 2, num_sms):
                if time.perf_counter() > deadline:
                    break
                try:
                    s, e = measure(calls(config), ref, 3)
                except Exception:  # a shape that does not fit (shared memory): skip
                    continue
                if s < seconds:
                    seconds, err, launch = s, e, config
            seconds, err = measure(calls(launch), ref, 10)  # the winner, timed as the defaults are
            print_gemv_row(M, name, K, N, weights, "triton, best of sweep", seconds, err, launch_label(launch),
                           nbytes, cublas)  # fmt: skip
            add(M, "triton, best of sweep", weights, per_step, seconds)
        torch.cuda.empty_cache()
    print("\nOne decode step's GEMVs (28 layers with q/k/v and gate/up fused, + LM head), and the tokens/s they alone "
          "would allow")  # fmt: skip
    print("| rows | kernel | ms per step | tokens/s ceiling |")
    print("|---|---|---|---|")
    for (M, label), seconds in step.items():
        if measured[(M, label)] == len(GEMV_SHAPES):  # a kernel that failed on some shape has no total
            print(f"| {M} | {label} | {seconds * 1e3:.3f} | {M / seconds:,.0f} |")
    print(f"\n--gemv took {time.perf_counter() - began:.0f} s")


def print_gemv_row(M, name, K, N, weights, label, seconds, err, launch, nbytes, cublas) -> None:
    gbps = (nbytes + (M * K + M * N) * 2) / seconds / 1e9  # weights (+ scales), x and y in bf16
    vs = f"{cublas / seconds:.2f}x" if cublas else "-"
    print(f"| {M} | {name} | {K} x {N} | {weights} | {label} | {seconds * 1e6:.1f} | {gbps:,.0f} | {vs} | {err:.1e} "
          f"| {launch} |", flush=True)  # fmt: skip


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same weight tensors (no memory): the two engines of --engine-gemv."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def decode_logits(model, prompt: torch.Tensor, steps: int, tokens: list | None = None) -> tuple[torch.Tensor, list]:
    """Logits (1 + steps, V), in fp32 or more, of the prompt's prefill and `steps` decode steps (one row each:
    the GEMV's M = 1 path), fed `tokens` (default: this model's own greedy tokens); and the tokens fed."""
    device, T = prompt.device, prompt.shape[1]
    cache = KVCache(model.config, 1, T + steps + 1, device=device, dtype=model.model.norm.weight.dtype)
    with torch.inference_mode():
        up = torch.promote_types(model.model.norm.weight.dtype, torch.float32)
        rows = [prefill(model, prompt, torch.tensor([T], device=device), cache).to(up)]
        fed = []
        for i in range(steps):
            token = tokens[i] if tokens is not None else rows[-1].argmax(-1)
            fed.append(token)
            rows.append(decode_one(model, token, torch.tensor([T + i], device=device), cache).to(up))
    return torch.cat(rows), fed


def gemv_logits_check(plain, gemv, reference, prompt: torch.Tensor, steps: int = 8) -> str:
    """One line: max |logit difference| of the GEMV model and of the plain model against `reference` (a copy of
    the same weights in more precision), and against each other, over decode steps and a 16-row forward."""
    ref_decode, tokens = decode_logits(reference, prompt, steps)
    with torch.inference_mode():
        rows16 = prompt[:, :16]
        ref16 = reference(rows16)[0]
        results = {}
        for name, model in (("plain", plain), ("gemv", gemv)):
            decode = decode_logits(model, prompt, steps, tokens)[0].to(ref_decode.dtype)
            full = model(rows16)[0].to(ref16.dtype)
            results[name] = (decode, full)
    scale = ref_decode.abs().max().item()
    precision = str(reference.model.norm.weight.dtype).removeprefix("torch.")

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item()

    plain_err = max(diff(results["plain"][0], ref_decode), diff(results["plain"][1], ref16))
    gemv_err = max(diff(results["gemv"][0], ref_decode), diff(results["gemv"][1], ref16))
    between = max(diff(results["gemv"][0], results["plain"][0]), diff(results["gemv"][1], results["plain"][1]))
    same = (results["gemv"][0].argmax(-1) == results["plain"][0].argmax(-1)).float().mean().item()
    verdict = "ok" if gemv_err <= 2 * plain_err + 1e-6 * scale else f"CHECK: further from {precision} than 2x plain"
    return (f"logits (prefill + {steps} decode steps, and a 16-row forward; max |logit| {scale:.2f}): max abs diff "
            f"gemv vs plain {between:.2e}; vs the {precision} copy: gemv {gemv_err:.2e}, plain {plain_err:.2e}; "
            f"same argmax {same:.0%} of decode steps: {verdict}")  # fmt: skip


def tiny_model(device: str) -> qwen3.Qwen3ForCausalLM:
    """--engine-gemv's dry run: a random 2-layer model in the real one's shape ratios."""
    torch.manual_seed(0)
    config = qwen3.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                               max_position_embeddings=2048)  # fmt: skip
    model = qwen3.Qwen3ForCausalLM(config)
    model.init_weights(std=0.1)
    return model.to(device).eval()


def engine_gemv_benchmark(directory: Path | None, device: str, dtype_name: str, new_tokens: int, max_rows: int,
                          rounds: int = 3) -> list[str]:  # fmt: skip
    """--engine-gemv: batch-1 tokens/s of the engine, plain and with use_gemv, for float and int8 weights; the
    logits check of each. Returns the markdown lines; a part that fails is reported and the rest still runs."""
    gpu = device.startswith("cuda")
    vocab = 151936 if directory is not None else 512
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    machine = torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU, dry run (Triton interpreter)"
    lines = [f"### Engine at batch 1, cuBLAS vs the Triton GEMV (use_gemv, <= {max_rows} rows), 32-token prompt, "
             f"{new_tokens} new tokens ({machine}, torch {torch.__version__}, {datetime.date.today()})", "",
             "| weights | projections | tokens/s | ms/token | vs plain | of bandwidth ceiling | GB/token | "
             "engine build s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    notes: list[str] = []
    for int8 in (False, True):
        label = f"{dtype_name} int8 weights" if int8 else dtype_name
        try:
            engine_gemv_variant(directory, device, dtype_name, int8, prompt, new_tokens, max_rows, rounds, lines,
                                notes)  # fmt: skip
        except Exception as error:  # report and go on: the other weight type still runs
            lines.append(f"| {label} | failed: {failure(error)} | | | | | | |")
        if gpu:
            torch.cuda.empty_cache()
    return [*lines, "", *notes]


def failure(error: Exception) -> str:
    """The traceback on stderr; one line for the table."""
    import traceback

    traceback.print_exception(error)
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__} {first}".strip()


def engine_gemv_variant(directory: Path | None, device: str, dtype_name: str, int8: bool, prompt: torch.Tensor,
                        new_tokens: int, max_rows: int, rounds: int, lines: list[str],
                        notes: list[str]) -> None:  # fmt: skip
    """One weight type of --engine-gemv: appends its table rows to `lines` and its checks to `notes`."""
    from qwen3.engine import LLM
    from qwen3.kernels.gemv_linear import use_gemv
    from qwen3.quantize import quantize_int8

    gpu = device.startswith("cuda")
    dtype = getattr(torch, dtype_name)
    label = f"{dtype_name} int8 weights" if int8 else dtype_name
    model = qwen3.load_model(directory, device=device, dtype=dtype) if directory else tiny_model(device).to(dtype)
    if int8:
        quantize_int8(model)
    nbytes = bytes_per_token(model)
    fast = shared_copy(model)  # the same weight tensors, behind the GEMV
    swapped = use_gemv(fast, max_rows=max_rows, allow_cpu=not gpu)
    layers_only = shared_copy(model)  # the LM head stays on cuBLAS (it streams near the bandwidth limit there)
    use_gemv(layers_only, max_rows=max_rows, allow_cpu=not gpu, lm_head=False)
    print(f"[{label}] {swapped} modules on the GEMV path; bytes per token {nbytes / 1e9:.3f} GB", flush=True)
    try:  # the same weights in more precision (fp32; fp64 for an fp32 model), for the logits check
        reference = copy.deepcopy(model).to(torch.float64 if dtype == torch.float32 else torch.float32)
        notes.append(f"{label}: {gemv_logits_check(model, fast, reference, prompt)}")
        del reference
    except Exception as error:
        notes.append(f"{label}: logits check failed: {failure(error)}")
    print(f"[{label}] {notes[-1]}", flush=True)

    ids = prompt[0].tolist()
    params = qwen3.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    plain_name = ("dequantise + cuBLAS" if int8 else "cuBLAS") if gpu else "plain (CPU)"
    engines, build, outputs = {}, {}, {}
    for name, m in ((plain_name, model), ("Triton GEMV", fast), ("Triton GEMV, LM head plain", layers_only)):
        try:
            sync(device)
            start = time.perf_counter()
            llm = LLM(m, max_num_seqs=1, max_model_len=1024, kv_cache_tokens=2048, enable_prefix_caching=False,
                      gemv=False)  # each variant swaps its own modules (or not)
            sync(device)
            build[name] = time.perf_counter() - start
            outputs[name] = llm.generate([ids], params, use_tqdm=False)[0].token_ids  # and the warm-up
            engines[name] = llm
        except Exception as error:
            lines.append(f"| {label} | {name}: failed: {failure(error)} | | | | | | |")
    if plain_name in outputs:
        for name, tokens in outputs.items():
            if name != plain_name:
                same = next((i for i, (a, b) in enumerate(zip(outputs[plain_name], tokens, strict=True)) if a != b),
                            new_tokens)  # fmt: skip
                notes.append(f"{label}: greedy tokens of {name} identical to {plain_name}'s for the first {same} of "
                             f"{new_tokens}")  # fmt: skip
                print(f"[{label}] {notes[-1]}", flush=True)
    best = dict.fromkeys(engines, 0.0)
    for r in range(rounds):  # the engines take turns: a drifting clock or a busy neighbour slows both alike
        for name, llm in engines.items():
            sync(device)
            start = time.perf_counter()
            out = llm.generate([ids], params, use_tqdm=False)[0]
            sync(device)
            rate = len(out.token_ids) / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
            print(f"[{label}] round {r + 1}: {name} {rate:.1f} tokens/s", flush=True)
    for name, rate in best.items():
        ceiling = f"{rate * nbytes / H200_COPY_BANDWIDTH:.0%}" if gpu else "-"
        versus = f"{rate / best[plain_name]:.2f}x" if plain_name in best else "-"
        lines.append(f"| {label} | {name} | {rate:.1f} | {1e3 / rate:.3f} | {versus} | {ceiling} | "
                     f"{nbytes / 1e9:.3f} | {build[name]:.1f} |")  # fmt: skip


def engine_gemv_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--engine-gemv: on CUDA the random-init 0.6B (bf16 by default); on the CPU a dry run (tiny model, fp32,
    the Triton kernel interpreted, which must be switched on before triton is first imported)."""
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        parser.error("--engine-gemv --device cuda: no CUDA GPU here (--device cpu for the dry run)")
    if args.gemv_max_rows < 1:
        parser.error(f"--gemv-max-rows {args.gemv_max_rows}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = None
    if gpu:
        directory = args.checkpoint or Path(tempfile.mkdtemp()) / "qwen3-0.6b-random"
        if not (directory / "model.safetensors").exists():
            make_checkpoint(directory)
    else:
        import os
        import sys

        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--engine-gemv --device cpu: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import fix_triton_interpreter_scalars  # Triton 3.6's interpreter vs NumPy 2

        fix_triton_interpreter_scalars()
    dtype_name = (args.dtypes or ("bfloat16" if gpu else "float32")).split(",")[0]
    new_tokens = args.new_tokens or (256 if gpu else 8)
    lines = engine_gemv_benchmark(directory, args.device, dtype_name, new_tokens, args.gemv_max_rows)
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None, help="256 on GPU, 128 on CPU")
    parser.add_argument("--dtypes", default=None, help="comma list; GPU default bfloat16, CPU float32,bfloat16")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-engine-cublas", action="store_true",
                        help="with --engine-compile: only the engines with the Triton GEMV (the default on CUDA), not "
                        "the compiled engine on cuBLAS projections (minutes of compiling less)")  # fmt: skip
    parser.add_argument("--skip-compile-peer", action="store_true")
    parser.add_argument("--skip-fast-path", action="store_true",
                        help="GPU: skip the compile-based qwen3.generate rows (the engine row stays)")  # fmt: skip
    parser.add_argument("--engine-compile", action="store_true",
                        help="GPU: also the engine at batch 1 with LLM(compile=True) (minutes to compile)")  # fmt: skip
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--checkpoint", type=Path, help="reuse a saved random 0.6B checkpoint")
    parser.add_argument("--speculative-model", default="demo", help="trained model for the speculative test")
    parser.add_argument("--speculative-text", type=Path, default=Path("data/shakespeare/heldout/hamlet.txt"))
    parser.add_argument("--cpu", action="store_true", help="CPU int8 kernels vs fp32 vs transformers (2 threads)")
    parser.add_argument("--gemv", action="store_true", help="CUDA: Triton GEMV vs cuBLAS on the 0.6B projections")
    parser.add_argument("--gemv-rows", default="1,16", help="comma list of rows (tokens) for --gemv")
    parser.add_argument("--gemv-sweep", action="store_true", help="--gemv: also try a few launch shapes")
    parser.add_argument("--gemv-weights", default="bf16,int8", help="--gemv: comma list of weight types")
    parser.add_argument("--gemv-budget", type=float, default=1e9, help="--gemv-sweep: seconds before it stops")
    parser.add_argument("--engine-gemv", action="store_true",
                        help="the engine at batch 1 with and without use_gemv, bf16 and int8 (CUDA; --device cpu: "
                             "a dry run on a tiny model under Triton's interpreter)")  # fmt: skip
    parser.add_argument("--gemv-max-rows", type=int, default=16, help="--engine-gemv: use_gemv's max_rows")
    args = parser.parse_args()
    if args.engine_gemv:
        engine_gemv_main(args, parser)
        return
    if args.gemv:
        if not torch.cuda.is_available():
            parser.error("--gemv needs a CUDA GPU")
        gemv_benchmark([int(r) for r in args.gemv_rows.split(",")], args.gemv_sweep,
                       tuple(args.gemv_weights.split(",")), args.gemv_budget)
        return
    if args.cpu:
        args.device, args.threads = "cpu", args.threads or 2
    device = args.device
    gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (256 if gpu else 64 if args.cpu else 128)
    dtypes = (args.dtypes or ("bfloat16" if gpu else "float32,bfloat16")).split(",")
    directory = args.checkpoint or Path(tempfile.mkdtemp()) / "qwen3-0.6b-random"
    if not (directory / "model.safetensors").exists():
        make_checkpoint(directory)
    prompt = torch.randint(0, 151936, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)

    rows: list[tuple[str, str, float, float, float]] = []  # (engine, variant, tok/s, warm-up s, bytes/token)
    if args.cpu:
        rows, dtypes = cpu_int8_kernels(directory, prompt, new_tokens), []
    for name in dtypes:
        dtype = getattr(torch, name)
        model = qwen3.load_model(directory, device=device, dtype=dtype)
        nbytes = bytes_per_token(model)
        print(f"[{name}] bytes per token {nbytes / 1e9:.3f} GB", flush=True)
        tps, warm = time_qwen3(model, prompt, new_tokens, device)
        rows.append(("qwen3", f"{name} eager", tps, warm, nbytes))
        print(rows[-1], flush=True)
        if gpu and not args.skip_fast_path:
            tps, warm = time_qwen3(model, prompt, new_tokens, device, compile=True)
            rows.append(("qwen3", f"{name} fast path (compile + CUDA graph)", tps, warm, nbytes))
            print(rows[-1], flush=True)
            err, same = fast_path_agreement(model, prompt, device)
            print(f"fast path vs plain: logits rel err {err:.2e}; identical greedy prefix {same:.0%} of 64 tokens")
        if gpu:
            long_prompt = torch.randint(0, 151936, (1, 512), generator=torch.Generator().manual_seed(1)).to(device)
            ttft = time_to_first_token(model, long_prompt, device)
            print(f"qwen3 time to first token, 512-token prompt: {ttft * 1e3:.1f} ms")
            tps, build, ttft, same = time_engine(model, prompt, new_tokens, device, persistent_decode=False)
            rows.append(("qwen3", f"{name} engine, batch 1 (CUDA graph, paged kernels, persistent_decode=False)", tps,
                         build, nbytes))  # fmt: skip
            print(rows[-1], flush=True)
            print(f"engine at batch 1 without the persistent kernel: greedy tokens shared with qwen3.generate before "
                  f"the first difference: {same:.0%} of 64")  # fmt: skip
            tps, build, ttft, same = time_engine(model, prompt, new_tokens, device)
            rows.append(("qwen3", f"{name} engine, batch 1 (default: one persistent kernel per token)", tps, build,
                         nbytes))  # fmt: skip
            print(rows[-1], flush=True)
            print(f"engine at batch 1: time to first token of a 512-token prompt {ttft * 1e3:.1f} ms; greedy tokens "
                  f"shared with qwen3.generate before the first difference: {same:.0%} of 64")  # fmt: skip
            if args.engine_compile and not args.skip_engine_cublas:
                tps, build, ttft, same = time_engine(model, prompt, new_tokens, device, compile=True)
                rows.append(("qwen3", f"{name} engine, batch 1, compile=True", tps, build, nbytes))
                print(rows[-1], flush=True)
                print(f"compiled engine at batch 1: time to first token of a 512-token prompt {ttft * 1e3:.1f} ms; "
                      f"greedy tokens shared with qwen3.generate: {same:.0%} of 64")  # fmt: skip
            if args.engine_compile:
                tps, build, ttft, same = time_engine(model, prompt, new_tokens, device, compile=True, gemv=True)
                rows.append(("qwen3", f"{name} engine, batch 1, compile=True, Triton GEMV", tps, build, nbytes))
                print(rows[-1], flush=True)
                print(f"compiled engine + GEMV at batch 1: time to first token of a 512-token prompt {ttft * 1e3:.1f} "
                      f"ms; greedy tokens shared with qwen3.generate: {same:.0%} of 64")  # fmt: skip
        try:
            from qwen3.quantize import quantize_int8

            quantize_int8(model)
            nbytes_q = bytes_per_token(model)
            if gpu and args.engine_compile:  # int8 weights through the same engine and GEMV kernel
                tps, build, ttft, same = time_engine(model, prompt, new_tokens, device, compile=True, gemv=True)
                rows.append(("qwen3", f"{name} int8 weights engine, batch 1, compile=True, Triton GEMV", tps, build,
                             nbytes_q))  # fmt: skip
                print(rows[-1], flush=True)
            fast = gpu and not args.skip_fast_path
            tps, warm = time_qwen3(model, prompt, new_tokens, device, compile=fast)
            rows.append(("qwen3", f"{name} int8 weights{' fast path' if fast else ''}", tps, warm, nbytes_q))
            print(rows[-1], flush=True)
        except ImportError:
            pass
        del model
        if not args.skip_peer:
            from transformers import Qwen3ForCausalLM

            ref = Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
            tps, warm = time_transformers(ref, prompt, new_tokens, device)
            rows.append(("transformers", f"{name} dynamic cache", tps, warm, nbytes))
            print(rows[-1], flush=True)
            if gpu and not args.skip_compile_peer:
                # transformers compiles the forward itself (reduce-overhead) when generate uses a static cache
                tps, warm = time_transformers(ref, prompt, new_tokens, device, cache_implementation="static")
                rows.append(("transformers", f"{name} static cache + compile", tps, warm, nbytes))
                print(rows[-1], flush=True)
            del ref

    cpu = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    machine = torch.cuda.get_device_name() if gpu else cpu
    peer = {r[1].split()[0]: r[2] for r in rows if r[0] == "transformers" and "dynamic" in r[1]}
    lines = [
        f"### Decode, batch 1, 32-token prompt, {new_tokens} new tokens ({machine}, {datetime.date.today()})",
        "",
        "| engine | variant | tokens/s | warm-up s | GB/token | of bandwidth ceiling | vs transformers (same dtype) |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, variant, tps, warm, nbytes in rows:
        ceiling = f"{tps * nbytes / H200_COPY_BANDWIDTH:.0%}" if gpu else "-"
        ratio = peer.get(variant.split()[0])
        lines.append(f"| {engine} | {variant} | {tps:.1f} | {warm:.1f} | {nbytes / 1e9:.3f} | {ceiling} | "
                     f"{tps / ratio:.2f}x |" if ratio else f"| {engine} | {variant} | {tps:.1f} | {warm:.1f} | "
                     f"{nbytes / 1e9:.3f} | {ceiling} | - |")  # fmt: skip
    if args.speculative_text.is_file() and not args.cpu:
        from qwen3.hub import resolve_source

        lines += ["", speculative_speedup(resolve_source(args.speculative_model), args.speculative_text, device)]
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
