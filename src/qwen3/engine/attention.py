"""The paged KV pool, the PagedAttention backend the model's layers call, and the pure-PyTorch reference kernels.

Pool: one tensor kv (2, layers, num_blocks, block_size, nkv, D); layer l's keys are kv[0, l], a contiguous
(num_blocks, block_size, nkv, D) cache, and token t of a sequence lives in slot block_table[t // block_size] *
block_size + t % block_size. Many sequences share the pool; a step's tokens from all of them are packed into
one row of N tokens.

The operations (the contract with the Triton kernels of triton_kernels.py):
    store_kv(k, v, k_cache, v_cache, slot_mapping)                   token i -> slot slot_mapping[i] (< 0: skip)
    paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len,
                    max_seq_len)                                     varlen prefill / extend / decode, causal
    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits)   one query per seq
and on CUDA only, the first step of each layer fused into one kernel (the reference path calls the model's
QKNormRoPE, then store_kv):
    qk_norm_rope_store(q, k, v, positions, q_weight, k_weight, q_eps, k_eps, cos, sin, kv, layer, slot_mapping)
                                                                     QK-norm + RoPE on q and k, k and v stored
Query j of sequence s sits at position seq_lens[s] - query_len_s + j and sees keys 0..that position.

The reference path here is the obviously-correct one: gather each sequence's keys through its block table into a
dense (S, nkv, max_seq_len, D) tensor, pad the queries to (S, nh, max_query_len, D), build the causal mask and
call the model's own dense formula `math(q, k, v, mask)` (sdpa or textbook) once for the batch. It runs on the
CPU and in tests; on CUDA the Triton kernels replace it when they import.
"""

from __future__ import annotations

import math as pymath
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import AttentionFn, QKNormRoPE, RMSNorm

# ---------------------------------------------------------------------------------------------------
# The pool


