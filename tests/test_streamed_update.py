"""StreamedUpdate: buckets written as they land, undone on any failure."""
import pytest
import torch

from atom_rollout import RolloutEngine
from atom_rollout.engine.streamed_update import StreamedUpdate
from atom_rollout.weight_sync import pack_buckets, unpack_bucket
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
