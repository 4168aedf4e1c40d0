"""Async scheduling: step N+1 is launched before step N's tokens are read back (they are
fed to it on the device, stop checks run one step late). Outputs must equal the
synchronous engine's; the extra work is only ever thrown away."""
import pytest
import torch

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.engine.output_tracker import OutputTracker
from atom_rollout.engine.sequence import PLACEHOLDER
from test_host_fast_paths import PARAMS, PROMPTS

TIGHT = dict(show_progress=False, seed=0, block_size=4, num_kv_blocks=48, max_model_len=96,
             max_num_batched_tokens=48, max_num_seqs=6)


def _samples(outs):
    return [(s.token_ids, s.logprobs, s.raw_logprobs, s.top_logprobs, s.finish_reason,
             s.version_spans) for o in outs for s in o.samples]


def _assert_same(got, want):
    """Same tokens, top-k ids, reasons and versions; logprobs to fp32 rounding (a step's
    batch can differ by a sequence that already ended, which changes the matmul shape)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g[0], g[4], g[5]) == (w[0], w[4], w[5])
        for got_lps, want_lps in ((g[1], w[1]), (g[2] or [], w[2] or [])):
            assert len(got_lps) == len(want_lps)
            assert max((abs(a - b) for a, b in zip(got_lps, want_lps)), default=0) < 1e-5
        assert [[t for t, _ in row] for row in g[3] or []] == [[t for t, _ in row] for row in w[3] or []]


def test_async_matches_sync_exactly(llama, monkeypatch):
    sync = RolloutEngine(llama[0], async_scheduling=False, **TIGHT)
    expected, sync_stats = _samples(sync.generate_batch(PROMPTS, PARAMS)), sync.stats()
    engine = RolloutEngine(llama[0], async_scheduling=True, **TIGHT)
    paths = {"overlapped": 0, "needs_room": 0}
    core = engine.core
    schedule = core.scheduler.schedule

    def watched_schedule(overlapped=False):
        batch = schedule(overlapped)
        paths["overlapped"] += overlapped and bool(batch.seqs) and not batch.needs_room
        paths["needs_room"] += batch.needs_room
        return batch
    core.scheduler.schedule = watched_schedule
    got = _samples(engine.generate_batch(PROMPTS, PARAMS))
    _assert_same(got, expected)
    assert paths["overlapped"] > 20 and paths["needs_room"] > 0
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"] == sync_stats["free_kv_blocks"]
    assert not core.has_work() and core._in_flight is None


def test_stop_token_found_one_step_late_drops_the_extra_token(llama):
    """Greedy, stopping on a token the model emits: the async engine has already
    launched one more step for it; that token must vanish."""
    prompt = list(range(3, 15))
    free = RolloutEngine(llama[0], async_scheduling=False, show_progress=False)
    tokens = free.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=20,
                                                          ignore_eos=True))[0].samples[0].token_ids
    stop = tokens[5]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop])
    want = free.generate_batch([prompt], params)[0].samples[0]
    engine = RolloutEngine(llama[0], async_scheduling=True, show_progress=False)
    got = engine.generate_batch([prompt], params)[0].samples[0]
    assert got.token_ids == want.token_ids == tokens[:tokens.index(stop) + 1]
    assert got.finish_reason == "stop" and len(got.logprobs) == len(got.token_ids)
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-5
    stats = engine.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


def test_streamed_deltas_never_carry_placeholders(llama):
    engine = RolloutEngine(llama[0], async_scheduling=True, show_progress=False, seed=0)
    core, tracker = engine.core, OutputTracker()
    params = SamplingParams(n=3, temperature=1.0, max_tokens=15, ignore_eos=True)
    tracker.add("r", core.add_request("r", list(range(3, 12)), params), stream=True)
    streamed: dict[int, list[int]] = {}
    ends = {}
    while core.has_work():
        core.step()
        for delta in tracker.collect(core.weight_version):
            assert PLACEHOLDER not in delta.token_ids
            assert len(delta.token_ids) == len(delta.logprobs)
            streamed.setdefault(delta.sample_index, []).extend(delta.token_ids)
            if delta.finish_reason:
                ends[delta.sample_index] = delta.finish_reason
    assert ends == {0: "length", 1: "length", 2: "length"}
    assert all(len(tokens) == 15 for tokens in streamed.values())
    sync = RolloutEngine(llama[0], async_scheduling=False, show_progress=False, seed=0)
    want = sync.generate_batch([list(range(3, 12))], params)[0].samples
    assert [streamed[j] for j in range(3)] == [s.token_ids for s in want]


@pytest.mark.parametrize("inflight", ["keep", "recompute", "abort"])
def test_weight_update_while_a_step_is_in_flight(llama, inflight):
    """update_weights first resolves the step in flight: every token it reports was
    made by the weights named in its version span, exactly as without overlap."""
    prompt, params = list(range(3, 14)), SamplingParams(temperature=0, max_tokens=12,
                                                        ignore_eos=True)

    def run(async_scheduling: bool):
        engine = RolloutEngine(llama[0], async_scheduling=async_scheduling,
                               show_progress=False)
        core = engine.core
        (seq,) = core.add_request("r", prompt, params)
        while seq.num_known_output_tokens < 4:
            core.step()
        if async_scheduling:
            assert core._in_flight is not None  # the update really meets a step in flight
        named = [(n, p.detach() * 1.01) for n, p in llama[1].named_parameters()]
        core.update_weights(named, inflight=inflight)
        assert seq.num_placeholders == 0
        while core.has_work():
            core.step()
        assert PLACEHOLDER not in seq.token_ids
        return seq.output_token_ids, seq.logprobs, seq.version_spans, seq.finish_reason

    got, want = run(True), run(False)
    assert got[3] == want[3] == ("abort" if inflight == "abort" else "length")
    assert got[2][0][0] == 0 and (inflight == "abort" or got[2][-1][0] == 1)
    if inflight == "abort":
        assert len(got[0]) >= 4 and got[2] == [[0, 0, len(got[0])]]
    else:
        assert len(got[0]) == 12
        switch = got[2][0][2]
        want_tokens = _continue_sync(llama, prompt, params, got[0][:switch], inflight)
        assert got[0] == want_tokens


def _continue_sync(llama, prompt, params, first_tokens, inflight):
    """The synchronous engine, updated after exactly len(first_tokens) tokens."""
    engine = RolloutEngine(llama[0], async_scheduling=False, show_progress=False)
    core = engine.core
    (seq,) = core.add_request("r", prompt, params)
    while seq.num_output_tokens < len(first_tokens):
        core.step()
    assert seq.output_token_ids == first_tokens
    core.update_weights([(n, p.detach() * 1.01) for n, p in llama[1].named_parameters()],
                        inflight=inflight)
    while core.has_work():
        core.step()
    return seq.output_token_ids


def test_abort_while_in_flight_frees_everything(llama):
    engine = RolloutEngine(llama[0], async_scheduling=True, show_progress=False)
    core = engine.core
    seqs = core.add_request("r", list(range(3, 20)), SamplingParams(n=4, max_tokens=30,
                                                                    ignore_eos=True))
    for _ in range(6):
        core.step()
    assert core._in_flight is not None
    core.abort(seqs)
    while core.has_work():
        core.step()
    assert all(s.finish_reason == "abort" and PLACEHOLDER not in s.token_ids
               and len(s.logprobs) == s.num_output_tokens for s in seqs)
    stats = engine.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


def test_async_scheduling_option_is_checked(llama, monkeypatch):
    with pytest.raises(ValueError, match="async_scheduling"):
        RolloutEngine(llama[0], async_scheduling="yes", show_progress=False)
    monkeypatch.delenv("ATOM_ROLLOUT_ASYNC_SCHEDULING", raising=False)
    engine = RolloutEngine(llama[0], show_progress=False)
    assert engine.core.async_scheduling is False  # CPU default
    assert torch.device(engine.core.device).type == "cpu"
    monkeypatch.setenv("ATOM_ROLLOUT_ASYNC_SCHEDULING", "1")  # the default, not the option
    assert RolloutEngine(llama[0], show_progress=False).core.async_scheduling is True
    engine = RolloutEngine(llama[0], show_progress=False, async_scheduling=False)
    assert engine.core.async_scheduling is False