class KVPool:
    """kv (2, layers, num_blocks, block_size, nkv, D). On CUDA it is zero-filled, so that a slot no sequence has
    written holds finite values (a kernel may multiply one by a zero weight); on the CPU it is left uninitialised,
    so that the operating system commits its pages only as blocks are used (the reference path zeroes what it
    gathers from beyond a sequence's end)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        allocate = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        self.kv = allocate(shape, dtype=dtype, device=device)

    @property
    def block_size(self) -> int:
        return self.kv.shape[3]

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[2]

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """(k_cache, v_cache) of one layer, each (num_blocks, block_size, nkv, D)."""
        return self.kv[0, layer], self.kv[1, layer]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element


# ---------------------------------------------------------------------------------------------------
# Reference kernels


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write token i's k, v (N, nkv, D) into slot slot_mapping[i] of the caches; a slot < 0 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


@dataclass
class DenseLayout:
    """Where a step's packed queries and paged keys go in the padded dense batch; the same for every layer."""

    key_slots: Tensor  # (S, L) slot of key t of sequence s (0 where t >= seq_lens[s])
    key_valid: Tensor  # (S, 1, L, 1) t < seq_lens[s]
    query_index: Tensor  # (S, Q) packed index of query j of sequence s (0 for padding)
    mask: Tensor  # (S, 1, Q, L) True = may attend
    packed: Tensor  # (N,) index into the (S * Q) padded queries of each packed query, in packed order
    empty: Tensor  # (S,) sequences with no keys at all (CUDA-graph padding): their output is zero

    @classmethod
    def build(cls, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, block_size: int,
              max_query_len: int, max_seq_len: int) -> DenseLayout:  # fmt: skip
        device = seq_lens.device
        seq_lens, starts = seq_lens.long(), query_start_loc.long()
        query_lens = starts[1:] - starts[:-1]  # (S,)
        t = torch.arange(max(max_seq_len, 1), device=device)  # (L,)
        j = torch.arange(max(max_query_len, 1), device=device)  # (Q,)
        block = block_tables.long()[:, (t // block_size).clamp(max=block_tables.shape[1] - 1)]  # (S, L)
        key_valid = t[None, :] < seq_lens[:, None]  # (S, L)
        key_slots = torch.where(key_valid, block * block_size + t % block_size, 0)
        query_valid = j[None, :] < query_lens[:, None]  # (S, Q)
        query_index = torch.where(query_valid, starts[:-1, None] + j, 0)
        query_pos = seq_lens[:, None] - query_lens[:, None] + j  # (S, Q)
        mask = (t[None, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]  # (S, Q, L)
        # A row with nothing to attend to (padding query, empty sequence) sees key 0: finite, and thrown away.
        mask |= ~mask.any(-1, keepdim=True) & (t == 0)
        packed = torch.nonzero(query_valid.flatten()).squeeze(1)
        return cls(key_slots, key_valid[:, None, :, None], query_index, mask[:, None], packed, seq_lens == 0)

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, math: AttentionFn) -> Tensor:
        """Packed q (N, nh, D) -> (N, nh, D) through the dense formula `math` on the padded batch."""
        S, Q = self.query_index.shape
        # (S, nkv, L, D); slots past a sequence's end may be unwritten memory (NaN): zeroed, then masked out
        # (an fp8 cache is widened to q's dtype first, as the Triton kernels do in registers)
        keys = k_cache.view(-1, *k_cache.shape[2:])[self.key_slots].to(q.dtype).transpose(1, 2)
        values = v_cache.view(-1, *v_cache.shape[2:])[self.key_slots].to(q.dtype).transpose(1, 2)
        keys, values = keys.where(self.key_valid, 0), values.where(self.key_valid, 0)
        queries = q[self.query_index].transpose(1, 2)  # (S, nh, Q, D)
        out = math(queries, keys, values, self.mask)  # (S, nh, Q, D)
        out = out.masked_fill(self.empty[:, None, None, None], 0)
        return out.transpose(1, 2).reshape(S * Q, *q.shape[1:])[self.packed]  # (N, nh, D)


def scaled_math(scale: float) -> AttentionFn:
    """A dense formula with an explicit softmax scale, for calls without the model's `math`."""

    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=gqa)  # fmt: skip

    return attention


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int,
                    math: AttentionFn | None = None) -> Tensor:  # fmt: skip
    """Causal attention of the packed queries q (N, nh, D) over each sequence's paged keys -> (N, nh, D).
    `math` is a dense formula (the model's); by default SDPA with `scale`."""
    layout = DenseLayout.build(block_tables, seq_lens, query_start_loc, k_cache.shape[1], max_query_len, max_seq_len)
    return layout.attend(q, k_cache, v_cache, math or scaled_math(scale))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           scale: float, num_splits: int = 1, math: AttentionFn | None = None) -> Tensor:  # fmt: skip
    """One query per sequence, q (S, nh, D) at position seq_lens[s] - 1 -> (S, nh, D); num_splits is a kernel
    tuning knob the reference ignores. Sequences with seq_lens 0 give zeros."""
    S = q.shape[0]
    starts = torch.arange(S + 1, dtype=torch.int32, device=q.device)
    max_seq_len = int(seq_lens.max()) if S else 0
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, starts, scale, 1, max_seq_len, math)


def fusable(qk: QKNormRoPE) -> bool:
    """Whether qk_norm_rope_store's kernel computes `qk`: both norms Qwen3's RMSNorm (not the experiments' Identity
    or LayerNorm). The rotary tables may be any rope type's: the kernel reads them."""
    return isinstance(qk.q_norm, RMSNorm) and isinstance(qk.k_norm, RMSNorm)


def qk_arguments(qk: QKNormRoPE) -> tuple[Tensor, Tensor, float, float, Tensor, Tensor]:
    """The tensors and numbers qk_norm_rope_store reads for `qk`: the norms' weights and eps, the cos and sin tables."""
    return qk.q_norm.weight, qk.k_norm.weight, qk.q_norm.eps, qk.k_norm.eps, qk.rope.cos, qk.rope.sin


