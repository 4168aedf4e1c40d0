"""BlockManager: ref counts, LRU reuse, and an exact prefix cache."""
from atom_rollout.engine.block_manager import BlockManager
from atom_rollout.engine.sequence import Sequence
from atom_rollout.sampler import SamplingParams


def _seq(tokens, seq_id=0):
    return Sequence(seq_id, "r", 0, list(tokens), len(tokens), SamplingParams(), 10**6, 0)


def _admit(bm, seq):
    hits = bm.match_prefix(seq)
    bm.allocate(seq, hits, seq.num_tokens - len(hits) * bm.block_size)
    return hits


def test_shared_prefix_is_hit_and_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(range(10)), _seq(range(10), 1)
    assert _admit(bm, a) == []
    hits = _admit(bm, b)
    assert hits == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.blocks[hits[0]].ref_count == 2
    bm.release(a)
    assert bm.blocks[hits[0]].ref_count == 1 and bm.num_free_blocks == 8 - 3


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    _admit(bm, _seq(range(8)))
    again = _seq(range(8), 1)
    assert len(_admit(bm, again)) == 1  # positions 4..7 recomputed: logits of token 7 needed


def test_hash_collision_cannot_return_wrong_block():
    # hash(-1) == hash(-2) in CPython, so these blocks' keys collide.
    assert hash((-1, 0, (5, -1))) == hash((-1, 0, (5, -2)))
    bm = BlockManager(num_blocks=8, block_size=2)
    first = _seq([5, -1, 7])
    _admit(bm, first)
    other = _seq([5, -2, 7], 1)
    assert bm.match_prefix(other) == []
    assert bm.match_prefix(_seq([5, -1, 7], 2)) == first.block_table[:1]


def test_freed_blocks_stay_cached_until_reused_oldest_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])  # blocks for [1,2], [3,4], [5]
    _admit(bm, a)
    table = list(a.block_table)
    bm.release(a)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 9], 1)) == table[:2]
    revived = _seq([1, 2, 3, 4, 9], 1)
    assert len(_admit(bm, revived)) == 2
    bm.release(revived)
    # Fill the pool with new content: cached blocks get evicted and their keys die.
    filler = _seq([8, 8, 7, 7, 6, 6, 5], 2)
    _admit(bm, filler)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 9], 3)) == []


def test_reused_parent_invalidates_children():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _admit(bm, a)
    parent, child = a.block_table[0], a.block_table[1]
    bm.release(a)
    # Reuse the parent alone and refill it with the same tokens under a new epoch.
    bm.free.move_to_end(parent, last=False)
    assert bm._take_free_block() == parent
    assert bm.blocks[child].key is not None  # the child is still cached...
    refill = _seq([1, 2, 9], 1)
    refill.block_table = [parent]
    bm._register_full_blocks(refill, 2)
    assert bm.match_prefix(_seq([1, 2, 3, 4, 5], 2)) == [parent]  # ...but no longer reachable


def test_reset_prefix_cache_forgets_everything():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _admit(bm, a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(_seq([1, 2, 3, 4, 5], 1)) == []
    assert bm.cached == {}
