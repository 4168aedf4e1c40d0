"""l2_prefetch: TritonOps asking L2 for o_proj's weight on a side stream through the
attention block (Hopper or newer) changes no value, joins before o_proj reads, survives
CUDA-graph capture; the extent it covers respects the bulk copy's alignment and size."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from atom_rollout.kernels.triton import TritonOps  # noqa: E402
from atom_rollout.kernels.triton.l2_prefetch import MAX_CHUNK, SLOTS, extent  # noqa: E402
from atom_rollout.kernels.triton.pdl import supported  # noqa: E402


def test_extent_covers_aligned_contiguous_weights():
    weight = torch.zeros(64, 40, dtype=torch.bfloat16)
    assert extent(weight) == 64 * 40 * 2
    assert extent(weight, max_bytes=1000) == 992  # capped, rounded down to 16
    assert extent(torch.zeros(7, dtype=torch.bfloat16)) == 0  # 14 bytes: under 16
    assert extent(weight[:, 1:]) == 0  # not contiguous
    assert extent(weight.flatten()[1:]) == 0  # not 16-byte aligned
    assert extent(None) == 0


def test_extent_keeps_chunks_under_the_size_limit():
    too_big = torch.empty(SLOTS.value * MAX_CHUNK + 16, dtype=torch.uint8)
    assert extent(too_big, programs=1) == 0
    assert extent(too_big, programs=2) == too_big.numel()


def test_not_on_cpu():
    assert not supported(torch.device("cpu"))


def layer_step(ops: TritonOps, inputs: dict):
    """prepare_qkv (forking the prefetch of o's weight) then o_proj's linear_add_rms_norm
    (joining it), on fresh copies of the caches."""
    caches = [c.clone() for c in inputs["caches"]]
    q, k = ops.prepare_qkv(*[t.clone() for t in inputs["qkv"]], *inputs["norms"], 1e-6,
                           inputs["positions"], inputs["cos_sin"], *caches, inputs["slots"],
                           prefetch=inputs["o_weight"])
    heads = q.reshape(1, -1)[:, :inputs["o_weight"].shape[1]]
    out = ops.linear_add_rms_norm(heads, inputs["o_weight"], inputs["residual"],
                                  inputs["norms"][0].repeat(32), 1e-6)
    return (q, k, *caches, *out)


@pytest.mark.skipif(not HAS_CUDA, reason="the bulk prefetch needs a Hopper GPU")
def test_prefetch_changes_nothing_and_captures():
    if not supported(torch.device("cuda")):
        pytest.skip("before Hopper")
    torch.manual_seed(0)
    dev, heads, kv_heads, dim, bf16 = torch.device("cuda"), 32, 8, 128, torch.bfloat16
    inputs = dict(
        qkv=[torch.randn(1, n, dim, device=dev, dtype=bf16) for n in (heads, kv_heads, kv_heads)],
        norms=[torch.randn(dim, device=dev, dtype=bf16) for _ in range(2)],
        caches=[torch.randn(4, 16, kv_heads, dim, device=dev, dtype=bf16) for _ in range(2)],
        positions=torch.tensor([5], device=dev), cos_sin=torch.randn(8, dim, device=dev),
        slots=torch.tensor([21], device=dev),
        o_weight=torch.randn(4096, 4096, device=dev, dtype=bf16) * 0.02,
        residual=torch.randn(1, 4096, device=dev, dtype=bf16))
    ops = TritonOps()
    ops.prefetch_next_weight = False
    want = layer_step(ops, inputs)
    ops.prefetch_next_weight = True
    for got in (layer_step(ops, inputs), layer_step(ops, inputs)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not ops._pending_prefetches  # joined
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = layer_step(ops, inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
