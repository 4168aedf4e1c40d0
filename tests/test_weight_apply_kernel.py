"""The one-pass Triton bucket write (kernels/triton/weight_apply.py) against the torch
path, and StreamedUpdate driving it. Without a GPU the kernel runs under the Triton
interpreter on CPU (TRITON_INTERPRET is set below, before the kernel module is first
imported); with CUDA it runs on the GPU."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from atom_rollout import RolloutEngine  # noqa: E402
from atom_rollout.engine.streamed_update import StreamedUpdate  # noqa: E402
from atom_rollout.weight_sync import pack_buckets, unpack_bucket  # noqa: E402
from test_weight_updates import perturbed  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
CHUNK = 32  # elements per program: many chunks, and tensors that straddle them
WORD = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# sign set, exponent all ones, payload 1 (a signalling NaN): as a signed integer
NEGATIVE_NAN = {torch.float32: 0xFF800001 - 2**32, torch.bfloat16: 0xFF81 - 2**16}


@pytest.fixture(scope="module")
def wa():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    from atom_rollout.kernels.triton import weight_apply
    return weight_apply


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(WORD[t.dtype]).cpu()


def _layout(dtype: torch.dtype, seed: int, aligned: bool = False):
    """Parameter slices like an engine's: whole small tensors of odd sizes and row
    ranges of a fused 2-D parameter (whose row 0 is never written), some empty; their
    data at offsets of one bucket with gaps, their saved copies at 16-byte steps.
    Returns (the fused parameter, the slices, bucket offsets, saved offsets, bucket,
    saved room numel)."""
    g = torch.Generator().manual_seed(seed)
    step = 16 // torch.tensor([], dtype=dtype).element_size() if aligned else 1
    sizes = [int(s) * step for s in torch.randint(0, 9, (12,), generator=g)]
    sizes += [7 * step, 0, 3 * CHUNK * step + 5 * step, step]  # across chunk boundaries
    fused = torch.randn(9, 6 * step, generator=g).to(dtype).to(DEVICE)
    params = [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in sizes]
    params += [fused[1:4], fused[4:9]]
    src, at = [], 0
    for p in params:
        at += int(torch.randint(0, 3, (), generator=g)) * step  # gaps in the bucket
        src.append(at)
        at += p.numel()
    bucket = torch.randn(at + 5, generator=g).to(dtype).to(DEVICE)
    saved = _saved_offsets(params)
    return fused, params, src, saved, bucket, saved[-1] + params[-1].numel()


def _torch_reference(params, src, bucket, room_numel):
    """What the torch path leaves: the saved copies and the new parameter values."""
    saved = torch.zeros(room_numel, dtype=bucket.dtype, device=bucket.device)
    new = []
    for p, s in zip(params, _saved_offsets(params)):
        saved[s:s + p.numel()] = p.reshape(-1)
    for p, off in zip(params, src):
        new.append(bucket[off:off + p.numel()].view(p.shape).clone())
    return saved, new


def _saved_offsets(params):
    out, at = [], 0
    for p in params:
        out.append(at)
        at += -(-p.numel() * p.element_size() // 16) * 16 // p.element_size()
    return out


@pytest.mark.parametrize("programs", [0, 3])  # one per chunk / 3 looping over all
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_torch_path_bit_for_bit(wa, dtype, aligned, programs):
    fused, params, src, saved_at, bucket, room_numel = _layout(dtype, seed=3, aligned=aligned)
    untouched = fused[0].clone()
    saved_ref, new_ref = _torch_reference(params, src, bucket, room_numel)
    table = wa.build_table([p.view(-1) for p in params], src, saved_at, chunk=CHUNK)
    assert table.aligned == aligned and table.num_chunks > len(params)
    room = torch.zeros(room_numel, dtype=dtype, device=DEVICE)
    flags = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    wa.apply_bucket(table, bucket, room.view(torch.uint8), flags, 2, max_programs=programs)
    for p, expected in zip(params, new_ref):
        assert torch.equal(_bits(p), _bits(expected))
    assert torch.equal(_bits(room), _bits(saved_ref))  # every old value kept, exactly
    assert torch.equal(_bits(fused[0]), _bits(untouched))
    assert flags.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_copies_any_bit_pattern(wa, dtype):
    """NaN payloads, infs and denormals move unchanged (integer moves, no float
    conversion), and are flagged."""
    _, params, src, saved_at, bucket, room_numel = _layout(dtype, seed=4)
    word = WORD[dtype]
    info = torch.iinfo(word)
    bits = torch.randint(info.min, info.max, bucket.shape, dtype=word,
                         generator=torch.Generator().manual_seed(0))
    bits[src[-1] + 2] = NEGATIVE_NAN[dtype]
    bucket.view(word).copy_(bits)
    old = [p.clone() for p in params]
    table = wa.build_table([p.view(-1) for p in params], src, saved_at, chunk=CHUNK)
    room = torch.empty(room_numel, dtype=dtype, device=DEVICE)
    flags = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    wa.apply_bucket(table, bucket, room, flags, 0)
    for p, before, off, at in zip(params, old, src, saved_at):
        assert torch.equal(_bits(p).view(-1), _bits(bucket[off:off + p.numel()]))
        assert torch.equal(_bits(room[at:at + p.numel()]), _bits(before).view(-1))
    assert flags.tolist() == [1]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flag_set_exactly_when_non_finite(wa, dtype, value):
    _, params, src, saved_at, bucket, room_numel = _layout(dtype, seed=5)
    big = max(range(len(params)), key=lambda k: params[k].numel())
    table = wa.build_table([p.view(-1) for p in params], src, saved_at, chunk=CHUNK)
    room = torch.empty(room_numel, dtype=dtype, device=DEVICE)
    flags = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    bucket[-1] = value  # past every segment: never written, so not flagged
    bucket[src[big]] = torch.finfo(dtype).max  # large but finite
    wa.apply_bucket(table, bucket, room, flags, 0)
    assert flags.tolist() == [0, 0, 0]
    bucket[src[big] + CHUNK] = value  # first element of the tensor's second chunk
    wa.apply_bucket(table, bucket, room, flags, 1)
    assert flags.tolist() == [0, 1, 0]


def test_table_checks_its_inputs(wa):
    params = [torch.zeros(4, device=DEVICE), torch.zeros(4, dtype=torch.float16, device=DEVICE)]
    with pytest.raises(ValueError, match="one of"):
        wa.build_table(params, [0, 4], [0, 4])
    with pytest.raises(ValueError, match="power of two"):
        wa.build_table(params[:1], [0], [0], chunk=24)
    table = wa.build_table(params[:1], [6], [0])
    with pytest.raises(ValueError, match="needs 10 / 4"):
        wa.apply_bucket(table, torch.zeros(8, device=DEVICE), torch.zeros(4, device=DEVICE))


# ---------------------------------------------------------------- through StreamedUpdate

def _engine(checkpoints, variant="llama"):
    engine = RolloutEngine(checkpoints[variant][0], dtype="float32", device=DEVICE.type,
                           show_progress=False)
    return engine, {n: p.detach().clone() for n, p in engine.core.model.named_parameters()}


def _update(checkpoints, seed, variant="llama"):
    """A perturbed copy of the checkpoint's weights, on the engine's device."""
    return [(n, t.detach().to(DEVICE)) for n, t in perturbed(checkpoints[variant][1], seed)[1]]


def _same(engine, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in engine.core.model.named_parameters())


def _kernel_update(engine) -> StreamedUpdate:
    return StreamedUpdate(engine.core.weight_map, use_kernel=True, kernel_chunk=256)


def _apply(update, named, fail_after=None):
    plan, flats = pack_buckets(named, 64 * 1024)
    update.begin()(plan)
    assert all(layout.table is not None for layout in update._layouts)  # no silent fallback
    for i, flat in enumerate(flats):
        if i == fail_after:
            update.rollback()
            return
        update.apply_bucket(i, unpack_bucket(plan, i, flat))
    assert not update._finite  # no bucket fell back to the torch path's NaN check
    update.commit()


def test_streamed_kernel_path_equals_torch_path(checkpoints):
    named = _update(checkpoints, 21)
    by_kernel, _ = _engine(checkpoints)
    by_torch, _ = _engine(checkpoints)
    _apply(_kernel_update(by_kernel), named)
    torch_update = StreamedUpdate(by_torch.core.weight_map, use_kernel=False)
    plan, flats = pack_buckets(named, 64 * 1024)
    torch_update.begin()(plan)
    for i, flat in enumerate(flats):
        torch_update.apply_bucket(i, unpack_bucket(plan, i, flat))
    torch_update.commit()
    assert _same(by_kernel, dict(by_torch.core.model.named_parameters()))
    wm = by_kernel.core.weight_map
    assert all(torch.equal(wm.targets[wm.resolve(n)].view(), t) for n, t in named)


@pytest.mark.parametrize("fail_after", [1, None])
def test_rollback_after_kernel_path_is_exact(checkpoints, fail_after):
    """A failure mid-update, and a NaN in the last bucket (commit names it): every
    parameter is bit-identical to before, and the same object updates cleanly after."""
    engine, before = _engine(checkpoints)
    update = _kernel_update(engine)
    named = [(n, t.clone()) for n, t in _update(checkpoints, 22)]
    if fail_after is None:
        named[-1][1].view(-1)[5] = float("nan")
        with pytest.raises(ValueError, match=f"non_finite tensors: {named[-1][0]}$"):
            _apply(update, named)
    else:
        _apply(update, named, fail_after=fail_after)
    assert _same(engine, before)
    good = _update(checkpoints, 23)
    _apply(update, good)  # the flags were reset: no stale NaN report
    wm = engine.core.weight_map
    assert all(torch.equal(wm.targets[wm.resolve(n)].view(), t) for n, t in good)


def test_auto_selection(checkpoints):
    """By default the kernel writes exactly where a GPU runs the engine; float64
    buckets into a float32 model take the torch path even when the kernel is asked for."""
    engine, _ = _engine(checkpoints)
    named = _update(checkpoints, 24)
    plan, _ = pack_buckets(named, 64 * 1024)
    update = StreamedUpdate(engine.core.weight_map)
    update.begin()(plan)
    assert all((layout.table is not None) == HAS_CUDA for layout in update._layouts)
    mixed = StreamedUpdate(engine.core.weight_map, use_kernel=True)
    mixed.begin()(pack_buckets([(n, t.double()) for n, t in named], 64 * 1024)[0])
    assert all(layout.table is None for layout in mixed._layouts)


def test_bucket_writing_a_parameter_twice_takes_the_torch_path(checkpoints):
    """A tied name and its alias in one bucket: kernel programs would race on the
    shared rows (and save each other's writes), so that bucket uses the torch path."""
    engine, before = _engine(checkpoints, "qwen2")  # tied embeddings
    named = _update(checkpoints, 25, "qwen2")
    embed = next(t for n, t in named if n == "model.embed_tokens.weight")
    named.append(("lm_head.weight", embed + 1))
    plan, flats = pack_buckets(named, 2**30)
    assert len(flats) == 1
    update = StreamedUpdate(engine.core.weight_map, use_kernel=True, kernel_chunk=256)
    update.begin()(plan)
    assert update._layouts[0].table is None
    update.apply_bucket(0, unpack_bucket(plan, 0, flats[0]))
    update.rollback()
    assert _same(engine, before)
