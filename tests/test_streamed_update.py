"""StreamedUpdate: buckets written as they land, undone on any failure."""
import pytest
import torch

from atom_rollout import RolloutEngine
from atom_rollout.engine.streamed_update import StreamedUpdate
from atom_rollout.weight_sync import BucketPlan, pack_buckets, plan_buckets, unpack_bucket
from test_weight_updates import perturbed


def _snapshot(engine):
    return {n: p.detach().clone() for n, p in engine.core.model.named_parameters()}


def _same(engine, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in engine.core.model.named_parameters())


def _stream(engine, named, partial=True, fail_after=None):
    """Feed `named` through a StreamedUpdate the way the receiver does."""
    plan, flats = pack_buckets(named, 16 * 1024)
    update = StreamedUpdate(engine.core.weight_map)
    update.begin(partial)(plan)
    for i, flat in enumerate(flats):
        if fail_after is not None and i == fail_after:
            update.rollback()
            return update, len(flats)
        update.apply_bucket(i, unpack_bucket(plan, i, flat))
    update.commit()
    return update, len(flats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_streamed_update_writes_every_tensor(checkpoints, dtype):
    model_dir, model = checkpoints["qwen2"]  # tied embeddings
    engine = RolloutEngine(model_dir, show_progress=False)
    new_model, named = perturbed(model, seed=5)
    _, buckets = _stream(engine, [(n, t.detach().to(dtype)) for n, t in named])
    assert buckets > 3
    state = engine.core.model.state_dict()
    for name, tensor in named:
        ours = engine.core.weight_map.targets[engine.core.weight_map.resolve(name)].view()
        assert torch.equal(ours, tensor.detach().to(dtype).float()), name
    assert state  # the model still has its parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rollback_restores_exactly(checkpoints, dtype):
    """Half the buckets written, then a failure: every parameter is bit-identical again
    (an fp16 bucket cannot hold fp32 weights, so those are kept aside instead)."""
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    before = _snapshot(engine)
    named = [(n, t.detach().to(dtype)) for n, t in perturbed(model, seed=6)[1]]
    update, buckets = _stream(engine, named, fail_after=3)
    assert _same(engine, before)


def test_non_finite_in_last_bucket_rolls_back(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    before = _snapshot(engine)
    named = [(n, t.detach().clone()) for n, t in perturbed(model, seed=7)[1]]
    named[-1][1].view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match=f"non_finite tensors: {named[-1][0]}"):
        _stream(engine, named)
    assert _same(engine, before)


def test_plan_is_checked_before_any_write(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    named = [(n, t.detach()) for n, t in perturbed(model, seed=8)[1]]
    update = StreamedUpdate(engine.core.weight_map)
    wrong = [(n, torch.zeros(3, 3) if n.endswith("q_proj.weight") else t)
             for n, t in named[:-2]]
    plan, _ = pack_buckets(wrong, 16 * 1024)
    with pytest.raises(ValueError) as error:
        update.begin(partial=False)(plan)
    assert "wrong_shape" in str(error.value) and "missing" in str(error.value)


def test_repeated_updates_reuse_the_layout(checkpoints):
    """The same StreamedUpdate across updates (as the engine keeps it): each one lands
    exactly, and a failed one in between restores the previous."""
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    update = StreamedUpdate(engine.core.weight_map)
    for seed, fail in ((11, False), (12, True), (13, False)):
        named = [(n, t.detach()) for n, t in perturbed(model, seed=seed)[1]]
        plan, flats = pack_buckets(named, 16 * 1024)
        before = _snapshot(engine)
        update.begin()(plan)
        for i, flat in enumerate(flats):
            update.apply_bucket(i, unpack_bucket(plan, i, flat))
        if fail:
            update.rollback()
            assert _same(engine, before)
            continue
        update.commit()
        for name, tensor in named:
            ours = engine.core.weight_map.targets[engine.core.weight_map.resolve(name)].view()
            assert torch.equal(ours, tensor), name


def _meta(sizes, dtype=torch.bfloat16):
    return [(f"t{i}", torch.empty(n, dtype=dtype, device="meta")) for i, n in enumerate(sizes)]


def test_plan_tapers_toward_the_last_bucket():
    """Only the last bucket's write is not hidden behind the wire, so buckets shrink to
    tail_bytes at the end; each new bucket holds at most half of what is left."""
    mib = 2**20
    named = _meta([mib // 2] * 300)  # 300 tensors of 1 MiB
    plan = plan_buckets(named, 64 * mib)
    sizes = [b.nbytes for b in plan.buckets]
    assert sizes[0] == 64 * mib and sizes[-1] <= 8 * mib  # default tail: bucket / 8
    assert sizes[-4:] == sorted(sizes[-4:], reverse=True)
    placed = 0
    for size in sizes:
        assert size <= min(64 * mib, max(8 * mib, (plan.total_bytes - placed) // 2))
        placed += size
    assert BucketPlan.from_json(plan.to_json()) == plan  # the header carries it unchanged
    flat = plan_buckets(named, 64 * mib, tail_bytes=64 * mib)
    assert [b.nbytes for b in flat.buckets] == [64 * mib] * 4 + [44 * mib]


def test_plan_sends_oversized_tensors_first():
    mib = 2**20
    named = _meta([mib // 2] * 10 + [40 * mib] + [mib // 2] * 10)  # 80 MiB at index 10
    plan = plan_buckets(named, 16 * mib, tail_bytes=2 * mib)
    assert plan.members(0) == (10,)
    assert plan.buckets[-1].nbytes <= 2 * mib
    assert [t.name for t in plan.tensors] == [n for n, _ in named]  # input order kept
    with pytest.raises(ValueError, match="tail_bytes"):
        plan_buckets(named, 16 * mib, tail_bytes=0)
