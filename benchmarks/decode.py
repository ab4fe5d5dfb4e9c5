"""Single-stream decode speed: qwen3 (eager, fast path, int8) against transformers, in one process, on the
same random-init Qwen3-0.6B checkpoint (no download).

Two numbers first (see benchmarks/NOTES.md): bytes read per generated token and the memory bandwidth.
At batch 1 every weight is read once per token, so the ceiling is bandwidth / bytes-per-token.

    python benchmarks/decode.py --device cuda [--results benchmarks/RESULTS.md]   # H200: bf16
    python benchmarks/decode.py --device cpu --threads 2                         # CPU: fp32, bf16, int8
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

import qwen3
from qwen3.generate import prefill
from qwen3.model import KVCache

H200_COPY_BANDWIDTH = 4.27e12  # bytes/s, device-to-device copy measured on the lent H200 (KINDS.md)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None, help="256 on GPU, 128 on CPU")
    parser.add_argument("--dtypes", default=None, help="comma list; GPU default bfloat16, CPU float32,bfloat16")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-compile-peer", action="store_true")
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--checkpoint", type=Path, help="reuse a saved random 0.6B checkpoint")
    parser.add_argument("--speculative-model", default="demo", help="trained model for the speculative test")
    parser.add_argument("--speculative-text", type=Path, default=Path("data/shakespeare/heldout/hamlet.txt"))
    args = parser.parse_args()
    device = args.device
    gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (256 if gpu else 128)
    dtypes = (args.dtypes or ("bfloat16" if gpu else "float32,bfloat16")).split(",")
    directory = args.checkpoint or Path(tempfile.mkdtemp()) / "qwen3-0.6b-random"
    if not (directory / "model.safetensors").exists():
        make_checkpoint(directory)
    prompt = torch.randint(0, 151936, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)

    rows: list[tuple[str, str, float, float, float]] = []  # (engine, variant, tok/s, warm-up s, bytes/token)
    for name in dtypes:
        dtype = getattr(torch, name)
        model = qwen3.load_model(directory, device=device, dtype=dtype)
        nbytes = bytes_per_token(model)
        print(f"[{name}] bytes per token {nbytes / 1e9:.3f} GB", flush=True)
        tps, warm = time_qwen3(model, prompt, new_tokens, device)
        rows.append(("qwen3", f"{name} eager", tps, warm, nbytes))
        print(rows[-1], flush=True)
        if gpu:
            tps, warm = time_qwen3(model, prompt, new_tokens, device, compile=True)
            rows.append(("qwen3", f"{name} fast path (compile + CUDA graph)", tps, warm, nbytes))
            print(rows[-1], flush=True)
            err, same = fast_path_agreement(model, prompt, device)
            print(f"fast path vs plain: logits rel err {err:.2e}; identical greedy prefix {same:.0%} of 64 tokens")
            long_prompt = torch.randint(0, 151936, (1, 512), generator=torch.Generator().manual_seed(1)).to(device)
            ttft = time_to_first_token(model, long_prompt, device)
            print(f"qwen3 time to first token, 512-token prompt: {ttft * 1e3:.1f} ms")
        try:
            from qwen3.quantize import quantize_int8

            quantize_int8(model)
            nbytes_q = bytes_per_token(model)
            tps, warm = time_qwen3(model, prompt, new_tokens, device, compile=gpu)
            rows.append(("qwen3", f"{name} int8 weights{' fast path' if gpu else ''}", tps, warm, nbytes_q))
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
    if args.speculative_text.is_file():
        from qwen3.hub import resolve_source

        lines += ["", speculative_speedup(resolve_source(args.speculative_model), args.speculative_text, device)]
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
