"""Decode/verify graphs (engine/cuda_graphs.py) with and without MTP speculation.

On CPU, DecodeGraphs runs its padded static-buffer forward eagerly, which checks the
layout, padding and runner plumbing; the CUDA tests replay real graphs."""
import collections
import dataclasses

import pytest
import torch

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.engine.cuda_graphs import DecodeGraphs
from conftest import hf_logits
from models import add_mtp_head, build_checkpoint

PROMPTS = [[5, 9, 14, 3], [7] * 21, list(range(10, 47)), [4, 4, 8], list(range(60, 71))]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """A head distilled on PROMPTS: drafts are often accepted, several per step."""
    path = tmp_path_factory.mktemp("mtp_graphs")
    model = build_checkpoint(path, "llama")
    return add_mtp_head(path, model, PROMPTS), model


def _cpu_graphs(engine, query_lens, max_batch=8) -> collections.Counter:
    """Give a CPU engine DecodeGraphs (run eagerly); returns replays counted by q (and
    under "fused" the fused speculative steps, under "chained" those launched on the
    inputs the previous one wrote)."""
    core = engine.core
    graphs = DecodeGraphs(core.model, core.ops, core.runner.kv_caches, max_batch,
                          core.max_model_len + 2 * core.num_draft, core.config.block_size,
                          core.device, query_lens=query_lens, keep_hidden=bool(core.num_draft))
    graphs.capture()
    calls, run, run_tail = collections.Counter(), graphs.run, graphs.run_tail
    fused = core.runner.fused_speculation
    chain = fused.chain if fused is not None else None

    def counted(query_len, *args):
        calls[query_len] += 1
        return run(query_len, *args)

    def counted_tail(tail, query_len, *args):
        calls[query_len] += 1
        calls["fused"] += 1
        return run_tail(tail, query_len, *args)

    def counted_chain(*args):
        calls["chained"] += 1
        calls["padding_rows"] += len(args[3])  # finished sequences' rows kept as padding
        return chain(*args)
    graphs.run, graphs.run_tail = counted, counted_tail
    if fused is not None:
        fused.chain = counted_chain
    core.runner.graphs = graphs
    return calls


def _tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


def _assert_same(outs, ref, atol):
    assert _tokens(outs) == _tokens(ref)
    for out, r in zip(outs, ref):
        for a, b in zip(out.samples, r.samples):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_verify_graphs_keep_greedy_exact(mtp_checkpoint, k, batch):
    model_dir, _ = mtp_checkpoint
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = RolloutEngine(model_dir, device="cpu", show_progress=False).generate_batch(
        PROMPTS[:batch], greedy)
    engine = RolloutEngine(model_dir, device="cpu", show_progress=False,
                           num_speculative_tokens=k)
    calls = _cpu_graphs(engine, (k + 1,))
    _assert_same(engine.generate_batch(PROMPTS[:batch], greedy), plain, 1e-4)
    assert calls[k + 1] > 0 and engine.stats()["drafts_proposed"] > 0
    stats = engine.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


def _assert_processed_logprobs(model, prompts, outs, params, atol: float) -> None:
    """Every sample's logprobs equal transformers' processed logprobs of its tokens."""
    from test_generate_vs_transformers import _hf_processed
    for prompt, out in zip(prompts, outs):
        for sample in out.samples:
            logits = hf_logits(model, prompt + sample.token_ids)[len(prompt) - 1:-1]
            expected = _hf_processed(logits, params).gather(
                -1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=atol)


def test_cpu_verify_graphs_sampled_logprobs_are_the_targets(mtp_checkpoint):
    model_dir, model = mtp_checkpoint
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True,
                            seed=3)
    engine = RolloutEngine(model_dir, device="cpu", show_progress=False,
                           num_speculative_tokens=3)
    calls = _cpu_graphs(engine, (4,), max_batch=4)  # 10 samples: eager until 4 are left
    outs = engine.generate_batch(PROMPTS, params)
    assert calls[4] > 0 and calls["fused"] > 0
    _assert_processed_logprobs(model, PROMPTS, outs, params, 1e-4)
    eager = RolloutEngine(model_dir, device="cpu", show_progress=False,
                          num_speculative_tokens=3)
    _assert_same(outs, eager.generate_batch(PROMPTS, params), 1e-4)


