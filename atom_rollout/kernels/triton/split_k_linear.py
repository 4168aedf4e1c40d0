"""Projections of a few rows (decode at small batch) whose K is split across programs,
leaving float32 partial sums for the RMSNorm after them to add up.

At batch 1-16 a projection streams its weight once; with an output of 1,024 columns
(o_proj, down_proj) a program per column tile gives too few programs to keep the
memory system busy, so cuBLAS splits K and runs a second kernel to reduce. Here the
reduction costs no launch: ``rms_norm`` reads the partials in place of its input
(``pointwise.rms_norm_of_partials``), in a fixed order, so results do not depend on
timing. Optionally SiLU-and-mul is applied to the input as it is read (down_proj's
input is the gate/up projection), rounded as ``silu_and_mul`` rounds. The same kernel
with one split, writing the model dtype, is the one-row projection for wide outputs
(``one_row_linear``), where cuBLAS's GEMV is slower too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import release_dependents, wait_for_inputs

MAX_ROWS = 16  # rows per launch; more rows go to the GEMM path


@dataclass(frozen=True)
class SplitKConfig:
    block_n: int
    block_k: int
    splits: int
    num_warps: int = 4


# one row, outputs of 4,096-6,144 columns (H100 sweep, scripts/bench_split_k.py)
ONE_ROW_UNSPLIT = SplitKConfig(block_n=8, block_k=512, splits=1, num_warps=4)
# Weights past this many bytes stream long enough for wider K tiles and more programs
# to pay: tiles of 8 rows x 2,048 columns (at most K's next power of two), about
# four programs per SM (H100: Qwen3-8B's projections in scripts/bench_gemv_8b.py, 10-24%
# faster than cuBLAS, ~3.0 TB/s on gate_up; in the batch-1 graph, scripts/ab_latency.py:
# 8 x 2,048 5,527 us, 8 x 1,024 5,536, 8 warps 5,565, 2 warps 5,642, 16 rows 5,755,
# 8 x 512 5,897).
STREAMING_BYTES = 16 << 20
STREAMING = SplitKConfig(block_n=8, block_k=2048, splits=1, num_warps=4)
STREAMING_PROGRAMS_PER_SM = 4


def choose_config(n_out: int, k: int, rows: int, multiprocessors: int,
                  element_size: int = 2) -> SplitKConfig:
    """One row: tiles of 16 x 256 and about two programs per SM, or STREAMING's for
    large weights; more rows (tl.dot): 32 x 128 and one per SM (H100 sweeps,
    scripts/bench_split_k.py, scripts/bench_gemv_8b.py)."""
    if rows == 1 and _streams(n_out * k * element_size):
        tile = streaming_tile(k)
        return config_for(n_out, k, STREAMING_PROGRAMS_PER_SM * multiprocessors,
                          tile.block_n, tile.block_k, tile.num_warps)
    if rows == 1:
        return config_for(n_out, k, 2 * multiprocessors, 16, 256, 8)
    return config_for(n_out, k, multiprocessors, 32, 128, 4)


def _streams(weight_bytes: int) -> bool:
    return weight_bytes > STREAMING_BYTES


def streaming_tile(k: int) -> SplitKConfig:
    """STREAMING's tile, no wider in K than K's next power of two (a 1,024-wide LM head
    keeps 1,024-column tiles rather than half-masked 2,048-column ones)."""
    block_k = min(STREAMING.block_k, triton.next_power_of_2(k))
    return SplitKConfig(STREAMING.block_n, block_k, 1, STREAMING.num_warps)


def config_for(n_out: int, k: int, programs: int, block_n: int, block_k: int,
               num_warps: int) -> SplitKConfig:
    """Column tiles of block_n and as many K splits (each a whole number of block_k
    columns) as bring the grid to about ``programs``."""
    tiles = triton.cdiv(n_out, block_n)
    k_blocks = triton.cdiv(k, block_k)
    splits = max(1, min(k_blocks, round(programs / tiles)))
    while k_blocks % splits:
        splits -= 1
    return SplitKConfig(block_n, block_k, splits, num_warps)


@triton.jit
def _input_tile(x_ptr, rows, cols, mask, stride_x, K, GATED: tl.constexpr):
    """x's rows at cols, or silu(gate) * up with silu_and_mul's roundings when GATED
    (x then holds [gate | up], each K wide)."""
    ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
        x = (act.to(tl.float32) * up).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _accumulate(acc, x, w, ROWS: tl.constexpr):
    """acc + x @ w.T; one row is a broadcast multiply and sum (no MMA padding)."""
    if ROWS == 1:
        return acc + tl.sum(x.to(tl.float32) * w.to(tl.float32), 1)[None, :]
    return acc + tl.dot(x.to(w.dtype), tl.trans(w), input_precision="ieee")


@triton.jit
def _split_k_kernel(part_ptr, x_ptr, w_ptr, b_ptr, M, N, K, k_per_split, stride_x, stride_w,
                    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    tile, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, ROWS)
    row_mask = rows < M
    n_idx = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_idx < N
    w_rows = w_ptr + n_idx.to(tl.int64)[:, None] * stride_w
    k_start = split * k_per_split
    # the first weight tile needs nothing from the kernel before: load it, then wait
    cols = k_start + tl.arange(0, BLOCK_K)
    k_mask = cols < K
    w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                eviction_policy="evict_first")
    # Released now rather than after the loop, the next kernel's programs start and fetch
    # their first weight tiles while this one streams (H100, Qwen3-0.6B batch-1 decode
    # graph: 1,006 -> 959 us, scripts/ab_latency.py); they still wait for our result.
    release_dependents(PDL)
    wait_for_inputs(PDL)
    x = _input_tile(x_ptr, rows, cols, row_mask[:, None] & k_mask[None, :], stride_x, K, GATED)
    acc = _accumulate(tl.zeros([ROWS, BLOCK_N], tl.float32), x, w, ROWS)
    for k0 in range(k_start + BLOCK_K, k_start + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        x = _input_tile(x_ptr, rows, cols, row_mask[:, None] & k_mask[None, :], stride_x, K,
                        GATED)
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")  # read once per step: keep L2 for the rest
        acc = _accumulate(acc, x, w, ROWS)
    if HAS_BIAS:  # once, in the first split's partial
        bias = tl.load(b_ptr + n_idx, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    out = part_ptr + split * M * N + rows[:, None] * N + n_idx[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    tl.store(out, acc.to(part_ptr.dtype.element_ty), mask=mask)


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   pdl: bool = False) -> torch.Tensor:
    """x @ weight.T + bias for x [1, K] with outputs wide enough to fill the GPU
    unsplit (qkv_proj, gate_up_proj): one split, in x's dtype."""
    streams = _streams(weight.numel() * weight.element_size())
    config = streaming_tile(weight.shape[1]) if streams else ONE_ROW_UNSPLIT
    return split_k_partials(x, weight, bias=bias, config=config, out_dtype=x.dtype,
                            pdl=pdl)[0]


