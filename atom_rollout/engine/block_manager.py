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

from .sequence import Sequence

_ROOT = (-1, 0)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    epoch: int = 0
    key: tuple | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 lookahead_slots: int = 0):
        self.block_size = block_size
        self.lookahead_slots = lookahead_slots  # KV slots past the step, for draft chains
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[tuple, int] = {}
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
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.hit_tokens += seq.num_cached_tokens
        self.queried_tokens += seq.num_tokens
        self.grow(seq, num_new_tokens)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens
                                    + self.lookahead_slots)
        return needed - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens
                                    + self.lookahead_slots)
        while len(seq.block_table) < needed:
            seq.block_table.append(self._take_free_block())
        # Only verified tokens may enter the prefix cache, never drafts.
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
        every layer writes the whole batch's KV before any attention reads it."""
        if not self.enable_prefix_caching or not seq.cacheable:
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
