"""The per-step host fast paths (decode inputs, block-table mirror, cached sampling rows,
packed upload) give bit-identical results to the general paths they shortcut."""
import numpy as np
import pytest
import torch

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.engine import block_manager, model_runner, sampling_rows, scheduler
from atom_rollout.engine.block_manager import BlockManager, BlockTables
from atom_rollout.engine.sequence import Sequence

PROMPTS = [list(range(3 + i, 20 + 3 * i)) for i in range(7)] + [list(range(3, 20))]
PARAMS = [
    SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=30, ignore_eos=True, seed=1),
    SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[5, 9], max_tokens=25,
                   seed=2),
    SamplingParams(temperature=0.7, logprobs=2, return_raw_logprobs=True, max_tokens=21,
                   ignore_eos=True),
    SamplingParams(n=3, temperature=1.0, min_p=0.05, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.6, top_k=5, max_tokens=28, ignore_eos=True),
    SamplingParams(temperature=0.6, max_tokens=9),
    SamplingParams(n=2, temperature=0.6, max_tokens=23, ignore_eos=True, seed=3),
]


def _check_mirror(core) -> None:
    tables = core.block_manager.tables
    for seq in core.scheduler.running:
        row = tables.array[seq.table_row]
        assert row[:len(seq.block_table)].tolist() == seq.block_table
        assert (row[len(seq.block_table):] == -1).all()
        assert tables.lengths[seq.table_row] == len(seq.block_table)


def _generate(model_dir: str, check_mirror: bool):
    # Tight KV and batch limits: preemption, admissions mid-decode, sequences finishing
    # at different steps (so the cached sampling rows are rebuilt).
    engine = RolloutEngine(model_dir, show_progress=False, seed=0, block_size=4,
                           num_kv_blocks=48, max_model_len=96, max_num_batched_tokens=48,
                           max_num_seqs=6)
    if check_mirror:
        step = engine.core.step

        def checked_step():
            finished = step()
            _check_mirror(engine.core)
            return finished
        engine.core.step = checked_step
    outs = engine.generate_batch(PROMPTS, PARAMS)
    samples = [(s.token_ids, s.logprobs, s.raw_logprobs, s.top_logprobs, s.finish_reason)
               for o in outs for s in o.samples]
    return samples, engine.stats()


def test_fast_paths_match_the_general_paths_exactly(llama, monkeypatch):
    fast, fast_stats = _generate(llama[0], check_mirror=True)
    assert fast_stats["num_preemptions"] > 0 and fast_stats["prefix_cache_hit_tokens"] > 0
    monkeypatch.setattr(scheduler.ScheduledBatch, "is_decode", property(lambda self: False))
    monkeypatch.setattr(block_manager.BlockManager, "grow_if_free", lambda self, seq, n: False)
    monkeypatch.setattr(model_runner, "_upload_packed", _upload_one_by_one)
    monkeypatch.setattr(sampling_rows.SamplingRows, "build", _uncached_build)
    monkeypatch.setattr(model_runner.ModelRunner, "_block_tables",
                        lambda self, batch: model_runner._padded_tables(
                            [s.block_table for s in batch.seqs]))
    slow, slow_stats = _generate(llama[0], check_mirror=False)
    assert fast == slow  # tokens, logprobs, raw and top logprobs: bit for bit
    assert fast_stats == slow_stats


def _upload_one_by_one(arrays, device):
    return [torch.from_numpy(np.array(a)) for a in arrays]


_original_build = sampling_rows.SamplingRows.build


def _uncached_build(seqs):
    rows = _original_build(seqs)
    rows.seqs = []  # never equal to the next step's sequences: rebuilt every step
    return rows


def test_upload_packed_round_trips_and_aligns():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-2**40, 2**40, 3), rng.random(5).astype(np.float32),
              rng.integers(-9, 9, (3, 7)).astype(np.int32), rng.random(1),
              np.arange(0, dtype=np.int64), rng.integers(0, 9, (2, 5)),
              np.array([7], dtype=np.int32)]
    views = model_runner._upload_packed(arrays, torch.device("cpu"))
    for array, view in zip(arrays, views):
        assert view.dtype == torch.from_numpy(array).dtype
        assert view.shape == array.shape and view.is_contiguous()
        assert np.array_equal(view.numpy(), array)
        assert view.data_ptr() % 16 == 0 or view.numel() == 0


def test_block_tables_mirror_lists_through_growth_and_reuse():
    tables = BlockTables(rows=1, cols=2)
    a = Sequence(0, "r", 0, [1], 1, SamplingParams(), 100, 0)
    b = Sequence(1, "r", 0, [1], 1, SamplingParams(), 100, 0)
    a.block_table = [4, 5, 6]
    tables.sync(a, 0)
    b.block_table = [7]
    tables.sync(b, 0)  # a second row and wider columns
    a.block_table.append(8)
    tables.sync(a, 3)
    rows = np.array([a.table_row, b.table_row])
    assert tables.gather(rows).tolist() == [[4, 5, 6, 8], [7, -1, -1, -1]]
    tables.release(a)
    c = Sequence(2, "r", 0, [1], 1, SamplingParams(), 100, 0)
    c.block_table = [9]
    tables.sync(c, 0)  # reuses a's row: no stale entries
    assert tables.gather(np.array([c.table_row])).tolist() == [[9]]
    assert tables.array[c.table_row, 1:].tolist() == [-1] * (tables.array.shape[1] - 1)