MIXED = [SamplingParams(n=2, temperature=0, max_tokens=9, ignore_eos=True),
         SamplingParams(n=2, temperature=0.9, top_k=7, max_tokens=17, ignore_eos=True, seed=2),
         SamplingParams(temperature=1.0, min_p=0.05, max_tokens=13, ignore_eos=True, seed=4),
         SamplingParams(temperature=1.0, max_tokens=21, ignore_eos=True, seed=6),
         SamplingParams(n=2, temperature=0.7, top_p=0.8, max_tokens=15, ignore_eos=True)]


@pytest.mark.parametrize("k", [2, 4])
def test_cpu_fused_speculative_steps_equal_the_eager_path(mtp_checkpoint, k):
    """Greedy and sampled rows with every filter in one batch, padded (8 rows in 16),
    rows leaving at different steps: the one-graph step draws what the eager
    speculative path draws, and the engine frees every block."""
    model_dir, model = mtp_checkpoint
    engine = RolloutEngine(model_dir, device="cpu", show_progress=False, seed=11,
                           num_speculative_tokens=k)
    calls = _cpu_graphs(engine, (k + 1,), max_batch=16)
    outs = engine.generate_batch(PROMPTS, MIXED)
    assert calls["fused"] > 0 and engine.core.runner.fused_speculation.num_steps > 0
    assert calls["chained"] > 0  # steps launched on the inputs the previous step wrote
    eager = RolloutEngine(model_dir, device="cpu", show_progress=False, seed=11,
                          num_speculative_tokens=k)
    _assert_same(outs, eager.generate_batch(PROMPTS, MIXED), 1e-4)
    stats = engine.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["drafts_proposed"] == eager.stats()["drafts_proposed"]


def test_cpu_triton_passes_in_the_engine_draw_the_torch_tokens(mtp_checkpoint):
    """The speculator's Triton passes (greedy argmax, one-pass processed rows, fused
    draft draws, verification, uniforms; under the interpreter on CPU), in the fused and
    the eager steps of an engine, draw the torch path's tokens for every kind of row."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":  # the engine runs on CPU tensors
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1)")
    model_dir, _ = mtp_checkpoint
    options = dict(device="cpu", show_progress=False, seed=7, num_speculative_tokens=2)
    engine = RolloutEngine(model_dir, **options)
    engine.core.runner.speculator.fused = True  # the Triton backend's choice (ops.name)
    calls = _cpu_graphs(engine, (3,), max_batch=16)
    hot = [dataclasses.replace(p, temperature=2 * p.temperature) for p in MIXED]  # flatter
    outs = engine.generate_batch(PROMPTS, hot)
    assert calls["fused"] > 0 and calls["chained"] > 0
    _assert_same(outs, RolloutEngine(model_dir, **options).generate_batch(PROMPTS, hot), 1e-4)


def test_cpu_chained_steps_stop_and_admit_as_the_eager_path_does(mtp_checkpoint):
    """Stop tokens met mid-chain (the chained step's rows of a finished sequence are
    dropped) and requests waiting for a slot (chaining pauses to admit them): same tokens,
    logprobs and stats as the eager path, every block freed."""
    model_dir, _ = mtp_checkpoint
    options = dict(device="cpu", show_progress=False, seed=3, num_speculative_tokens=3,
                   max_num_seqs=3)
    eager = RolloutEngine(model_dir, **options)
    first = eager.generate_batch(PROMPTS, MIXED)
    stop = first[1].samples[0].token_ids[6]  # emitted mid-sequence by a sampled row
    params = [SamplingParams(**{**p.__dict__, "ignore_eos": False, "stop_token_ids": [stop]})
              for p in MIXED]
    engine = RolloutEngine(model_dir, **options)
    calls = _cpu_graphs(engine, (4,), max_batch=4)
    outs = engine.generate_batch(PROMPTS, params)
    assert calls["chained"] > 0
    reference = RolloutEngine(model_dir, **options).generate_batch(PROMPTS, params)
    _assert_same(outs, reference, 1e-4)
    assert [s.finish_reason for o in outs for s in o.samples] == \
        [s.finish_reason for o in reference for s in o.samples]
    assert any(s.finish_reason == "stop" for o in outs for s in o.samples)
    stats = engine.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


@pytest.mark.parametrize("num_kv_blocks", [None, 24])
def test_cpu_chain_runs_on_past_finished_sequences(mtp_checkpoint, num_kv_blocks):
    """Sequences ending at different steps stay in the chain as padding rows (no KV
    writes: with a tight pool (24 blocks) the live ones grow into the blocks the finished
    ones freed) until half the rows are padding: same tokens and logprobs as the eager
    path, every block freed."""
    model_dir, _ = mtp_checkpoint
    options = dict(device="cpu", show_progress=False, seed=5, num_speculative_tokens=2,
                   num_kv_blocks=num_kv_blocks, enable_prefix_caching=False)
    params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, seed=n)
              for n in (6, 60, 12, 58, 20, 57, 30, 56)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    engine = RolloutEngine(model_dir, **options)
    calls = _cpu_graphs(engine, (3,), max_batch=8)
    outs = engine.generate_batch(prompts, params)
    assert calls["padding_rows"] > 0 and calls["chained"] > 20
    _assert_same(outs, RolloutEngine(model_dir, **options).generate_batch(prompts, params),
                 1e-4)
    stats = engine.stats()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


def test_cpu_decode_graphs_of_a_speculative_engine(mtp_checkpoint):
    """A token budget below k + 1 drops every draft: the speculative engine then runs
    1-token decode steps, whose graphs must also return hidden states."""
    model_dir, _ = mtp_checkpoint
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = RolloutEngine(model_dir, device="cpu", show_progress=False).generate_batch(
        PROMPTS[:1], greedy)
    engine = RolloutEngine(model_dir, device="cpu", show_progress=False, num_speculative_tokens=3,
                           max_num_batched_tokens=3)
    calls = _cpu_graphs(engine, (1, 4))
    _assert_same(engine.generate_batch(PROMPTS[:1], greedy), plain, 1e-4)
    assert calls[1] > 0


def test_cpu_decode_graphs_with_a_one_token_prompt_chunk(mtp_checkpoint):
    """A tight budget schedules decodes next to a 1-token prompt chunk that samples
    nothing: the graph's logits must be narrowed to the sampling rows."""
    model_dir, _ = mtp_checkpoint
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=1)
    prompts = [[5, 6], [7, 8], list(range(20, 30))]
    plain = RolloutEngine(model_dir, device="cpu", show_progress=False).generate_batch(
        prompts, params)
    engine = RolloutEngine(model_dir, device="cpu", show_progress=False, max_num_batched_tokens=3)
    calls = _cpu_graphs(engine, (1,))
    _assert_same(engine.generate_batch(prompts, params), plain, 1e-4)
    assert calls[1] > 0


