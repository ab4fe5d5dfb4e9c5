"""Which sequences run in the next step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`) and at most `max_num_seqs` running sequences. A
sequence's next tokens are always `token_ids[num_computed_tokens:]`: one for a decoding sequence (the token
sampled last step), many for a prompt. So one rule covers prefill, decode and their mix:
1. running sequences that decode get their one token first (decodes keep flowing under long prompts);
2. running sequences in the middle of their prompt get the next chunk, oldest first, as far as the budget goes;
3. waiting requests are admitted first-come first-served while budget, sequence slots and blocks last; each
   first takes what the prefix cache holds, then a chunk of the rest.
A step of decodes only is packed longest context first: the decode kernel's grid runs over the batch's rows and the
GPU starts a kernel's programs roughly in grid order, so the long sequences' programs start first and the short
ones fill the tail (H200, nano-vllm's benchmark: 1% more output tokens/s; benchmarks/NOTES.md). Each row's result
does not depend on its place in the batch.
When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it goes back to the waiting queue, to be recomputed later (mostly from the prefix cache, since
freed blocks keep their content). A step that preempted admits nobody new.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """This step's work: sequences (decodes first) and how many new tokens each feeds."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_decodes: int = 0  # sequences feeding their one last token (and so sampling)

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds its last token and samples: the decode kernel and the CUDA graphs apply."""
        return self.num_decodes == len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq)

    def _preempt(self, seq: Sequence, batch: dict[Sequence, int]) -> int:
        """Free `seq`'s blocks and queue it for recomputation; returns the budget it had taken this step."""
        self.running.remove(seq)
        self.block_manager.release(seq)
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)
        self.num_preemptions += 1
        return batch.pop(seq, 0)

    def schedule(self) -> ScheduledBatch:
        bm, budget = self.block_manager, self.config.max_num_batched_tokens
        batch: dict[Sequence, int] = {}  # insertion order = packing order
        preempted: list[Sequence] = []
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decoding + prefilling:
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this step
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:
                break
            while not bm.allocate(seq, n):
                victim = self.running[-1]  # the newest
                budget += self._preempt(victim, batch)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch[seq] = n
                budget -= n

        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = bm.cached_prefix(seq)
            seq.num_computed_tokens = len(hits) * bm.block_size
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.can_admit(hits, bm.blocks_needed(seq, n) - len(hits)):
                seq.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            bm.admit(seq, hits)
            assert bm.allocate(seq, n)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            batch[seq] = n
            budget -= n
        decodes = sum(1 for seq, n in batch.items() if n == 1 and seq.num_tokens - seq.num_computed_tokens == 1)
        seqs = list(batch)
        if decodes == len(seqs):  # all decode (one token each): packed longest context first
            seqs.sort(key=lambda seq: seq.num_computed_tokens, reverse=True)
        return ScheduledBatch(seqs, [batch[seq] for seq in seqs], preempted, decodes)