def split_k_partials(x: torch.Tensor, weight: torch.Tensor, *, gated: bool = False,
                     bias: torch.Tensor | None = None, config: SplitKConfig | None = None,
                     multiprocessors: int = 132, out_dtype: torch.dtype = torch.float32,
                     pdl: bool = False) -> torch.Tensor:
    """Partials [splits, M, N] whose sum over splits is x @ weight.T (+ bias), or
    silu_and_mul(x) @ weight.T when ``gated``; x is [M <= MAX_ROWS, K] (gated: 2K).
    With one split and ``out_dtype`` the model dtype this is a plain projection.
    ``pdl``: launched as a programmatic dependent of the kernel before (see pdl.py)."""
    rows, width = x.shape
    k = width // 2 if gated else width
    if rows > MAX_ROWS or weight.dim() != 2 or weight.shape[1] != k \
            or (gated and width % 2) or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(f"split_k_partials: x {tuple(x.shape)} (gated={gated}) does not fit "
                         f"weight {tuple(weight.shape)} (at most {MAX_ROWS} rows)")
    n_out = weight.shape[0]
    cfg = config or choose_config(n_out, k, rows, multiprocessors, weight.element_size())
    x = x if x.stride(-1) == 1 else x.contiguous()
    partials = torch.empty((cfg.splits, rows, n_out), dtype=out_dtype, device=x.device)
    if rows:
        k_per_split = triton.cdiv(triton.cdiv(k, cfg.splits), cfg.block_k) * cfg.block_k
        _split_k_kernel[(triton.cdiv(n_out, cfg.block_n), cfg.splits)](
            partials, x, weight, weight if bias is None else bias, rows, n_out, k, k_per_split,
            x.stride(0), weight.stride(0), GATED=gated, HAS_BIAS=bias is not None,
            ROWS=1 if rows == 1 else 16, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl)
    return partials