@pytest.mark.parametrize("lookahead", [0, 3])
@pytest.mark.parametrize("step_tokens", [1, 4])  # a decode step, a k = 3 verify step
def test_grow_if_free_is_grow(lookahead, step_tokens):
    def run(use_fast: bool):
        bm = BlockManager(num_blocks=64, block_size=4, lookahead_slots=lookahead)
        seq = Sequence(0, "r", 0, list(range(10, 17)), 7, SamplingParams(), 200, 0)
        bm.allocate(seq, bm.match_prefix(seq), seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        states = []
        for token in range(30):
            seq.token_ids.append(token)
            seq.draft_tokens = [1] * (step_tokens - 1)
            if not (use_fast and bm.grow_if_free(seq, step_tokens)):
                bm.grow(seq, step_tokens)
            seq.num_computed_tokens += 1  # one token verified, the drafts' KV rejected
            states.append((list(seq.block_table), seq.num_registered_blocks,
                           dict(bm.cached), bm.num_free_blocks))
        return states
    assert run(True) == run(False)


def test_grow_if_free_leaves_a_full_pool_alone():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = Sequence(0, "r", 0, list(range(10, 19)), 9, SamplingParams(), 100, 0)
    bm.allocate(seq, [], seq.num_tokens)  # 9 tokens: all 3 blocks
    seq.num_computed_tokens = seq.num_tokens
    table = list(seq.block_table)
    assert bm.grow_if_free(seq, 3)  # positions 9..11 still fit the third block
    assert not bm.grow_if_free(seq, 4) and seq.block_table == table


@pytest.mark.parametrize("rows", [1, 8, 9, 300])
def test_host_noise_is_bit_identical_to_the_torch_formula(rows):
    from atom_rollout.sampler import noise
    gen = torch.Generator().manual_seed(rows)
    keys = torch.randint(-2**63, 2**63 - 1, (rows,), dtype=torch.int64, generator=gen)
    counters = torch.randint(0, 2**40, (rows,), dtype=torch.int64, generator=gen)
    reference = noise._uniforms(keys, counters)  # the torch ops, as run on a device
    assert torch.equal(noise.row_uniforms(keys, counters), reference)
    host = noise.row_uniforms_np(keys.numpy(), counters.numpy())
    assert host.dtype == np.float64 and torch.equal(torch.from_numpy(host), reference)


def test_sampling_rows_match_the_per_step_formulas():
    from atom_rollout.sampler.noise import signed64
    params = PARAMS + [SamplingParams(temperature=0.5, top_p=0.99999999),
                       SamplingParams(temperature=1e-50, min_p=0.2)]
    keys = [0, 1, 2**63 - 1, 2**63, 2**64 - 1] + [7 * i + 2**62 for i in range(len(params))]
    for subset in (params, params[1:2], params[-2:], params[4:5]):
        seqs = [Sequence(i, "r", 0, [1] * (i + 2), i + 1, p, 99, keys[i])
                for i, p in enumerate(subset)]
        rows = sampling_rows.SamplingRows.build(seqs)
        as_list = lambda a: a.tolist()  # noqa: E731
        assert as_list(rows.temperature) == torch.tensor(
            [p.temperature for p in subset], dtype=torch.float32).tolist()
        assert as_list(rows.top_p) == torch.tensor([p.top_p for p in subset],
                                                   dtype=torch.float32).tolist()
        assert as_list(rows.min_p) == torch.tensor([p.min_p for p in subset],
                                                   dtype=torch.float32).tolist()
        assert as_list(rows.top_k) == [p.top_k for p in subset]
        assert as_list(rows.keys) == [signed64(s.noise_key) for s in seqs]
        assert rows.use_sort == any(p.top_k > 0 or p.top_p < 1 for p in subset if not p.greedy)
        assert rows.use_min_p == any(p.min_p > 0 for p in subset if not p.greedy)
        assert rows.all_greedy == all(p.greedy for p in subset)
        assert rows.any_greedy == any(p.greedy for p in subset)
        assert rows.need_raw == (any(p.greedy for p in subset)
                                 or any(p.return_raw_logprobs for p in subset))
        assert rows.num_top_logprobs == max(p.logprobs or 0 for p in subset)


def test_append_tokens_is_append_token_of_each():
    def fresh():
        return Sequence(0, "r", 0, [1, 2, 3], 3, SamplingParams(), 100, 0)
    one_by_one, bulk = fresh(), fresh()
    steps = [([5, 6], [-0.1, -0.2], 0), ([7], [-0.3], 0), ([8, 9, 10], [-1.0, -2.0, -3.0], 1),
             ([11, 12], [-0.5, -0.6], 3)]
    for tokens, logprobs, version in steps:
        for token, logprob in zip(tokens, logprobs):
            one_by_one.append_token(token, logprob, version)
        bulk.append_tokens(tokens, logprobs, version)
    assert bulk.token_ids == one_by_one.token_ids
    assert bulk.logprobs == one_by_one.logprobs
    assert bulk.version_spans == one_by_one.version_spans == [[0, 0, 3], [1, 3, 6], [3, 6, 8]]
