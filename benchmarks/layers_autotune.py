"""The decode step's layers without the attention kernel, compiled by inductor as the engine compiles them
(LLM(compile=True)) and with inductor's tuning switched on, timed in CUDA graphs at the engine's batch sizes.

Why: at 16-256 rows a compiled decode step spends ~0.8 ms in 112 cuBLAS GEMMs of 5-8 us each (a floor of launch,
ramp and too few output tiles, not the bandwidth) and ~0.45 ms in inductor's fused elementwise kernels
(benchmarks/NOTES.md). `max_autotune_gemm` lets inductor time its Triton GEMM templates (other tile shapes, and
the residual adds fused into their epilogues) against cuBLAS per shape; `coordinate_descent_tuning` tunes the
launch of each fused elementwise / norm kernel. This script answers whether either is worth its compile time
before the engine is changed.

The model is random-init Qwen3-0.6B in bf16 cut to --layers layers (4 x 31 MB of weights: more than the H200's
50 MB L2, so the weights stream from memory as in the real step), run as `model.hidden_states` on (1, S) tokens
with an attention backend that skips the paged kernels (the query comes back as the attention's output; k and v
are kept alive by a zero-weighted term, as the real step stores them). Each variant x batch size is compiled with
static shapes, captured in a CUDA graph, replayed; the table gives microseconds per layer and the whole step's
layers (x 28). Last, the kernels of one replay at the largest batch size, per variant (torch.profiler).

`--forms` adds a second axis: the first step of each layer's attention as the model writes it ("plain": the model's
QKNormRoPE, which inductor compiles into a kernel for q and one for k, then the key/value store op) or "fused" (the
engine's qk_norm_rope_store: one Triton kernel for all of it). The eager outputs of the two are compared first.
`combo` (a variant) asks inductor to launch independent kernels, such as q's and k's norm + RoPE, as one.

    python benchmarks/layers_autotune.py                    # CUDA (~4 minutes on an H200)
    python benchmarks/layers_autotune.py --variants default --forms plain,fused   # one kernel for norm, RoPE, store
    python benchmarks/layers_autotune.py --device cpu --layers 1 --batches 4 --variants default   # dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time

import torch

import qwen3
from qwen3.engine.attention import qk_arguments
from qwen3.engine.compiled import REFERENCE_OPS, triton_custom_ops

VARIANTS = {
    "default": {},
    "cdt": {"coordinate_descent_tuning": True},
    "autotune": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "autotune+cdt": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                     "coordinate_descent_tuning": True},  # fmt: skip
    "autotune-tma": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                     "triton.enable_persistent_tma_matmul": True},  # fmt: skip
    "combo": {"combo_kernels": True},  # independent kernels (q's and k's norm + RoPE, say) in one launch
    "cublaslt": {},  # not inductor's: torch's GEMMs through cublasLt's heuristic instead of cuBLAS (BLAS_LIBRARY)
}
BLAS_LIBRARY = {"cublaslt": "cublaslt"}  # torch.backends.cuda.preferred_blas_library per variant (default: torch's)
FULL_LAYERS = 28  # Qwen3-0.6B


class NoAttention:
    """An attention backend that stores k and v into a small pool as the engine's compiled step does and returns the
    finished q as the attention's output (no paged attention kernel). `form`: "plain" applies the model's QKNormRoPE
    (inductor compiles it into one kernel for q and one for k) and then the store op; "fused" calls the engine's
    qk_norm_rope_store op, one kernel for all of it (CUDA only)."""

    def __init__(self, form: str, ops, kv: torch.Tensor, slots: torch.Tensor) -> None:  # noqa: ANN001
        self.form, self.ops, self.kv, self.slots = form, ops, kv, slots

    def attend(self, layer, q, k, v, positions, math, qk):  # noqa: ANN001, ANN201 - model.AttentionBackend's
        if self.form == "fused":
            q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # (N, heads, D) views of the qkv projection
            q = self.ops.qk_norm_rope_store(q, k, v, positions[0], *qk_arguments(qk), self.kv, layer, self.slots)
            return q.transpose(0, 1)[None]
        q, k = qk(q, k, positions)
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))
        self.ops.store_kv_pool(k, v, self.kv, layer, self.slots)
        return q.transpose(0, 1)[None]


FORMS = ("plain", "fused")


def make_backend(model: qwen3.Qwen3ForCausalLM, form: str, rows: int, device: str) -> NoAttention:
    """A NoAttention whose pool holds `rows` tokens, written to slots in a random order."""
    cfg = model.config
    ops = triton_custom_ops() if device == "cuda" else REFERENCE_OPS
    blocks = -(-rows // 16)
    kv = torch.zeros(2, cfg.num_hidden_layers, blocks, 16, cfg.num_key_value_heads, cfg.head_dim,
                     dtype=model.model.norm.weight.dtype, device=device)  # fmt: skip
    slots = torch.randperm(blocks * 16, device=device)[:rows].to(torch.int32)
    return NoAttention(form, ops, kv, slots)


def form_difference(model: qwen3.Qwen3ForCausalLM, form: str, device: str) -> tuple[float, float]:
    """max |form - plain| of the eager hidden states and of the stored pool, for 8 random tokens."""
    tokens = torch.randint(0, model.config.vocab_size, (1, 8), device=device)
    positions = torch.randint(100, 2000, (1, 8), device=device)
    plain, other = make_backend(model, "plain", 8, device), make_backend(model, form, 8, device)
    other.slots = plain.slots
    with torch.no_grad():
        a = model.hidden_states(tokens, positions, plain).float()
        b = model.hidden_states(tokens, positions, other).float()
    return (a - b).abs().max().item(), (plain.kv.float() - other.kv.float()).abs().max().item()


def make_model(layers: int, device: str) -> qwen3.Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = dataclasses.replace(qwen3.Qwen3Config.from_preset("0.6B"), num_hidden_layers=layers)
    model = qwen3.Qwen3ForCausalLM(config).to(device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    model.init_weights()
    return model.eval()


def seconds(call, device: str, replays: int = 50) -> float:  # noqa: ANN001 - a zero-argument callable
    """Seconds per call: replays of one CUDA graph on CUDA (as the engine runs a decode step), a loop on CPU."""
    if device == "cuda":
        from kernels import graph_seconds  # benchmarks/kernels.py (this script's folder is on sys.path)

        return graph_seconds([call], replays=replays)
    call()
    start = time.perf_counter()
    for _ in range(3):
        call()
    return (time.perf_counter() - start) / 3


def kernel_table(call, top: int = 14) -> str:  # noqa: ANN001
    """The CUDA kernels of 5 graph replays of `call`, by total time (torch.profiler)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    lines = ["| kernel | calls per replay | us per call | us per replay |", "|---|---|---|---|"]
    for e in rows[:top]:
        lines.append(f"| `{e.key[:90]}` | {e.count / 5:g} | {e.device_time_total / e.count:.2f} | "
                     f"{e.device_time_total / 5:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="256,128,64,16,2", help="decode batch sizes (rows), comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--forms", default="plain", help=f"comma-separated, of {', '.join(FORMS)}: QK-norm, RoPE and "
                        "the key/value store as the model + the store op, or the engine's fused kernel")  # fmt: skip
    parser.add_argument("--budget", type=float, default=420, help="seconds: no new compile starts after this")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    variants, forms = args.variants.split(","), args.forms.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}")
    if unknown := set(forms) - set(FORMS):
        parser.error(f"--forms: unknown {sorted(unknown)}")
    start = time.perf_counter()
    model = make_model(args.layers, args.device)
    default_blas = torch.backends.cuda.preferred_blas_library() if args.device == "cuda" else None
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {datetime.date.today()}, {where}, "
          f"torch {torch.__version__}: layers_autotune.py --layers {args.layers}")  # fmt: skip
    for form in forms:
        if form != "plain":  # the same arithmetic, in one kernel: equal up to the rounding of fp32 sums
            hidden, pool = form_difference(model, form, args.device)
            print(f"{form}: max |{form} - plain| of the eager hidden states {hidden}, of the stored keys/values {pool}")
    per_layer: dict[str, dict[int, float]] = {}
    tables: dict[str, str] = {}
    for form in forms:
        for variant in variants:
            label = variant if form == "plain" else f"{variant}, {form}"
            torch._dynamo.reset()  # inductor's settings are not guarded: a new variant must compile afresh
            compiled = torch.compile(model.hidden_states, fullgraph=True, dynamic=False)
            per_layer[label] = {}
            if args.device == "cuda":
                torch.backends.cuda.preferred_blas_library(BLAS_LIBRARY.get(variant, default_blas))
            with torch._inductor.config.patch(VARIANTS[variant]), torch.no_grad():
                for S in batches:
                    if time.perf_counter() - start > args.budget:
                        print(f"(budget: {label} at {S} rows not run)", flush=True)
                        continue
                    t0 = time.perf_counter()
                    tokens = torch.randint(0, model.config.vocab_size, (1, S), device=args.device)
                    positions = torch.randint(100, 2000, (1, S), device=args.device)
                    backend = make_backend(model, form, S, args.device)

                    def call(tokens=tokens, positions=positions, compiled=compiled, backend=backend):  # noqa: ANN001, ANN202
                        return compiled(tokens, positions, backend)

                    t = per_layer[label][S] = seconds(call, args.device) / args.layers
                    if args.device == "cuda" and S == batches[0]:  # before the next variant's reset
                        tables[label] = kernel_table(call)
                    print(f"RESULT {label} {S} rows: {t * 1e6:.1f} us per layer, {t * FULL_LAYERS * 1e3:.3f} ms "
                          f"per {FULL_LAYERS} layers (compiled and timed in {time.perf_counter() - t0:.0f} s)",
                          flush=True)  # fmt: skip
    cells = " | ".join(f"{S} rows: us/layer (step ms)" for S in batches)
    header = f"| variant (ratios: against the first row) | {cells} |"
    print("\n" + header + "\n|---|" + "---|" * len(batches))
    base_label = next(iter(per_layer), None)  # the first form and variant run
    base = per_layer.get(base_label, {})
    for variant, times in per_layer.items():
        cells = []
        for S in batches:
            if S not in times:
                cells.append("-")
                continue
            t = times[S]
            ratio = f", x{base[S] / t:.2f}" if S in base and variant != base_label else ""
            cells.append(f"{t * 1e6:.1f} ({t * FULL_LAYERS * 1e3:.3f}{ratio})")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    for variant, table in tables.items():
        print(f"\nkernels of {variant} at {batches[0]} rows ({args.layers} layers):\n{table}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