# ---- CUDA: real graph replays

def _gpu_engine(model_dir, dtype, **options):
    return RolloutEngine(model_dir, device="cuda", dtype=dtype, show_progress=False,
                         max_num_seqs=16, **options)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_gpu_speculative_graphs_equal_eager_and_plain(mtp_checkpoint, k, batch):
    model_dir, _ = mtp_checkpoint
    prompts = PROMPTS[:batch]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = _gpu_engine(model_dir, "float32").generate_batch(prompts, greedy)
    graphed = _gpu_engine(model_dir, "float32", num_speculative_tokens=k)
    assert graphed.core.runner.graphs is not None
    replays = collections.Counter()
    graphs = graphed.core.runner.graphs
    run_tail = graphs.run_tail
    graphs.run_tail = lambda tail, q, *a: replays.update([q]) or run_tail(tail, q, *a)
    eager = _gpu_engine(model_dir, "float32", num_speculative_tokens=k, enforce_eager=True)
    assert eager.core.runner.graphs is None
    out_graphs = graphed.generate_batch(prompts, greedy)
    assert replays[k + 1] > 0
    _assert_same(out_graphs, plain, 1e-4)
    _assert_same(eager.generate_batch(prompts, greedy), plain, 1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_gpu_speculative_graphs_sampled_logprobs(mtp_checkpoint, k, batch):
    model_dir, model = mtp_checkpoint
    prompts = PROMPTS[:batch]
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True,
                            seed=5)
    graphed = _gpu_engine(model_dir, "float32", num_speculative_tokens=k)
    outs = graphed.generate_batch(prompts, params)
    _assert_processed_logprobs(model, prompts, outs, params, 1e-3)
    eager = _gpu_engine(model_dir, "float32", num_speculative_tokens=k, enforce_eager=True)
    _assert_same(outs, eager.generate_batch(prompts, params), 1e-3)


