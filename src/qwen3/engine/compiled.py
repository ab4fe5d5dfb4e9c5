"""`LLM(compile=True)`: every step runs a torch.compile'd forward: the decode CUDA graphs replay one, and the steps no
graph replays (prefill, mixed prefill + decode, decode without a bucket) call one.

Why: in an eager step some hundreds of tiny elementwise kernels (RMSNorm's casts and reductions, RoPE, SiLU x up,
residual adds) cost 1-5 us of GPU time each even inside a CUDA graph, and in a 16,384-token prefill they were 60% of
the GPU time (H200 profile, benchmarks/NOTES.md); inductor fuses those chains. The paged attention stays our Triton
kernels, registered as custom ops so that dynamo traces the whole forward, PagedAttention backend included, into one
graph (fullgraph: a graph break is an error at LLM start):

    qwen3::store_kv_pool(k, v, kv, layer, slot_mapping)       mutates the pool kv itself, not a view of it:
                                                             inductor then writes in place (a mutated view of a
                                                             graph input could make it copy the whole pool)
    qwen3::qk_norm_rope_store(q, k, v, positions, q_weight, k_weight, q_eps, k_eps, cos, sin, kv, layer,
                              slot_mapping) -> q     the model's QKNormRoPE and store_kv_pool in one kernel (CUDA)
    qwen3::paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits) -> out
    qwen3::paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                           max_query_len, max_seq_len) -> out

On CUDA they are `torch.library.triton_op`s whose bodies launch the kernels through `wrap_triton`, so inductor
sees the kernels (and checks which arguments they write). `qwen3::reference_*` are store_kv_pool and the two
attentions on the PyTorch reference kernels (opaque custom ops), with the model's own QKNormRoPE (which inductor
compiles) in place of the fused kernel: the CPU test compiles the forward with them.

How many compiles. Dynamo specialises on every Python int the forward reads (a kernel's grid and constexprs need
plain ints) and on every dimension of size 0 or 1; other dimensions are marked dynamic. So:
- decode (compile_decode_forward): the batch dimension S is dynamic within a range; `num_splits` is fixed per
  range. The runner uses up to three ranges: the small buckets 2-8 (S = 1 replays bucket 2 with a padding row)
  with the split count of 2 sequences; from runner.COMPILED_FROM (16) up, the buckets that take 1 split (80 and
  more with 8 KV heads on the H200) and the others (16-64, with the split count of 64): up to three compiles. The
  small range's upper bound also lets the GEMV projections (kernels/gemv_linear.py) see that S <= 16 without a
  guard.
- the other steps (compile_step_forward): tokens N, sequences S and block-table width W all dynamic (the runner
  pads each to at least 2), and the attention's two Python ints are engine-wide upper bounds instead of the step's
  values: max_query_len = max_num_batched_tokens (the Triton kernel picks its tile from it: always the largest
  tile) and max_seq_len = max_model_len (unused by the Triton kernel). One compile, whatever the chunk lengths.
The layer loop is unrolled at trace time. Inputs to the kernels are made contiguous first, so the strides the
kernels were traced with are the strides inductor gives them.
"""

from __future__ import annotations

import math as pymath
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor

from ..model import AttentionFn, QKNormRoPE, Qwen3ForCausalLM
from .attention import PagedAttention, fusable, paged_attention, paged_decode_attention, qk_arguments, store_kv

# ---------------------------------------------------------------------------------------------------
# The reference kernels as opaque custom ops (CPU; tests)


@torch.library.custom_op("qwen3::reference_store_kv_pool", mutates_args={"kv"})
def _reference_store_kv_pool(k: Tensor, v: Tensor, kv: Tensor, layer: int, slot_mapping: Tensor) -> None:
    store_kv(k, v, kv[0, layer], kv[1, layer], slot_mapping)


@torch.library.custom_op("qwen3::reference_paged_decode_attention", mutates_args=())
def _reference_paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                      seq_lens: Tensor, scale: float, num_splits: int) -> Tensor:  # fmt: skip
    return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits).clone()


@_reference_paged_decode_attention.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
      num_splits: int) -> Tensor:  # fmt: skip
    if not isinstance(num_splits, int):  # as the Triton launcher: a grid size and a constexpr, never symbolic
        raise ValueError(f"paged_decode_attention: num_splits={num_splits!r} must be an int")
    return torch.empty_like(q)


@torch.library.custom_op("qwen3::reference_paged_attention", mutates_args=())
def _reference_paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                               query_start_loc: Tensor, scale: float, max_query_len: int,
                               max_seq_len: int) -> Tensor:  # fmt: skip
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len,
                           max_seq_len).clone()  # fmt: skip


