"""Batch-1 decode in one kernel launch: the engine's step for a single sequence (engine/triton_persistent.py).

A decode step of one sequence is ~250 small kernels through the model's layers, each at a floor of a few
microseconds, so it runs far below the memory bandwidth (benchmarks/NOTES.md). Here one persistent Triton kernel
runs every decoder layer of the token, reading the same pool through the same block table as the paged kernels;
the embedding, the final norm and the LM head stay the model's own. On CUDA the runner records it as the graph of
bucket 1; elsewhere (the Triton interpreter on the CPU, for the tests) it runs eagerly, with one program.

The kernel reads each layer's weights from stacks over the layers, and the layers' parameters become views of those
stacks (StackedWeights.from_model(share=True)): one copy of the weights, the same values, the same Parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import Qwen3ForCausalLM
from .attention import KVPool
from .triton_persistent import Launch, StackedWeights, counters_per_step, decode_step

DTYPES = (torch.bfloat16, torch.float16)  # the default: the kernel's tiles are sized for 16-bit weights


def unavailable(model: Qwen3ForCausalLM, kv_dtype: torch.dtype, kernels_name: str, dtype: torch.dtype,
                any_dtype: bool = False) -> str | None:  # fmt: skip
    """Why the persistent step cannot run for this model and KV pool dtype, or None when it can (any_dtype: float32
    weights too, which it computes correctly but with tiles sized for 16-bit ones)."""
    if kernels_name != "triton":
        return f"it needs the Triton kernels (the engine has the {kernels_name} ones)"
    if not any_dtype and dtype not in DTYPES:
        return f"its tiles are sized for bfloat16 / float16 weights, not {dtype}"
    if kv_dtype != dtype:
        return f"the KV pool is {kv_dtype}, the model {dtype}"
    try:
        StackedWeights.check(model)
    except ValueError as error:
        return str(error).removeprefix("persistent decode: ")
    return None


class PersistentDecode:
    """The hidden states of one sequence's next token, all layers in one launch (see the module's docstring)."""

    def __init__(self, model: Qwen3ForCausalLM, pool: KVPool, launch: Launch | None = None) -> None:
        self.model, self.pool, self.launch = model, pool, launch or Launch()
        self.weights = StackedWeights.from_model(model, share=True)
        device = pool.kv.device
        # one program per SM (all resident at once); the interpreter runs programs one after another: one
        self.num_programs = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 1  # fmt: skip
        config = model.config
        self.counters = torch.zeros(counters_per_step(config.num_hidden_layers, model.num_kv_heads),
                                    dtype=torch.int32, device=device)  # fmt: skip

    def hidden_states(self, token: Tensor, position: Tensor, slot: Tensor, block_table: Tensor) -> Tensor:
        """token (1,) int64, position (1,) and slot (1,) (where its key and value go; < 0: nowhere) on the device,
        block_table (W,) int32 (the sequence's blocks): the final-normed hidden states (1, H)."""
        inner = self.model.model
        x = inner.embed_tokens(token)[0].contiguous()  # (H,), the residual stream the kernel updates in place
        self.counters.zero_()  # a memset node in the CUDA graph: every replay starts from zero
        rope = self.model.rope
        decode_step(self.weights, x, position, slot, self.pool.kv, block_table, rope.cos, rope.sin, self.num_programs,
                    self.launch, self.counters)  # fmt: skip
        return inner.norm(x[None])
