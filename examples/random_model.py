"""Build a small random-init Qwen3 (the real architecture, untrained weights), save it in Hugging Face's
layout, load it back and greedy-generate. The output tokens are meaningless: the weights are random.

    python examples/random_model.py
"""

from __future__ import annotations

import tempfile
import time

import torch

import qwen3


def main() -> None:
    torch.manual_seed(0)
    config = qwen3.Qwen3Config.from_preset("0.6B", num_hidden_layers=4, hidden_size=256, intermediate_size=768,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip
    model = qwen3.Qwen3ForCausalLM(config)
    model.init_weights()
    print(f"random-init Qwen3: {config.num_hidden_layers} layers, {model.num_parameters():,} parameters")
    with tempfile.TemporaryDirectory() as directory:
        qwen3.save_model(model, directory)
        model = qwen3.load_model(directory)
    prompt = torch.tensor([[9707, 11, 1879, 0]])  # "Hello, world!" in the Qwen3 vocabulary
    start = time.perf_counter()
    new = qwen3.generate(model, prompt, max_new_tokens=32, temperature=0.0)
    seconds = time.perf_counter() - start
    print(f"greedy continuation (random weights, so random tokens): {new[0].tolist()}")
    print(f"{new.shape[1]} tokens in {seconds:.2f} s")


if __name__ == "__main__":
    main()