@_reference_paged_attention.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
      scale: float, max_query_len: int, max_seq_len: int) -> Tensor:  # fmt: skip
    return torch.empty_like(q)


REFERENCE_OPS = SimpleNamespace(
    name="reference",
    store_kv_pool=torch.ops.qwen3.reference_store_kv_pool,
    qk_norm_rope_store=None,  # the reference path applies the model's QKNormRoPE, which inductor compiles
    paged_decode_attention=torch.ops.qwen3.reference_paged_decode_attention,
    paged_attention=torch.ops.qwen3.reference_paged_attention,
)

# ---------------------------------------------------------------------------------------------------
# The Triton kernels as triton_ops (CUDA)

_TRITON_OPS: SimpleNamespace | None = None


def triton_custom_ops() -> SimpleNamespace:
    """Register (once) and return the qwen3:: triton_ops. ImportError without triton; RuntimeError where this
    torch has no torch.library.triton_op (it came in 2.6)."""
    global _TRITON_OPS
    if _TRITON_OPS is not None:
        return _TRITON_OPS
    from . import triton_kernels as tk

    triton_op = getattr(torch.library, "triton_op", None)
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    if triton_op is None or wrap_triton is None:
        raise RuntimeError(f"LLM(compile=True) needs torch.library.triton_op (torch >= 2.6), found {torch.__version__}")

    @triton_op("qwen3::store_kv_pool", mutates_args={"kv"})
    def store_kv_pool(k: Tensor, v: Tensor, kv: Tensor, layer: int, slot_mapping: Tensor) -> None:
        tk.store_kv_pool(k, v, kv, layer, slot_mapping, _wrap=wrap_triton)

    @triton_op("qwen3::qk_norm_rope_store", mutates_args={"kv"})
    def qk_norm_rope_store(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, q_weight: Tensor, k_weight: Tensor,
                           q_eps: float, k_eps: float, cos: Tensor, sin: Tensor, kv: Tensor, layer: int,
                           slot_mapping: Tensor) -> Tensor:  # fmt: skip
        return tk.qk_norm_rope_store(q, k, v, positions, q_weight, k_weight, q_eps, k_eps, cos, sin, kv, layer,
                                     slot_mapping, _wrap=wrap_triton)  # fmt: skip

    @triton_op("qwen3::paged_decode_attention", mutates_args=())
    def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
               num_splits: int) -> Tensor:  # fmt: skip
        return tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                                         _wrap=wrap_triton)  # fmt: skip

    @triton_op("qwen3::paged_attention", mutates_args=())
    def prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int) -> Tensor:  # fmt: skip
        return tk.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                  max_query_len, max_seq_len, _wrap=wrap_triton)  # fmt: skip

    _TRITON_OPS = SimpleNamespace(
        name="triton",
        store_kv_pool=torch.ops.qwen3.store_kv_pool,
        qk_norm_rope_store=torch.ops.qwen3.qk_norm_rope_store,
        paged_decode_attention=torch.ops.qwen3.paged_decode_attention,
        paged_attention=torch.ops.qwen3.paged_attention,
    )
    return _TRITON_OPS


def custom_ops_for(kernels: SimpleNamespace) -> SimpleNamespace:
    """The custom ops matching an engine kernel set (attention.kernels_for): Triton's, or the reference ones."""
    return triton_custom_ops() if kernels.name == "triton" else REFERENCE_OPS


# ---------------------------------------------------------------------------------------------------
# The backend and the compiled forward


class CompiledPagedAttention(PagedAttention):
    """PagedAttention through the custom ops `ops` (triton_custom_ops or REFERENCE_OPS), for dynamo to trace.

    Same arguments and meaning as PagedAttention, plus `ops`."""

    def __init__(self, *args, ops: SimpleNamespace, **kwargs) -> None:  # noqa: ANN002, ANN003 - PagedAttention's
        super().__init__(*args, **kwargs)
        self.ops = ops

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, math: AttentionFn,
               qk: QKNormRoPE) -> Tensor:  # fmt: skip
        kv = self.pool.kv
        if self.ops.qk_norm_rope_store is not None and fusable(qk):
            # (1, heads, N, D) -> (N, heads, D): views of the qkv projection, whose strides inductor keeps for the
            # kernel (the exact strides of the trace: triton_kernel_default_layout_constraint)
            q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))
            q = self.ops.qk_norm_rope_store(q, k, v, positions[0], *qk_arguments(qk), kv, layer, self.slot_mapping)
        else:
            q, k = qk(q, k, positions)
            # (1, heads, N, D) -> (N, heads, D), contiguous: the strides the kernels are traced with are then fixed
            q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))
            self.ops.store_kv_pool(k, v, kv, layer, self.slot_mapping)
        k_cache, v_cache = kv[0, layer], kv[1, layer]
        scale = 1 / pymath.sqrt(q.shape[-1])
        if self.decode:
            out = self.ops.paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens, scale,
                                                  self.num_splits)  # fmt: skip
        else:
            out = self.ops.paged_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                                           scale, self.max_query_len, self.max_seq_len)  # fmt: skip
        return out.transpose(0, 1)[None]  # (1, nh, N, D)