REFERENCE = SimpleNamespace(
    name="reference", store_kv=store_kv, paged_attention=paged_attention, paged_decode_attention=paged_decode_attention
)


def triton_ops() -> SimpleNamespace:
    """The Triton kernels (triton_kernels.py); ImportError where triton is missing."""
    from . import triton_kernels, triton_sampling

    return SimpleNamespace(
        name="triton",
        store_kv=triton_kernels.store_kv,
        qk_norm_rope_store=triton_kernels.qk_norm_rope_store,
        paged_attention=triton_kernels.paged_attention,
        paged_decode_attention=triton_kernels.paged_decode_attention,
        decode_num_splits=triton_kernels.decode_num_splits,
        max_decode_seqs=triton_kernels.MAX_DECODE_SEQS,
        warm_up=triton_kernels.warm_up,
        sample=triton_sampling.sample,
    )


def kernels_for(device: torch.device) -> SimpleNamespace:
    """The Triton kernels on CUDA when they import, else the reference functions."""
    if device.type == "cuda":
        try:
            return triton_ops()
        except ImportError:
            return REFERENCE
    return REFERENCE


# ---------------------------------------------------------------------------------------------------
# The backend


class PagedAttention:
    """The attention backend of one engine step (model.py's AttentionBackend): the pool plus this step's metadata.

    The model sees one packed row: q (1, nh, N, D), k, v (1, nkv, N, D). Each layer writes its N new keys and
    values into their slots, then attends: `paged_decode_attention` on a pure-decode step (one query per
    sequence; the CUDA-graph path), `paged_attention` otherwise. Index tensors are int32 on the pool's device.
    """

    def __init__(self, pool: KVPool, kernels: SimpleNamespace, slot_mapping: Tensor, block_tables: Tensor,
                 seq_lens: Tensor, query_start_loc: Tensor, max_query_len: int, max_seq_len: int,
                 decode: bool = False, num_splits: int = 1) -> None:  # fmt: skip
        self.pool, self.kernels = pool, kernels
        self.slot_mapping, self.block_tables, self.seq_lens = slot_mapping, block_tables, seq_lens
        self.query_start_loc = query_start_loc
        self.max_query_len, self.max_seq_len = max_query_len, max_seq_len
        self.decode, self.num_splits = decode, num_splits
        self._layout: DenseLayout | None = None  # the reference path's gather plan, built once per forward

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, math: AttentionFn,
               qk: QKNormRoPE) -> Tensor:  # fmt: skip
        k_cache, v_cache = self.pool.layer(layer)
        fused = getattr(self.kernels, "qk_norm_rope_store", None)
        if fused is not None and fusable(qk):  # one kernel: q's and k's norm and rotation, k and v into their slots
            k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, nkv, D)
            q = fused(q[0].transpose(0, 1), k, v, positions[0], *qk_arguments(qk), self.pool.kv, layer,
                      self.slot_mapping)  # fmt: skip
        else:
            q, k = qk(q, k, positions)
            q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, heads, D)
            self.kernels.store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.kernels is REFERENCE:
            if self._layout is None or layer == 0:  # once per forward (a replayed graph's backend lives on)
                self._layout = DenseLayout.build(
                    self.block_tables, self.seq_lens, self.query_start_loc, self.pool.block_size,
                    self.max_query_len, self.max_seq_len,
                )  # fmt: skip
            out = self._layout.attend(q, k_cache, v_cache, math)
        elif self.decode:
            out = self.kernels.paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens,
                                                      1 / pymath.sqrt(q.shape[-1]), self.num_splits)  # fmt: skip
        else:
            out = self.kernels.paged_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens,
                                               self.query_start_loc, 1 / pymath.sqrt(q.shape[-1]),
                                               self.max_query_len, self.max_seq_len)  # fmt: skip
        return out.transpose(0, 1)[None]  # (1, nh, N, D)
