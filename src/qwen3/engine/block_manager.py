"""KV blocks: who holds which, and the prefix cache.

The pool has `num_blocks` blocks of `block_size` token slots. A block is held by every sequence whose block
table lists it (`ref_count`); a block nobody holds is *free*, but keeps its keys and values until it is
handed out again, so a later request with the same prefix can pick it back up.

Prefix caching. Every full block of a sequence gets a chained hash, h_i = blake2b(h_{i-1} || token ids of
block i): it names the whole prefix up to the end of block i, not just the block's own tokens. A new request
walks its prompt's full blocks in order and takes every block whose hash is registered *and* whose stored
token ids are equal to its own (so a hash collision cannot corrupt an output), stopping at the first miss.
Only blocks that end before the prompt's last token can be hits: the last prompt token is always computed,
because its logits give the first output token. A partial block is never registered, and a hit block is never
written (writes start at the first position after the hits, a block boundary).

Free blocks are handed out least-recently-freed first (an ordered dict used as an LRU list); a sequence's blocks
are freed tail first, so its prefix, the part most likely to be shared, survives longest; blocks with no
registered content (a partial last block) go to the front, to be reused first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence


def block_hash(previous: bytes, token_ids: list[int]) -> bytes:
    """The chained hash of one full block: depends on every token id from position 0 to the block's end."""
    return hashlib.blake2b(previous + array("i", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks  # the registered hash of a block's content
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks  # its token ids, checked on a hit
        self.block_of_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order: first out first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """Fraction of the blocks held by some sequence (free blocks that keep cached content count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    # -------------------------------------------------------------------------------------------
    # Admission: prefix-cache lookup, then blocks for the rest

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks that already hold a prefix of `seq` (full blocks before its last token); nothing taken."""
        if not self.enable_prefix_caching:
            return []
        hits, previous = [], b""
        tokens = seq.token_ids
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            h = block_hash(previous, chunk)
            block = self.block_of_hash.get(h)
            if block is None or self.tokens_of[block] != tuple(chunk):
                break
            hits.append(block)
            previous = h
        return hits

    def can_admit(self, hits: list[int], num_new_blocks: int) -> bool:
        """Enough free blocks for `num_new_blocks` once the free ones among the hits are taken."""
        taken_from_free = sum(1 for b in hits if self.ref_count[b] == 0)
        return len(self.free) - taken_from_free >= num_new_blocks

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give `seq` the hit blocks (sharing them) as the start of its block table."""
        assert not seq.block_table, seq
        for block in hits:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(self.hash_of[block])
        seq.num_computed_tokens = len(hits) * self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that positions up to num_computed_tokens + num_new_tokens - 1 have slots."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Append blocks for this step's tokens; False (nothing changed) if there are not enough free blocks."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block, _ = self.free.popitem(last=False)  # the least recently freed
            if self.hash_of[block] is not None:  # its old content is overwritten: forget it
                if self.block_of_hash.get(self.hash_of[block]) == block:
                    del self.block_of_hash[self.hash_of[block]]
                self.hash_of[block] = self.tokens_of[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)
        return True

    # -------------------------------------------------------------------------------------------
    # After a step: register newly full blocks; on finish or preemption: free

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash and register the blocks of `seq` that this step filled (all of their tokens computed)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            previous = seq.block_hashes[-1] if seq.block_hashes else b""
            chunk = seq.token_ids[i * bs : (i + 1) * bs]
            h = block_hash(previous, chunk)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.block_of_hash:  # else an identical block is registered already; keep that one
                self.block_of_hash[h] = block
                self.hash_of[block], self.tokens_of[block] = h, tuple(chunk)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks, tail first; blocks nobody holds become free (content kept)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, block
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:  # nothing worth keeping: hand it out first
                    self.free.move_to_end(block, last=False)
        del seq.block_table[:]
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def check_all_free(self) -> None:
        """Assert that no block is held (tests call this after every run)."""
        held = [b for b, n in enumerate(self.ref_count) if n]
        assert not held and len(self.free) == self.num_blocks, f"blocks still held: {held[:10]}"
