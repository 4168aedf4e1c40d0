"""Moving a weight the decode chain reads next into L2 while DRAM would sit idle.

At batch 1 a decode layer streams its projections' weights at DRAM bandwidth, but between
qkv_proj and o_proj the attention block (prepare_qkv, attention, the split merge) reads
almost nothing for ~10 us. ``prefetch`` launches a small kernel whose programs issue
``cp.async.bulk.prefetch.L2`` (Hopper's bulk copy engine, one instruction per chunk) for
o_proj's weight. It runs on a side stream forked after qkv_proj, because a program
issuing bulk prefetches returns only as they drain: inside prepare_qkv it held the whole
attention block back (H100, Qwen3-8B graph 5,529 -> 6,788 us). A hint only: it changes
no value. Only o_proj's first 4 MiB pays most (TritonOps.prefetch_max_bytes): the chain
then reads that part from L2 and the prefetch kernel, which o_proj waits for, ends sooner.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ALIGN = 16  # bytes: the bulk copy's address and size granularity
MAX_CHUNK = (1 << 20) - ALIGN  # bytes per bulk prefetch (sm_90 encodes size / 16 in 16 bits)
SLOTS = tl.constexpr(32)  # chunks per program: one per thread of its one warp
PROGRAMS = 32


@triton.jit
def bulk_prefetch(base_ptr, n_bytes, program, num_programs, SLOTS: tl.constexpr):
    """Program ``program`` of ``num_programs`` asks L2 for its share of
    [base_ptr, base_ptr + n_bytes) in SLOTS chunks, one bulk prefetch per chunk."""
    chunk = tl.cdiv(tl.cdiv(n_bytes, num_programs * SLOTS), 16) * 16
    start = (program.to(tl.int64) * SLOTS + tl.arange(0, SLOTS)) * chunk
    size = tl.minimum(chunk, tl.maximum(n_bytes - start, 0)).to(tl.int32)
    base = base_ptr.to(tl.pointer_type(tl.int8))
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(base_ptr, n_bytes, SLOTS: tl.constexpr):
    bulk_prefetch(base_ptr, n_bytes, tl.program_id(0), tl.num_programs(0), SLOTS)


def extent(weight: torch.Tensor | None, max_bytes: int | None = None,
           programs: int = PROGRAMS) -> int:
    """The bytes of weight (its first max_bytes at most) that ``programs`` programs' bulk
    prefetches may cover: 16-byte multiples of a contiguous, 16-byte aligned tensor whose
    chunks stay under the copy's size limit; else 0."""
    if weight is None or not weight.is_contiguous() or weight.data_ptr() % ALIGN:
        return 0
    n_bytes = weight.numel() * weight.element_size()
    n_bytes = min(n_bytes, n_bytes if max_bytes is None else max_bytes) // ALIGN * ALIGN
    return n_bytes if n_bytes <= programs * SLOTS.value * MAX_CHUNK else 0


def prefetch(weight: torch.Tensor, n_bytes: int) -> None:
    """Ask L2 for weight's first n_bytes (from extent) on the current stream."""
    if n_bytes > 0:
        _prefetch_kernel[(PROGRAMS,)](weight, n_bytes, SLOTS=SLOTS, num_warps=1)
