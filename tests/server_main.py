"""A test server process: the real app and engine (qwen3.AsyncLLM over qwen3.LLM, CPU) on 127.0.0.1 and a free port.

    python tests/server_main.py --spec spec.json [--api-key K] [--max-waiting N] [--max-num-seqs N]

The model is `Scripted`: a tiny Qwen3 (the demo model's tokenizer) whose logits put the maximum on a
chosen next token. Its table maps (position, current token) to the next token; `spec.json` lists chat
requests and the reply each should get: the script is laid out at the positions after that request's
prompt, which this process renders with the server's own code, so tests choose the exact completion.
Any other (position, token) continues with a fixed pseudo-random plain token, so unscripted requests are
deterministic, never end early, and differ by prompt. With `--model demo` it serves the demo model instead.
The banner line `... on http://127.0.0.1:PORT ...` on stdout says where it listens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from qwen3 import Qwen3Config, Qwen3ForCausalLM, load_tokenizer
from qwen3.engine import LLM, AsyncLLM
from qwen3.hub import DEMO_DIR
from qwen3.server.protocol import ChatCompletionRequest
from qwen3.server.serving import ServingContext, render_chat_prompt

PLAIN_TOKENS = 4000  # the demo vocabulary's added tokens (<|im_end|>, <think>, ...) all sit above this


class Scripted(Qwen3ForCausalLM):
    """Greedy continuation from a (position, token) -> next token table; see the module docstring."""

    def __init__(
        self,
        vocab_size: int,
        table: dict[tuple[int, int], int],
        step_delay: float = 0.0,
        crash: set[tuple[int, int]] = frozenset(),
    ) -> None:
        config = Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        super().__init__(config)
        self.table, self.step_delay, self.crash = table, step_delay, crash

    def forward(self, input_ids, positions=None, cache=None, logits_index=None):
        logits = super().forward(input_ids, positions, cache, logits_index)  # the real attention path runs
        time.sleep(self.step_delay)  # a step as slow as a real model's, so requests overlap and can be interrupted
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if logits_index is None:
            index = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        else:
            index = logits_index if logits_index.ndim == 2 else logits_index[:, None]
        scripted = torch.zeros(*index.shape, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        for b in range(index.shape[0]):
            for s, i in enumerate(index[b].tolist()):
                position, token = int(positions[b, i]), int(input_ids[b, i])
                if (position, token) in self.crash:
                    raise RuntimeError(f"scripted failure at position {position}")
                next_token = self.table.get((position, token), (token * 131 + position * 7 + 11) % PLAIN_TOKENS)
                scripted[b, s, next_token] = 100.0
        return scripted.reshape(logits.shape)


def build_table(tokenizer, specs: list[dict]) -> tuple[dict[tuple[int, int], int], set[tuple[int, int]]]:
    """The (position, token) -> next token table, and the (position, token) pairs where the model fails: the last
    token of a reply whose spec says "crash" (the engine step that reads it raises)."""
    ctx = ServingContext(tokenizer, "scripted", 2048, 4096)
    table: dict[tuple[int, int], int] = {}
    crash: set[tuple[int, int]] = set()
    for spec in specs:
        request = ChatCompletionRequest.model_validate({"model": "scripted", **spec["request"]})
        prompt = tokenizer.encode(render_chat_prompt(ctx, request), allow_special=True)
        reply = tokenizer.encode(spec["reply"], allow_special=True)
        tokens = prompt + reply + ([] if spec.get("crash") else [tokenizer.im_end_id])
        if spec.get("crash"):
            crash.add((len(tokens) - 1, tokens[-1]))
        for p in range(len(prompt) - 1, len(tokens) - 1):
            key = (p, tokens[p])
            if table.get(key, tokens[p + 1]) != tokens[p + 1]:
                raise SystemExit(f"spec conflict at position {p}: give the requests different prompt lengths")
            table[key] = tokens[p + 1]
    return table, crash


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path)
    parser.add_argument("--model", default="scripted", choices=["scripted", "demo"])
    parser.add_argument("--api-key", action="append", default=[])
    parser.add_argument("--max-waiting", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--step-delay", type=float, default=0.005, help="seconds added to each scripted step")
    args = parser.parse_args()

    from qwen3.server.app import create_app, run_server

    torch.manual_seed(0)
    tokenizer = load_tokenizer(DEMO_DIR)
    if args.model == "demo":
        model_source, name = str(DEMO_DIR), "demo"
    else:
        specs = json.loads(args.spec.read_text()) if args.spec else []
        table, crash = build_table(tokenizer, specs)
        model_source, name = Scripted(4096, table, args.step_delay, crash).eval(), "scripted"
    llm = LLM(
        model_source,
        device="cpu",
        dtype=torch.float32,
        max_num_seqs=args.max_num_seqs,
        max_model_len=1024,
        tokenizer=None if isinstance(model_source, str) else tokenizer,
    )
    ctx = ServingContext.for_engine(llm, name, DEMO_DIR)
    app = create_app(
        AsyncLLM(llm), ctx, api_keys=args.api_key, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting
    )
    return run_server(app, "127.0.0.1", 0, drain_timeout=args.drain_timeout, banner="test server on {url}")


if __name__ == "__main__":
    sys.exit(main())
