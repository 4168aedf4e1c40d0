"""Start-up warm-up: runs on request, leaves the engine as if unused."""
from __future__ import annotations

import pytest

from atom_rollout import RolloutEngine, SamplingParams


def _engine(llama, **options) -> RolloutEngine:
    return RolloutEngine(llama[0], show_progress=False, seed=3, num_kv_blocks=128, **options)


def test_warm_engine_looks_unused_and_samples_the_same(llama, monkeypatch):
    import atom_rollout.engine.core as core_module
    queried = []  # prompt tokens the warm-up admitted, seen just before its reset
    real = core_module.warm_up

    def spy(core):
        reset = core.reset_counters
        core.reset_counters = lambda: (queried.append(
            core.stats()["prefix_cache_queried_tokens"]), reset())
        real(core)
    monkeypatch.setattr(core_module, "warm_up", spy)
    cold, warm = _engine(llama, max_num_seqs=4), _engine(llama, max_num_seqs=4, warmup=True)
    assert queried == [33 * (1 + 2 + 4)]  # CPU default off; warmup=True: n = 1, 2, 4
    stats = warm.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["prefix_cache_hit_tokens"] == stats["prefix_cache_queried_tokens"] == 0
    assert stats["num_preemptions"] == 0
    prompts = [[5, 6, 7, 8], [9, 10]]
    for params in (SamplingParams(n=2, max_tokens=6, temperature=1.0),  # unseeded: engine seed
                   SamplingParams(n=2, max_tokens=6, temperature=0.8, seed=11)):
        expected = cold.generate_batch(prompts, params)
        got = warm.generate_batch(prompts, params)
        for e, g in zip(expected, got):
            assert [s.token_ids for s in g.samples] == [s.token_ids for s in e.samples]
    # the warm-up's prompt is not served from the prefix cache afterwards
    warmup_prompt = [1 + i for i in range(33)]
    warm.generate_batch([warmup_prompt], SamplingParams(max_tokens=1))
    assert warm.stats()["prefix_cache_hit_tokens"] == 0


def test_warmup_option_is_checked(llama):
    with pytest.raises(ValueError, match="warmup"):
        _engine(llama, warmup="yes")


@pytest.mark.parametrize("options", [dict(async_scheduling=True),
                                     dict(num_speculative_tokens=2, mtp=True)],
                         ids=["async", "speculative"])
def test_warmup_with_async_scheduling_and_speculation(tmp_path, options):
    from models import build_checkpoint
    from test_mtp import _with_mtp, mtp_tensors
    build_checkpoint(tmp_path, "llama")
    path = _with_mtp(tmp_path, mtp_tensors(seed=1)) if options.pop("mtp", False) else tmp_path
    cold = RolloutEngine(str(path), show_progress=False, max_num_seqs=4, num_kv_blocks=128,
                         **options)
    warm = RolloutEngine(str(path), show_progress=False, max_num_seqs=4, num_kv_blocks=128,
                         warmup=True, **options)
    stats = warm.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["drafts_proposed"] == 0
    params = SamplingParams(n=2, max_tokens=5, temperature=1.0, seed=4)
    expected = cold.generate_batch([[5, 9, 14, 3]], params)[0].samples
    got = warm.generate_batch([[5, 9, 14, 3]], params)[0].samples
    assert [s.token_ids for s in got] == [s.token_ids for s in expected]


def test_warmup_fits_a_small_kv_pool(llama):
    from atom_rollout.engine.warmup import _most_rows
    engine = RolloutEngine(llama[0], show_progress=False, max_num_seqs=64, num_kv_blocks=24,
                           warmup=True)
    assert _most_rows(engine.core, 33) == 8  # 3 blocks per 35-token sample
    assert engine.stats()["free_kv_blocks"] == 24
    out = engine.generate_batch([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].samples[0].token_ids) == 3
