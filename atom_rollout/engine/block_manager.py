"""Paged KV blocks with an exact, chained prefix cache.

A full block is cached under the key (parent block id, parent epoch, its
tokens). Dict lookup compares keys by equality, so a hash collision can never
return another block; a block's epoch changes whenever it is reused, so keys
pointing at its old content stop matching. Free blocks are reused oldest-freed
first and stay hittable until then.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .sequence import Sequence

_ROOT = (-1, 0)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    epoch: int = 0
    key: tuple | None = None


class BlockTables:
    """Every block-holding sequence's block table mirrored in one int32 array padded
    with -1, written only as tables change, so a step's tables are one numpy gather."""

    def __init__(self, rows: int = 64, cols: int = 64):
        self.array = np.full((rows, cols), -1, dtype=np.int32)
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.free_rows = list(range(rows - 1, -1, -1))

    def sync(self, seq: Sequence, start: int) -> None:
        """Write seq.block_table[start:] into its row (taking a row if it has none)."""
        if seq.table_row < 0:
            seq.table_row, start = self._take_row(), 0
        row, table = seq.table_row, seq.block_table
        if len(table) > self.array.shape[1]:
            self._widen(len(table))
        old = int(self.lengths[row])
        if old > len(table):
            self.array[row, len(table):old] = -1
        if len(table) - start == 1:
            self.array[row, start] = table[start]
        elif len(table) > start:
            self.array[row, start:len(table)] = table[start:]
        self.lengths[row] = len(table)

    def release(self, seq: Sequence) -> None:
        row = seq.table_row
        if row >= 0:
            self.array[row, :self.lengths[row]] = -1
            self.lengths[row] = 0
            self.free_rows.append(row)
            seq.table_row = -1

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The tables of these rows as one [len(rows), longest] int32 array, -1 padded."""
        return self.array[rows, :int(self.lengths[rows].max())]

    def _take_row(self) -> int:
        if not self.free_rows:
            rows = self.array.shape[0]
            self.array = np.concatenate([self.array, np.full_like(self.array, -1)])
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
            self.free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self.free_rows.pop()

    def _widen(self, cols: int) -> None:
        rows, width = self.array.shape
        extra = np.full((rows, max(cols, 2 * width) - width), -1, dtype=np.int32)
        self.array = np.concatenate([self.array, extra], axis=1)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 lookahead_slots: int = 0):
        self.block_size = block_size
        self.lookahead_slots = lookahead_slots  # KV slots past the step, for draft chains
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[tuple, int] = {}
        self.tables = BlockTables()
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest full-block prefix before the first
        position the sequence must compute itself."""
        if not self.enable_prefix_caching or not seq.cacheable:
            return []
        hits, parent = [], _ROOT
        for start in range(0, seq.first_logit_position - self.block_size + 1, self.block_size):
            key = (*parent, tuple(seq.token_ids[start:start + self.block_size]))
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
            parent = (block_id, self.blocks[block_id].epoch)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        cached_tokens = len(hits) * self.block_size
        new_blocks = self.blocks_needed(cached_tokens + num_new_tokens
                                        + self.lookahead_slots) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return new_blocks + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Give a waiting sequence its cached prefix plus room for this step."""
        for block_id in hits:
            self._acquire(block_id)
        seq.block_table = list(hits)
        self.tables.sync(seq, 0)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.hit_tokens += seq.num_cached_tokens
        self.queried_tokens += seq.num_tokens
        self.grow(seq, num_new_tokens)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens
                                    + self.lookahead_slots)
        return needed - len(seq.block_table) <= self.num_free_blocks

    def grow_if_free(self, seq: Sequence, num_new_tokens: int) -> bool:
        """grow(seq, num_new_tokens) when the free blocks cover it, so that no preemption
        can be needed; False, doing nothing, otherwise. The scheduler's per-sequence path
        of every step, hence written out in one function."""
        table, size = seq.block_table, self.block_size
        end = seq.num_computed_tokens + num_new_tokens
        uncovered = end + self.lookahead_slots - len(table) * size  # tokens without a slot
        if uncovered > 0:
            missing = -(-uncovered // size)
            if missing > len(self.free):
                return False
            start = len(table)
            for _ in range(missing):
                table.append(self._take_free_block())
            self.tables.sync(seq, start)
        # Only verified tokens may enter the prefix cache, never drafts.
        known = len(seq.token_ids)
        if end < known:
            known = end
        if known // size > seq.num_registered_blocks:
            self._register_full_blocks(seq, known)
        return True

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Room for a sequence's next tokens; the caller checked can_grow."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens
                                    + self.lookahead_slots)
        if len(seq.block_table) < needed:
            start = len(seq.block_table)
            while len(seq.block_table) < needed:
                seq.block_table.append(self._take_free_block())
            self.tables.sync(seq, start)
        known = min(seq.num_computed_tokens + num_new_tokens, seq.num_tokens)
        if known // self.block_size > seq.num_registered_blocks:
            self._register_full_blocks(seq, known)

    def release(self, seq: Sequence) -> None:
        """Drop a sequence's blocks, tail first so shared prefixes outlive tails."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        self.tables.release(seq)
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block; keys that named them as parents die with them."""
        for block_id in self.cached.values():
            self.blocks[block_id].key = None
        self.cached.clear()

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:
            del self.cached[block.key]
            block.key = None
        block.epoch += 1
        block.ref_count = 1
        return block_id

    def _register_full_blocks(self, seq: Sequence, num_tokens_known: int) -> None:
        """Cache the blocks this step fills; same-step readers see their KV because
        every layer writes the whole batch's KV before any attention reads it. Placeholder
        tokens (async scheduling) are not known yet: their blocks are offered later."""
        num_tokens_known = min(num_tokens_known, seq.num_known_tokens)
        if not self.enable_prefix_caching or not seq.cacheable:
            # Offered and declined: a sequence regains `cacheable` only after release().
            seq.num_registered_blocks = num_tokens_known // self.block_size
            return
        for index in range(seq.num_registered_blocks, num_tokens_known // self.block_size):
            block = self.blocks[seq.block_table[index]]
            if block.key is None:
                parent = _ROOT
                if index > 0:
                    parent_block = self.blocks[seq.block_table[index - 1]]
                    parent = (parent_block.block_id, parent_block.epoch)
                start = index * self.block_size
                key = (*parent, tuple(seq.token_ids[start:start + self.block_size]))
                if key not in self.cached:
                    self.cached[key] = block.block_id
                    block.key = key
            seq.num_registered_blocks = index + 1
