"""One engine step on the model: pack the scheduled sequences into one flat row, run the forward, return logits.

A step's tokens from all sequences sit side by side in one row of N tokens, tokens (1, N) and positions
(1, N), with the per-step metadata in a PagedAttention backend (attention.py): where each token's k/v goes
(slot_mapping), each sequence's block table, its length after the step (seq_lens) and where its queries start
(query_start_loc). Logits are computed only at the last token of each sequence that samples this step (a prompt
chunk that does not reach the prompt's end samples nothing).

CUDA graphs (decode only). A decode step of S sequences replays the graph of the smallest bucket >= S (buckets
1, 2, 4, 8, 16, 32, ...), captured once at start, largest first, into one shared memory pool. The graphs read
static input tensors that each replay overwrites; padding rows write nowhere (slot -1) and attend to nothing
(seq_lens 0). Nothing per-step is baked in: the decode kernel reads seq_lens on the device, and its grid and
split count depend only on the bucket. Prefill and mixed steps run outside the graphs. The CPU never uses graphs.
With persistent_decode (the default for bf16 / fp16 on CUDA) bucket 1 records the persistent kernel instead
(persistent.py): a single sequence's whole decode step, every layer, in one launch.

LLM(compile=True) (compiled.py): every graph records a torch.compile'd forward instead of the eager one, and the
steps no graph replays call a second compiled forward, compiled at start on a step of max_num_batched_tokens
tokens. Up to four compiles: the small buckets (2, 4, 8; a single sequence replays bucket 2 with a padding row)
share one split count, the buckets from COMPILED_FROM up two (those the split heuristic gives 1 split, and the
others), and the other steps are padded to at least 2 tokens, 2 sequences and 2 block-table columns (a dimension
of size 1 would be a compile of its own).
"""

from __future__ import annotations

import functools
import itertools
from array import array
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..model import Qwen3ForCausalLM
from .attention import KVPool, PagedAttention
from .config import EngineConfig
from .scheduler import ScheduledBatch
from .sequence import Sequence

if TYPE_CHECKING:
    from .compiled import CompiledPagedAttention
    from .llm import InFlight
    from .tensor_parallel import TensorParallel