def test_cpu_fused_drafts_of_a_sequence_left_out_are_copied_out(mtp_checkpoint):
    """Draft distributions live in rows of one buffer that the next fused step rewrites;
    a sequence that step leaves out keeps a copy of its own."""
    from atom_rollout.engine.speculation import BufferedDraft, draft_distributions
    model_dir, _ = mtp_checkpoint
    engine = RolloutEngine(model_dir, device="cpu", show_progress=False,
                           num_speculative_tokens=2)
    _cpu_graphs(engine, (3,))
    core, fused = engine.core, engine.core.runner.fused_speculation
    params = SamplingParams(n=2, temperature=1.0, max_tokens=30, ignore_eos=True, seed=1)
    seqs = core.add_request("r", PROMPTS[0], params)
    while fused.num_steps == 0:
        core.step()
    assert all(isinstance(s.draft_logprobs, BufferedDraft) for s in seqs)
    before = draft_distributions(seqs[0].draft_logprobs).clone()
    fused._copy_out_leavers(seqs[1:])
    assert isinstance(seqs[0].draft_logprobs, torch.Tensor)
    assert isinstance(seqs[1].draft_logprobs, BufferedDraft)
    with torch.inference_mode():
        fused._rows.draft_logp.fill_(0.0)
    assert torch.equal(seqs[0].draft_logprobs, before)


def test_next_inputs_of_a_chained_step():
    """The tail's inputs for the next verify step: final token then drafts, positions
    after the accepted run, slots from the tables; a position whose block is missing or
    past the table's width, and every padded row, gets slot -1."""
    from types import SimpleNamespace

    from atom_rollout.engine.fused_speculation import _write_next_inputs
    bs, size = 4, 3  # k = 2 drafts
    graphs = SimpleNamespace(block_size=bs, input_ids=torch.full((9,), 7),
                             positions=torch.zeros(9, dtype=torch.int64),
                             slot_mapping=torch.zeros(9, dtype=torch.int64),
                             context_lens=torch.zeros(3, dtype=torch.int32),
                             block_tables=torch.tensor([[5, 6, 9], [2, -1, -1], [0, 0, 0]],
                                                       dtype=torch.int32))
    out = SimpleNamespace(token_ids=torch.tensor([[11, 12, 13], [21, -1, -1], [31, 32, 33]]),
                          num_accepted=torch.tensor([2, 0, 1]))
    drafts = torch.tensor([[40, 41], [50, 51], [60, 61]])
    starts = torch.tensor([6, 2, 0])  # row 0 verified positions 6..8, row 1 2..4
    live = torch.tensor([True, True, False])  # row 2 pads the batch
    _write_next_inputs(graphs, size, out, drafts, starts, live)
    assert graphs.input_ids.tolist() == [13, 40, 41, 21, 50, 51, 0, 0, 0]
    assert graphs.positions.tolist() == [9, 10, 11, 3, 4, 5, 0, 0, 0]
    # row 0: positions 9..11 sit in its third block (9); row 1: 4 and 5 have no block
    assert graphs.slot_mapping.tolist() == [9 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3,
                                            2 * 4 + 3, -1, -1, -1, -1, -1]
    assert graphs.context_lens.tolist() == [12, 6, 3]
    _write_next_inputs(graphs, size, out, drafts, starts + 1, live)  # row 0: 10..12
    assert graphs.slot_mapping[:3].tolist() == [9 * 4 + 2, 9 * 4 + 3, -1]  # 12: past width


def test_cpu_weight_update_during_a_chain_drains_it_first(mtp_checkpoint):
    """An update while a chained step is in flight first reads it back: the tokens of a
    run whose weights are re-sent unchanged stay those of a run without the update, and
    every token sampled before the update carries the old version."""
    model_dir, _ = mtp_checkpoint
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True, seed=9)

    def run(update: bool):
        engine = RolloutEngine(model_dir, device="cpu", show_progress=False,
                               num_speculative_tokens=2)
        calls = _cpu_graphs(engine, (3,))
        core = engine.core
        seqs = core.add_request("r", PROMPTS[2], params)
        while calls["chained"] < 2:
            core.step()
        known = [len(s.token_ids) for s in seqs]
        if update:
            assert core._in_flight is not None
            core.update_weights_from_disk(model_dir, inflight="keep")  # the same weights
            assert core._in_flight is None
        while not all(s.is_finished for s in seqs):
            core.step()
        return seqs, known
    plain, _ = run(False)
    updated, known = run(True)
    assert [s.token_ids for s in updated] == [s.token_ids for s in plain]
    for seq, before in zip(updated, known):
        first = seq.version_spans[0]
        assert first[0] == 0 and first[2] - first[1] >= before - seq.num_prompt_tokens
        assert seq.version_spans[-1][0] == 1
