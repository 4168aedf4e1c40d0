"""The decode step's device-side inputs and outputs on the Triton backend: the one-launch
loader of CUDA-graph inputs (kernels/triton/step_inputs.py) against DecodeGraphs' torch
copies, the overlapped-token feed, and fused_sample writing one packed float64 output.
Without a GPU the kernels run under the Triton interpreter on CPU."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from atom_rollout import RolloutEngine, SamplingParams  # noqa: E402
from atom_rollout.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from atom_rollout.engine.scheduler import ScheduledBatch  # noqa: E402
from atom_rollout.engine.token_feed import TokenFeed, placeholder_sources  # noqa: E402
from atom_rollout.sampler import SamplingTensors, sample  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def kernels():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    # Imported here so that the kernels are decorated after TRITON_INTERPRET is set.
    from atom_rollout.kernels.triton.sampling import fused_sample
    from atom_rollout.kernels.triton.step_inputs import load_step_inputs
    return SimpleNamespace(load=load_step_inputs, sample=fused_sample)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _graphs(max_context_len: int, block_size: int, loader=None) -> DecodeGraphs:
    """DecodeGraphs' static buffers (8 rows, q = 1, 3, 4) full of stale values; loader:
    the Triton step loader, None for the torch copies."""
    graphs = DecodeGraphs(None, SimpleNamespace(name="torch"), None, 8, max_context_len,
                          block_size, DEVICE, query_lens=(1, 3, 4))
    graphs.step_loader = loader
    generator = torch.Generator().manual_seed(1)
    for buffer in _static(graphs):
        buffer.copy_(torch.randint(-3, 900, buffer.shape, generator=generator))
    return graphs


def _static(graphs: DecodeGraphs) -> tuple[torch.Tensor, ...]:
    return (graphs.input_ids, graphs.positions, graphs.slot_mapping, graphs.context_lens,
            graphs.block_tables)


def _step(batch: int, query_len: int, width: int):
    tokens = batch * query_len
    return (torch.randint(0, 1000, (tokens,), device=DEVICE),
            torch.randint(0, 1000, (tokens,), device=DEVICE),
            torch.randint(0, 1000, (tokens,), device=DEVICE),
            torch.randint(1, 100, (batch,), dtype=torch.int32, device=DEVICE),
            torch.randint(0, 50, (batch, width), dtype=torch.int32, device=DEVICE))


# (batch, query_len, table width, block_size, max_context_len, fed tokens):
# padded 3 -> 4; a verify shape padded 5 -> 8 whose padding spans 2 blocks; an unpadded
# full-width table; q = 4 over 1-token blocks (4 padding blocks); a table wider than one
# copy iteration (TABLE_BLOCK columns); a single sequence
CASES = [(3, 1, 2, 4, 64, [2, -1, 0]),
         (5, 3, 3, 2, 40, [-1, -1, 1, -1, -1, -1, -1, -1, -1, -1, -1, 0, -1, -1, 3]),
         (4, 1, 16, 4, 64, None),
         (3, 4, 7, 1, 20, [-1, -1, -1, 1, -1, -1, -1, -1, -1, -1, -1, 0]),
         (6, 1, 200, 1, 300, [-1, 4, -1, -1, 0, -1]),
         (1, 1, 1, 16, 64, [0])]


@pytest.mark.parametrize("batch,query_len,width,block_size,max_context_len,sources", CASES,
                         ids=str)
def test_step_loader_equals_the_torch_load(kernels, batch, query_len, width, block_size,
                                           max_context_len, sources):
    ref = _graphs(max_context_len, block_size)
    tri = _graphs(max_context_len, block_size, kernels.load)
    step = _step(batch, query_len, width)
    fed = torch.arange(700, 705, device=DEVICE)
    feed = None if sources is None else torch.tensor(sources, device=DEVICE)
    sizes = [graphs.load(query_len, step[0].clone(), *step[1:],
                         None if feed is None else TokenFeed(feed, fed))
             for graphs in (ref, tri)]
    assert sizes[0] == sizes[1] == ref.padded_size(batch)
    for name, want, got in zip(("ids", "positions", "slots", "context", "tables"),
                               _static(ref), _static(tri)):
        assert torch.equal(got, want), name
    ids = tri.input_ids[:batch * query_len]
    if feed is None:
        assert torch.equal(ids, step[0])
    else:
        assert torch.equal(ids, torch.where(feed < 0, step[0], fed[feed.clamp(min=0)]))


def test_step_loader_pads_like_pad(kernels):
    """The padding rows' values, spelled out: slot -1, context q, block 0 where the
    q keys span several blocks; their ids and positions keep what the buffers held."""
    tri = _graphs(40, 2, kernels.load)
    before = [t.clone() for t in _static(tri)]
    batch, q = 5, 3
    size = tri.load(q, *_step(batch, q, 3))
    assert size == 8
    assert (tri.slot_mapping[batch * q:size * q] == -1).all()
    assert (tri.slot_mapping[size * q:] == before[2][size * q:]).all()
    assert (tri.context_lens[batch:size] == q).all()
    assert (tri.block_tables[batch:size, :2] == 0).all()
    assert torch.equal(tri.block_tables[batch:size, 2:], before[4][batch:size, 2:])
    assert torch.equal(tri.input_ids[batch * q:], before[0][batch * q:])
    assert torch.equal(tri.positions[batch * q:], before[1][batch * q:])


def test_step_loader_rejects_tables_wider_than_the_buffers(kernels):
    tri = _graphs(16, 4, kernels.load)
    with pytest.raises(ValueError, match="does not fit"):
        tri.load(1, *_step(2, 1, 5))


def test_token_feed_applies_with_torch_ops():
    ids = torch.tensor([5, 6, 7, 8], device=DEVICE)
    TokenFeed(torch.tensor([-1, 1, -1, 0], device=DEVICE),
              torch.tensor([40, 41], device=DEVICE)).apply(ids)
    assert ids.tolist() == [5, 41, 7, 40]


def test_placeholder_sources_name_the_last_token_of_each_chunk():
    def seq(placeholders, row):
        return SimpleNamespace(num_placeholders=placeholders, last_sample_row=row)
    mixed = ScheduledBatch([seq(0, 3), seq(1, 2), seq(2, 0)], [4, 1, 1], num_decode=2)
    sources = placeholder_sources(mixed)
    assert sources.dtype == np.int64 and sources.tolist() == [-1, -1, -1, -1, 2, 0]
    decode = ScheduledBatch([seq(1, 1), seq(0, 0)], [1, 1], num_decode=2)
    assert placeholder_sources(decode).tolist() == [1, -1]
    assert placeholder_sources(ScheduledBatch([seq(0, 0)], [1], num_decode=1)) is None


def _sampling_inputs(rows: int, vocab: int):
    logits = torch.randn(rows, vocab, device=DEVICE) * 3
    temp = torch.tensor([0.7, 0.0, 1.0, 1.3] * rows, device=DEVICE)[:rows]
    min_p = torch.tensor([0.0, 0.1, 0.0] * rows, device=DEVICE)[:rows]
    uniforms = torch.rand(rows, dtype=torch.float64, device=DEVICE).clamp(1e-9, 1 - 1e-9)
    return logits, temp, min_p, uniforms


@pytest.mark.parametrize("need_raw,banned,use_min_p", [(True, True, True),
                                                        (False, False, False),
                                                        (True, False, False)], ids=str)
def test_fused_sample_out_buffer_equals_its_own_outputs(kernels, need_raw, banned, use_min_p):
    rows, vocab = 5, 300
    logits, temp, min_p, uniforms = _sampling_inputs(rows, vocab)
    ban = torch.tensor([[0, 2, 2], [5, 17, 250]], device=DEVICE) if banned else None
    args = (logits, temp, min_p, uniforms, ban, need_raw)
    tokens, logprobs, raw = kernels.sample(*args, use_min_p=use_min_p, block=64)
    out = torch.full((3 if need_raw else 2, rows), float("nan"), dtype=torch.float64,
                     device=DEVICE)
    got = kernels.sample(*args, use_min_p=use_min_p, block=64, out=out)
    assert torch.equal(got[0], tokens) and got[0].dtype == torch.int64
    assert got[1].data_ptr() == out[1].data_ptr()
    want = torch.stack([tokens.double(), logprobs.double()]
                       + ([raw.double()] if need_raw else []))
    assert torch.equal(out, want)
    assert (got[2] is None) == (not need_raw)


def test_fused_sample_rejects_a_wrong_out_buffer(kernels):
    logits, temp, min_p, uniforms = _sampling_inputs(2, 100)
    for out in (torch.empty(2, 2, device=DEVICE),  # float32
                torch.empty(2, 2, dtype=torch.float64, device=DEVICE)):  # need_raw: 3 rows
        with pytest.raises(ValueError, match="out must be"):
            kernels.sample(logits, temp, min_p, uniforms, None, True, out=out)


@pytest.mark.parametrize("fused_kernel", [True, False])
def test_sample_packed_holds_the_unpacked_draw(kernels, fused_kernel):
    """sample(packed=True) on the fused path: one [3, R] float64 tensor of the same draw;
    the torch path ignores it (the runner stacks its outputs itself)."""
    rows, vocab = 4, 200
    logits, temp, min_p, uniforms = _sampling_inputs(rows, vocab)
    st = SamplingTensors(
        temperature=temp, top_k=torch.zeros(rows, dtype=torch.int64, device=DEVICE),
        top_p=torch.ones(rows, device=DEVICE), min_p=min_p, uniforms=uniforms, banned=None,
        use_sort=False, use_min_p=True, num_top_logprobs=0, all_greedy=False,
        any_greedy=True, need_raw=True, fused_kernel=fused_kernel)
    plain, packed = sample(logits, st), sample(logits, st, packed=True)
    assert plain.packed is None
    if not fused_kernel:
        assert packed.packed is None
        return
    assert torch.equal(packed.token_ids, plain.token_ids)
    assert torch.equal(packed.packed, torch.stack(
        [plain.token_ids.double(), plain.logprobs.double(), plain.raw_logprobs.double()]))


@pytest.mark.skipif(not HAS_CUDA, reason="counts GPU kernels")
def test_fused_sample_runs_two_kernels_and_no_fill(kernels):
    """A batch-1 greedy draw without banned tokens or min-p: chunk stats and pick."""
    logits, temp, min_p, uniforms = _sampling_inputs(1, 5000)
    out = torch.empty(2, 1, dtype=torch.float64, device=DEVICE)
    kernels.sample(logits, temp, min_p, uniforms, None, False, use_min_p=False, out=out)
    torch.cuda.synchronize()  # compiled and warm
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        kernels.sample(logits, temp, min_p, uniforms, None, False, use_min_p=False, out=out)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(names) == 2 and "chunk_stats" in names[0] and "pick" in names[1], names



# rows the fused sampler serves (no top-k/top-p/top logprobs): sampled, greedy, banned
# stop tokens (min_tokens), raw logprobs, min-p
FUSED_PARAMS = [
    SamplingParams(n=2, temperature=0.8, max_tokens=20, ignore_eos=True, seed=1),
    SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[5, 9], max_tokens=15,
                   seed=2),
    SamplingParams(temperature=0.7, return_raw_logprobs=True, max_tokens=12, ignore_eos=True),
    SamplingParams(n=2, temperature=1.0, min_p=0.05, max_tokens=11, ignore_eos=True)]


def _fused_engine(model_dir: str, async_scheduling: bool) -> RolloutEngine:
    engine = RolloutEngine(model_dir, async_scheduling=async_scheduling, show_progress=False,
                           seed=0, max_num_seqs=8)
    engine.core.runner.fused_sampling = True  # the Triton backend's choice (ops.name)
    return engine


@pytest.mark.skipif(HAS_CUDA, reason="a CPU engine on the interpreter's loader; GPU engines "
                    "load through it in test_gpu_engine.py")
def test_engine_steps_through_the_loader_and_packed_samples(kernels, llama):
    """A CPU engine whose decode steps run in (eager) DecodeGraphs loaded by the Triton
    step loader, with async scheduling (the loader feeds the in-flight tokens) and packed
    fused samples, samples what the synchronous engine without graphs does."""
    prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(len(FUSED_PARAMS))]
    want = _fused_engine(llama[0], False).generate_batch(prompts, FUSED_PARAMS)
    engine = _fused_engine(llama[0], True)
    core, runner = engine.core, engine.core.runner
    runner.graphs = DecodeGraphs(core.model, core.ops, runner.kv_caches, 8, core.max_model_len,
                                 core.config.block_size, core.device)
    calls = {"fed": 0, "loads": 0, "packed": 0, "copies": 0}

    def loader(*args):
        calls["loads"] += 1
        calls["fed"] += args[-1] is not None
        return kernels.load(*args)

    def start_copy(seqs, out, copy=runner._start_copy):
        calls["copies"] += 1
        calls["packed"] += out.packed is not None
        return copy(seqs, out)
    runner.graphs.step_loader, runner._start_copy = loader, start_copy
    got = engine.generate_batch(prompts, FUSED_PARAMS)
    assert calls["fed"] > 10 and calls["loads"] > calls["fed"] - 1
    assert calls["packed"] == calls["copies"] > calls["loads"]
    for g, w in zip(got, want):
        for a, b in zip(g.samples, w.samples):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            for x, y in ((a.logprobs, b.logprobs), (a.raw_logprobs, b.raw_logprobs)):
                assert np.allclose(x or [], y or [], atol=1e-4, rtol=0)
