"""LLM(compile=True) against the eager engine on the steps that compile=True now also covers: one prefill step of
max_num_batched_tokens tokens, and decode at batch 1 and 8 (the small graph buckets); plus start-up and the number of
dynamo compiles (expected: 3 with compile=True, 0 without).

    python benchmarks/compiled_engine.py                 # CUDA: random-init Qwen3-0.6B in bf16 (~5 minutes)
    python benchmarks/compiled_engine.py --device cpu    # a dry run of this script: a tiny model; the CPU engine
                                                         # refuses compile=True, so the runner's switch is set
                                                         # (its times mean nothing: the reference attention pads
                                                         # every step to the compiled step's fixed bounds)

Prefill: 16 prompts of 1,024 fresh random tokens (no prefix cache), max_tokens 1: one step of 16,384 tokens plus
its sampling; the best of 3. Decode: a 32-token prompt and 256 new tokens (ignore_eos), seconds / 256 per token;
the best of 3 after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import qwen3
from qwen3.engine import LLM
from qwen3.sampling import SamplingParams


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(n: int, device: str, fn) -> float:  # noqa: ANN001 - a callable
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model, device: str, compile: bool, sizes: dict) -> dict:  # noqa: ANN001 - a Qwen3ForCausalLM
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cpu = device == "cpu"
    sync(device)
    start = time.perf_counter()
    llm = LLM(model, max_num_seqs=sizes["max_num_seqs"], max_model_len=sizes["max_model_len"],
              max_num_batched_tokens=sizes["chunk"], kv_cache_tokens=4 * sizes["chunk"], enable_prefix_caching=False,
              compile=compile and not cpu)  # fmt: skip
    if compile and cpu:  # the internal switch (tests do the same): the step forward only, the CPU has no graphs
        llm.config.compile = True
        llm.runner.compile_step_forward()
    sync(device)
    startup = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt_len, num_prompts = sizes["prompt"], sizes["chunk"] // sizes["prompt"]
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def prefill() -> None:
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(num_prompts)]
        llm.generate(prompts, one, use_tqdm=False)

    prefill()  # warm-up
    row = {"startup": startup, "prefill": best_of(3, device, prefill)}
    new = sizes["new_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    for batch in (1, 8):
        prompts = [torch.randint(0, vocab, (32,), generator=gen).tolist() for _ in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        row[f"decode{batch}"] = best_of(3, device, lambda p=prompts: llm.generate(p, params, use_tqdm=False)) / new
    row["compiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    if cuda:
        config, dtype = qwen3.Qwen3Config.from_preset("0.6B"), torch.bfloat16
        sizes = dict(max_num_seqs=256, max_model_len=4096, chunk=16384, prompt=1024, new_tokens=256)
    else:
        config = qwen3.Qwen3Config.from_preset("0.6B", vocab_size=512, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, max_position_embeddings=1024)  # fmt: skip
        dtype = torch.float32
        sizes = dict(max_num_seqs=8, max_model_len=512, chunk=256, prompt=64, new_tokens=16)
    model = qwen3.Qwen3ForCausalLM(config).to(dtype)
    model.init_weights()
    model = model.to(args.device).eval()
    name = "random-init Qwen3-0.6B, bf16" if cuda else "tiny random model, fp32 (dry run)"
    print(f"{name} on {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}", flush=True)
    lines = [f"| engine | start-up s | dynamo compiles | prefill step of {sizes['chunk']} tokens, ms | "
             "batch 1, ms per token | batch 8, ms per step |", "|---|---|---|---|---|---|"]  # fmt: skip
    for compile in (False, True):
        row = measure(model, args.device, compile, sizes)
        gc.collect()  # the engine and its pool go before the next one is built
        if cuda:
            torch.cuda.empty_cache()
        name = "compile=True" if compile else "eager layers"
        lines.append(f"| {name} | {row['startup']:.1f} | {row['compiles']} | {1e3 * row['prefill']:.1f} | "
                     f"{1e3 * row['decode1']:.2f} | {1e3 * row['decode8']:.2f} |")  # fmt: skip
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
