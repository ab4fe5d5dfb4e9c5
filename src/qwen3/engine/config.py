"""The engine's settings, resolved once: every later module reads plain numbers from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Decode batch sizes that get a CUDA graph: a batch of n sequences replays the smallest bucket >= n.
SMALL_GRAPH_BUCKETS = (1, 2, 4, 8)


@dataclass
class EngineConfig:
    """What the scheduler, block manager and runner need. Built by LLM from its arguments and the model."""

    device: torch.device
    dtype: torch.dtype
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool
    enforce_eager: bool
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    compile: bool = False  # every step runs a torch.compile'd forward, in the decode graphs and outside (compiled.py)
    persistent_decode: bool = False  # a single sequence's decode step is one kernel launch (persistent.py)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def graph_buckets(self) -> list[int]:
        """[1, 2, 4, 8] + range(16, max_num_seqs + 1, 16), up to max_num_seqs (nano-vllm's buckets)."""
        buckets = [b for b in SMALL_GRAPH_BUCKETS if b <= self.max_num_seqs]
        buckets += list(range(16, self.max_num_seqs + 1, 16))
        if buckets[-1] < self.max_num_seqs:
            buckets.append(self.max_num_seqs)
        return buckets