COMPILED_FROM = 16  # LLM(compile=True): the decode buckets below share one compile, those from here up two at most


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, config: EngineConfig, pool: KVPool, kernels: SimpleNamespace,
                 tp: TensorParallel | None = None) -> None:  # fmt: skip
        self.model, self.config, self.pool, self.kernels = model, config, pool, kernels
        self.tp = tp  # tensor parallelism: the step's metadata goes to the workers (tensor_parallel.py)
        self.device = config.device
        self.pin = self.device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_groups: list[list[int]] = []  # the buckets that share a split count (capture_graphs)
        self.step_forward: Callable | None = None  # compile=True: the compiled forward of the steps not replayed
        self.persistent = None  # config.persistent_decode: one sequence's decode step in one launch (persistent.py)
        if config.persistent_decode:  # first: the layers' parameters become views of its stacks (same values)
            from .persistent import PersistentDecode

            self.persistent = PersistentDecode(model, pool)
        if hasattr(kernels, "warm_up"):  # the Triton kernels: compile them now, not during the first requests
            config_ = model.config
            kernels.warm_up(*pool.layer(0), config_.num_attention_heads // config_.num_key_value_heads, config.dtype)
        if config.compile:
            self.compile_step_forward()
        if self.device.type == "cuda" and not config.enforce_eager and kernels.name != "reference":
            self.capture_graphs()

    def to_device(self, values: list[int] | array, dtype: torch.dtype = torch.int32) -> Tensor:
        """A host list, or a non-empty array("i") (no per-element conversion), on the device via pinned memory."""
        if isinstance(values, array):
            t = torch.frombuffer(values, dtype=torch.int32)
        else:
            t = torch.tensor(values, dtype=dtype)
        if self.pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        fn = getattr(self.kernels, "decode_num_splits", None)
        return 1 if fn is None else fn(num_seqs, self.model.num_kv_heads, max_seq_len)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, in_flight: InFlight | None = None) -> tuple[Tensor, list[Sequence]]:
        """Feed the batch's new tokens; logits (S', V) for the S' sequences that sample this step, and those.

        A sequence whose last token is still in flight (a placeholder, see LLM.step) feeds it straight from the
        device tensor of the previous step's samples."""
        seqs, bs = batch.seqs, self.config.block_size
        decode = batch.is_decode
        if decode:
            # The common step: one new token per sequence, each at its last position, every one sampling.
            positions = [seq.num_computed_tokens for seq in seqs]
            tokens = [seq.token_ids[-1] for seq in seqs]
            slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions, strict=True)]
            seq_lens = [p + 1 for p in positions]
            starts = list(range(len(seqs) + 1))
            logits_index, sampling = starts[:-1], list(seqs)
        else:
            tokens, positions, slots, seq_lens, starts, logits_index, sampling = self._pack(batch)
        holes = []  # (index in the packed row, row in the previous step's samples) of each token still in flight
        if in_flight is not None:
            for seq, end in zip(seqs, starts[1:], strict=True):
                if tokens[end - 1] < 0:  # a placeholder is always the last token of its sequence
                    holes.append((end - 1, in_flight.rows[seq]))
        S = len(batch.seqs)
        bucket = next((b for b in self.graphs if b >= S), None) if decode else None  # ascending (see capture)
        compiled_step = bucket is None and self.step_forward is not None and self.tp is None
        width = max(len(seq.block_table) for seq in batch.seqs)
        if compiled_step:
            width = max(width, 2)  # no dimension of size 1 in the compiled step (compiled.py)
        tables = array("i")  # (S, width), row-major, zero-padded: built in C, not element by element
        padding = array("i", [0]) * width
        for seq in batch.seqs:
            tables.extend(seq.block_table)
            tables.extend(padding[: width - len(seq.block_table)])

        if self.tp is not None:  # packed into one int tensor, broadcast; every rank runs the same forward
            header = self.tp.header(len(tokens), S, width, len(logits_index), decode, max(batch.num_new_tokens),
                                    max(seq_lens))  # fmt: skip
            data = (tokens, positions, slots, tables, seq_lens, starts, logits_index)
            return self.tp.step(self, header, data, holes, in_flight), sampling
        if bucket is not None:
            return self._replay(bucket, tokens, positions, slots, seq_lens, tables, holes, in_flight), sampling
        if decode and S == 1 and self.persistent is not None:  # no graph (the Triton interpreter): eagerly
            ids = self.to_device(tokens, torch.long)
            self._fill_holes(ids, holes, in_flight)
            hidden = self.persistent.hidden_states(ids, self.to_device(positions, torch.long), self.to_device(slots),
                                                   self.to_device(tables))  # fmt: skip
            return self.model.lm_head(hidden), sampling
        if compiled_step:
            return self._run_compiled_step(tokens, positions, slots, seq_lens, starts, tables, width, logits_index,
                                           holes, in_flight), sampling  # fmt: skip

        backend = PagedAttention(
            self.pool, self.kernels,
            slot_mapping=self.to_device(slots),
            block_tables=self.to_device(tables).view(S, width),
            seq_lens=self.to_device(seq_lens),
            query_start_loc=self.to_device(starts),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            decode=decode,
            num_splits=self._num_splits(S, max(seq_lens)) if decode else 1,
        )  # fmt: skip
        ids = self.to_device(tokens, torch.long)
        self._fill_holes(ids, holes, in_flight)
        ids = ids[None]
        pos = self.to_device(positions, torch.long)[None]
        index = self.to_device(logits_index, torch.long)[None]
        return self.model(ids, pos, backend, logits_index=index)[0], sampling

    def _pack(self, batch: ScheduledBatch) -> tuple[list[int], ...]:
        """Tokens, positions, slots, seq_lens, query starts, logits indices and sampling sequences of any batch."""
        bs = self.config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        logits_index: list[int] = []
        sampling: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            tokens += seq.token_ids[start:end]
            positions += range(start, end)
            for b in range(start // bs, (end - 1) // bs + 1):  # the blocks this chunk writes
                lo, hi = max(start, b * bs), min(end, (b + 1) * bs)
                base = seq.block_table[b] * bs - b * bs
                slots += range(base + lo, base + hi)
            seq_lens.append(end)
            starts.append(starts[-1] + n)
            if end == seq.num_tokens:
                logits_index.append(starts[-1] - 1)
                sampling.append(seq)
        return tokens, positions, slots, seq_lens, starts, logits_index, sampling

    # -------------------------------------------------------------------------------------------
    # compile=True: the steps no graph replays

    def _compiled_backend(self, slots: Tensor, tables: Tensor, seq_lens: Tensor, starts: Tensor
                          ) -> CompiledPagedAttention:  # fmt: skip
        """The backend of a compiled step: its max_query_len and max_seq_len are the engine's bounds, the same at
        every step (each distinct Python int would be a compile of its own)."""
        from .compiled import CompiledPagedAttention

        return CompiledPagedAttention(
            self.pool, self.kernels, slots, tables, seq_lens, starts, max_query_len=self.config.max_num_batched_tokens,
            max_seq_len=self.config.max_model_len, decode=False, ops=self.ops,
        )  # fmt: skip

    @torch.inference_mode()  # as run: dynamo guards on inference tensors
    def compile_step_forward(self) -> None:
        """Compile the forward of the steps no graph replays, on a step as large as the token budget allows
        (inductor picks its kernels' launch settings at the first call), so no request waits for it. The step
        writes nowhere (slots -1) and reads block 0. A failure is one clear error, as for the graphs."""
        from . import compiled

        self.ops = compiled.custom_ops_for(self.kernels)
        forward = compiled.compile_step_forward()
        config, bs = self.config, self.config.block_size
        # N tokens in S sequences, W table columns: distinct sizes (dynamo gives equal sizes one symbol at first)
        num_tokens = max(config.max_num_batched_tokens, 8)
        num_seqs = max(3, -(-num_tokens // config.max_model_len))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]  # <= max_model_len
        width = max(2, -(-lens[0] // bs))
        while width in (num_tokens, num_seqs, num_seqs + 1):
            width += 1
        device = self.device
        positions = torch.cat([torch.arange(n) for n in lens]).to(device)[None]
        starts = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        backend = self._compiled_backend(
            torch.full((num_tokens,), -1, dtype=torch.int32, device=device),
            torch.zeros(num_seqs, width, dtype=torch.int32, device=device),
            torch.tensor(lens, dtype=torch.int32, device=device), starts,
        )  # fmt: skip
        tokens = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
        with torch._dynamo.config.patch(compiled.compile_settings()):
            try:
                forward(self.model, tokens, positions, backend)
            except Exception as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise RuntimeError(f"LLM(compile=True): torch.compile failed on the prefill forward "
                                   f"({type(error).__name__}: {first}); use compile=False") from error  # fmt: skip
        self.step_forward = forward

    def _run_compiled_step(self, tokens: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
                           starts: list[int], tables: array, width: int, logits_index: list[int],
                           holes: list[tuple[int, int]], in_flight: InFlight | None) -> Tensor:  # fmt: skip
        """A step through the compiled forward; the LM head runs after it, eagerly, on the sampling rows only.
        Fewer than 2 sequences or tokens: one padding sequence is appended (one token at position 0, written
        nowhere, no keys: seq_len 0)."""
        from .compiled import compile_settings

        if len(seq_lens) < 2 or len(tokens) < 2:
            tokens, positions, slots = tokens + [0], positions + [0], slots + [-1]
            seq_lens, starts = seq_lens + [0], starts + [starts[-1] + 1]
            tables = tables + array("i", [0]) * width
        backend = self._compiled_backend(self.to_device(slots), self.to_device(tables).view(len(seq_lens), width),
                                         self.to_device(seq_lens), self.to_device(starts))  # fmt: skip
        ids = self.to_device(tokens, torch.long)
        self._fill_holes(ids, holes, in_flight)
        pos = self.to_device(positions, torch.long)
        with torch._dynamo.config.patch(compile_settings()):
            hidden = self.step_forward(self.model, ids[None], pos[None], backend)[0]  # (N, H)
        return self.model.lm_head(hidden[self.to_device(logits_index, torch.long)])  # (S', V)

    # -------------------------------------------------------------------------------------------
    # CUDA graphs

    def capture_graphs(self) -> None:
        """Record one decode forward per bucket, largest first, into one memory pool. A graph ends at the final
        hidden states, copied into one static buffer that all buckets share; the LM head runs after the replay,
        on the real rows only (a graph's own output would stay allocated, V wide, for every bucket)."""
        buckets = self.config.graph_buckets()
        eager = (PagedAttention, self._eager_hidden_states, {})
        # (buckets, their split count or None: each bucket its own, how they run, the range of their batch)
        groups = [(buckets, None, eager, None)]
        if self.config.compile:  # LLM(compile=True): replay a torch.compile'd forward (compiled.py)
            from . import compiled

            fused = (compiled.CompiledPagedAttention, compiled.compile_decode_forward(),
                     {"ops": compiled.custom_ops_for(self.kernels)})  # fmt: skip
            # At most three compiles, one per split count (a Python int of the graph: each distinct count is a
            # compile of its own, about a minute on the H200): the small, latency-bound buckets take the split count
            # of 2 sequences; from COMPILED_FROM up, the buckets whose own count is 1 share 1 and the others take
            # that of the largest of them. No bucket 1: dynamo fixes a dimension of size 1, so it would be a compile
            # of its own; one sequence replays bucket 2 with a padding row instead.
            buckets = sorted({max(b, 2) for b in buckets})
            max_len = self.config.max_model_len
            small = [b for b in buckets if b < COMPILED_FROM]
            large = buckets[len(small) :]
            one = [b for b in large if self._num_splits(b, max_len) == 1]
            split = [b for b in large if b not in one]
            groups = [(group, self._num_splits(group[0] if group is small else group[-1], max_len), fused,
                       (group[0], group[-1])) for group in (small, split, one) if group]  # fmt: skip
        if self.persistent is not None:  # bucket 1 is the persistent kernel's graph (recorded last, below)
            groups = [([b for b in group if b != 1], *rest) for group, *rest in groups]
            groups = [g for g in groups if g[0]]
        self.graph_groups = [group for group, *_ in groups]  # compile=True: one compile per group
        largest, max_blocks = max(self.config.graph_buckets() + buckets), self.config.max_blocks_per_seq
        device = self.device
        self.g_tokens = torch.zeros(largest, dtype=torch.long, device=device)
        self.g_positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.g_slots = torch.full((largest,), -1, dtype=torch.int32, device=device)
        self.g_seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.g_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        hidden_size = self.model.config.hidden_size
        self.g_hidden = torch.zeros(largest, hidden_size, dtype=self.config.dtype, device=device)  # graph output
        starts = torch.arange(largest + 1, dtype=torch.int32, device=device)
        memory_pool = None
        with torch.inference_mode():
            for group, splits, (backend_type, hidden_states, options), batch_range in reversed(groups):
                for size in reversed(group):
                    backend = backend_type(
                        self.pool, self.kernels, self.g_slots[:size], self.g_tables[:size], self.g_seq_lens[:size],
                        starts[: size + 1], max_query_len=1, max_seq_len=self.config.max_model_len, decode=True,
                        num_splits=splits or self._num_splits(size, self.config.max_model_len), **options,
                    )  # fmt: skip
                    run = functools.partial(hidden_states, batch_range=batch_range) if options else hidden_states

                    def forward(size: int = size, backend: PagedAttention = backend, run=run) -> None:
                        # (1, size) with strides (size, 1): [None, :size] would keep stride `largest`, and dynamo,
                        # having seen stride == size in the largest bucket, would compile again for the next
                        tokens, positions = self.g_tokens[:size][None], self.g_positions[:size][None]
                        self.g_hidden[:size].copy_(run(self.model, tokens, positions, backend)[0])

                    if options:
                        self.graphs[size] = self._record_compiled(forward, memory_pool, size)
                    else:
                        self.graphs[size] = self._record(forward, memory_pool)
                    memory_pool = self.graphs[size].pool()
            if self.persistent is not None:

                def forward_one() -> None:
                    hidden = self.persistent.hidden_states(self.g_tokens[:1], self.g_positions[:1], self.g_slots[:1],
                                                           self.g_tables[0])  # fmt: skip
                    self.g_hidden[:1].copy_(hidden)

                self.graphs[1] = self._record(forward_one, memory_pool)
        self.graphs = dict(sorted(self.graphs.items()))  # smallest bucket first, for the lookup in run

    @staticmethod
    def _eager_hidden_states(model: Qwen3ForCausalLM, tokens: Tensor, positions: Tensor, backend: PagedAttention
                             ) -> Tensor:  # fmt: skip
        return model.hidden_states(tokens, positions, backend)

    def _record_compiled(self, forward: Callable[[], None], memory_pool: tuple | None, size: int
                         ) -> torch.cuda.CUDAGraph:  # fmt: skip
        """_record for compile=True: the warm-up run compiles (a failure is one clear error at start), and the
        dynamo settings allow one compile per split count and fail instead of falling back to eager."""
        from .compiled import compile_settings

        with torch._dynamo.config.patch(compile_settings()):
            try:
                forward()
            except Exception as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise RuntimeError(f"LLM(compile=True): torch.compile failed on the decode forward of {size} "
                                   f"sequences ({type(error).__name__}: {first}); use compile=False") from error
            return self._record(forward, memory_pool)

    @staticmethod
    def _record(forward: Callable[[], None], memory_pool: tuple | None) -> torch.cuda.CUDAGraph:
        """Warm up (Triton compiles, the allocator settles), then capture `forward` into a CUDA graph."""
        forward()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=memory_pool):
            forward()
        torch.cuda.synchronize()
        return graph

    def _fill_holes(self, ids: Tensor, holes: list[tuple[int, int]], in_flight: InFlight | None,
                    staged: Tensor | None = None) -> None:  # fmt: skip
        """Put the previous step's sampled ids (on the device) at the packed positions of their placeholders.
        `staged`: the holes as a (2, len(holes)) device tensor (positions, rows) already copied by the caller."""
        if holes:
            if staged is None:
                staged = self.to_device([i for i, _ in holes] + [row for _, row in holes], torch.long)
            at, rows = staged.view(2, len(holes))
            ids[at] = in_flight.next_ids[rows]

    def _replay(self, bucket: int, tokens: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
                tables: array, holes: list[tuple[int, int]], in_flight: InFlight | None) -> Tensor:  # fmt: skip
        S = len(tokens)
        width = len(tables) // S
        zeros = [0] * (bucket - S)
        # One host list, one copy to the device (each copy costs host time): the four per-row inputs padded to the
        # bucket, then where the placeholders are and their rows in the previous step's samples.
        host = tokens + zeros + positions + zeros + slots + [-1] * (bucket - S) + seq_lens + zeros
        host += [i for i, _ in holes] + [row for _, row in holes]
        staged = self.to_device(host, torch.long)
        rows = staged[: 4 * bucket].view(4, bucket)
        self.g_tokens[:bucket].copy_(rows[0], non_blocking=True)
        self._fill_holes(self.g_tokens, holes, in_flight, staged[4 * bucket :])
        self.g_positions[:bucket].copy_(rows[1], non_blocking=True)
        self.g_slots[:bucket].copy_(rows[2], non_blocking=True)  # (int64 -> int32)
        self.g_seq_lens[:bucket].copy_(rows[3], non_blocking=True)
        self.g_tables[:S, :width].copy_(self.to_device(tables).view(S, width), non_blocking=True)
        self.graphs[bucket].replay()
        return self.model.lm_head(self.g_hidden[:S])  # (S, V), eagerly: only the real rows