def _hidden_states(model: Qwen3ForCausalLM, tokens: Tensor, positions: Tensor, backend: PagedAttention) -> Tensor:
    return model.hidden_states(tokens, positions, backend)


def _step_hidden_states(model: Qwen3ForCausalLM, tokens: Tensor, positions: Tensor, backend: PagedAttention
                        ) -> Tensor:  # fmt: skip
    return model.hidden_states(tokens, positions, backend)  # a code object of its own: its own compile count


DecodeForward = Callable[..., Tensor]
StepForward = Callable[[Qwen3ForCausalLM, Tensor, Tensor, CompiledPagedAttention], Tensor]


def compile_decode_forward(backend: str | Callable = "inductor") -> DecodeForward:
    """A compiled `model.hidden_states(tokens (1, S), positions (1, S), backend)` for decode steps, the batch
    dimension marked dynamic (S >= 2; S = 1 would be compiled on its own). Compiles on first call per split count
    and batch range. `forward(model, tokens, positions, backend, batch_range=None)`: with (lo, hi) the batch is
    known to lie in lo..hi (a guard), so the trace can decide S <= 16 without guarding on S itself.
    mark_dynamic, not maybe_mark_dynamic: a trace that would fix S is an error at start, not one silent compile
    per graph bucket."""
    compiled = torch.compile(_hidden_states, backend=backend, fullgraph=True)

    def forward(model: Qwen3ForCausalLM, tokens: Tensor, positions: Tensor, backend: CompiledPagedAttention,
                batch_range: tuple[int, int] | None = None) -> Tensor:  # fmt: skip
        if tokens.shape[1] >= 2:
            lo, hi = batch_range or (None, None)
            for x, dim in ((tokens, 1), (positions, 1), (backend.slot_mapping, 0), (backend.block_tables, 0),
                           (backend.seq_lens, 0)):  # fmt: skip
                torch._dynamo.mark_dynamic(x, dim, min=lo, max=hi)
            torch._dynamo.mark_dynamic(backend.query_start_loc, 0)  # S + 1 (read by the prefill op only)
        return compiled(model, tokens, positions, backend)

    return forward


def compile_step_forward(backend: str | Callable = "inductor") -> StepForward:
    """A compiled `model.hidden_states(tokens (1, N), positions (1, N), backend)` for the steps no graph replays:
    N tokens of S sequences with block tables W wide, all three dynamic, each at least 2 (the caller pads: a
    dimension of size 1 would be a compile of its own). The backend's max_query_len and max_seq_len must be the
    same upper bounds at every call (the runner's: max_num_batched_tokens, max_model_len); then one compile serves
    every step. Compiles on first call."""
    compiled = torch.compile(_step_hidden_states, backend=backend, fullgraph=True)

    def forward(model: Qwen3ForCausalLM, tokens: Tensor, positions: Tensor, backend: CompiledPagedAttention
                ) -> Tensor:  # fmt: skip
        for x, dim in ((tokens, 1), (positions, 1), (backend.slot_mapping, 0), (backend.block_tables, 0),
                       (backend.block_tables, 1), (backend.seq_lens, 0), (backend.query_start_loc, 0)):  # fmt: skip
            torch._dynamo.mark_dynamic(x, dim)
        return compiled(model, tokens, positions, backend)

    return forward


def compile_settings() -> dict[str, object]:
    """torch._dynamo settings for capture (the keys this torch knows): room for one compile per split count, no
    silent fall back to eager when that room runs out, and Python ints kept static (by default a changed int such
    as num_splits becomes symbolic on the next compile, and a kernel's grid and constexprs need plain ints); only
    the dimensions compile_decode_forward and compile_step_forward mark are dynamic."""
    wanted = {"recompile_limit": 64, "cache_size_limit": 64, "fail_on_recompile_limit_hit": True,
              "fail_on_cache_limit_hit": True, "specialize_int": True, "automatic_dynamic_shapes": False}  # fmt: skip
    return {key: value for key, value in wanted.items() if hasattr(torch._dynamo.config, key)}
