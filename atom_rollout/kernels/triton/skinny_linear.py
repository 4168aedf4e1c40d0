"""Linear layers for a handful of rows (decode at small batch), with the ops around
them fused into the same launch: y = epilogue(prologue(x) @ W^T + bias).

At batch 1-16 a projection only streams its weight once, so its cost is the weight
bytes plus the launch; a separate RMSNorm or SiLU-and-mul launch costs about as much
as a small projection. Options:

* ``norm_weight``: RMSNorm of x (or of x + residual, whose sum is also returned)
  times the norm weight, rounded exactly as ``rms_norm`` rounds, as the input;
* ``silu_mul``: W stacks [gate; up]; the output is silu(x W_gate^T) * (x W_up^T),
  rounded as the projection followed by ``silu_and_mul`` rounds;
* ``pdl``: programmatic dependent launch (Hopper and newer): the kernel loads its
  first weight tile, lets the next kernel launch, and only then waits for the
  previous kernel's output, so weight streaming overlaps the previous kernel's tail.
  Every read of another kernel's output and every write happen after the wait.

A program owns BLOCK_N output columns for all rows (one row: multiply and sum;
more: rows padded to 16 for ``tl.dot``) and streams its slice of the weight; the
norm's 1/RMS is summed along the way and applied to the accumulator at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # rows per launch; callers route larger batches to the GEMM path


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


def default_config(n_out: int) -> SkinnyConfig:
    """Wide tiles for wide outputs (measured on H100, scripts/bench_skinny_linear.py)."""
    return SkinnyConfig(block_n=64 if n_out >= 16384 else 32)


@triton.jit
def _input_tile(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RES: tl.constexpr):
    """The rows' input (x, or x + residual rounded to x's dtype) at cols."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _silu_mul(gate, up, dtype: tl.constexpr):
    """silu_and_mul of the rounded projection outputs, with its roundings."""
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)
    return act.to(tl.float32) * up.to(dtype).to(tl.float32)


@triton.jit
def _multiply_add(acc, x, w, ROWS: tl.constexpr):
    """acc + x @ w.T; one row is a broadcast multiply and sum (no MMA padding)."""
    if ROWS == 1:
        return acc + tl.sum(x.to(tl.float32) * w.to(tl.float32), 1)[None, :]
    return acc + tl.dot(x, tl.trans(w), input_precision="ieee")


@triton.jit
def _skinny_linear_kernel(
    y_ptr, sum_ptr, x_ptr, res_ptr, norm_w_ptr, w_ptr, b_ptr,
    M, N_OUT, K, eps, stride_x, stride_r, stride_s, stride_w, stride_y,
    NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr, PDL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    row_mask = rows < M
    n_idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_idx < N_OUT
    gate_rows = w_ptr + n_idx.to(tl.int64)[:, None] * stride_w
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    acc_gate = tl.zeros([ROWS, BLOCK_N], tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N], tl.float32)
    squares = tl.zeros([ROWS, BLOCK_K], tl.float32)
    sum_rows = tl.where(pid == 0, M, 0)  # the first program stores x + residual
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        x_mask = row_mask[:, None] & k_mask[None, :]
        x = _input_tile(x_ptr, res_ptr, rows, cols, x_mask, stride_x, stride_r, HAS_RES)
        if HAS_RES:
            tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], x,
                     mask=(rows < sum_rows)[:, None] & k_mask[None, :])
        if NORM:
            # the per-row 1/RMS is applied to the accumulator at the end, so the
            # weight streams in one pass; rounding differs from rms_norm + linear
            # by bf16 noise only
            squares += x.to(tl.float32) * x.to(tl.float32)
            g = tl.load(norm_w_ptr + cols, mask=k_mask, other=0.0)
            x = (g.to(tl.float32)[None, :] * x.to(tl.float32)).to(x_ptr.dtype.element_ty)
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(gate_rows + cols[None, :], mask=w_mask, other=0.0)
        x = x.to(w.dtype)
        acc_gate = _multiply_add(acc_gate, x, w, ROWS)
        if SILU_MUL:
            w_up = tl.load(gate_rows + N_OUT * stride_w + cols[None, :], mask=w_mask, other=0.0)
            acc_up = _multiply_add(acc_up, x, w_up, ROWS)
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if NORM:
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, 1) / K + eps)
        acc_gate *= inv_rms[:, None]
        acc_up *= inv_rms[:, None]
    if HAS_BIAS:
        acc_gate += tl.load(b_ptr + n_idx, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(b_ptr + N_OUT + n_idx, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = acc_gate
    if SILU_MUL:
        out = _silu_mul(acc_gate, acc_up, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_y + n_idx[None, :],
             out.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  *, norm_weight: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, eps: float = 0.0,
                  silu_mul: bool = False, pdl: int = 0,
                  config: SkinnyConfig | None = None):
    """epilogue(prologue(x) @ weight.T + bias) for x [M <= 16, K]; see the module
    docstring. With a residual (norm only) returns (y, x + residual), else y."""
    _check(x, weight, norm_weight, residual, silu_mul)
    rows, k = x.shape
    n_out = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
    y = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if rows:
        cfg = config or default_config(n_out)
        _skinny_linear_kernel[(triton.cdiv(n_out, cfg.block_n),)](
            y, total if total is not None else y, x,
            residual if residual is not None else x,
            norm_weight if norm_weight is not None else weight, weight,
            bias if bias is not None else weight,
            rows, n_out, k, eps, x.stride(0),
            residual.stride(0) if residual is not None else 0,
            total.stride(0) if total is not None else 0, weight.stride(0), y.stride(0),
            NORM=norm_weight is not None, HAS_RES=residual is not None,
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul, PDL=pdl, ROWS=1 if rows == 1 else 16,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl > 0)
    return y if residual is None else (y, total)


def _check(x, weight, norm_weight, residual, silu_mul) -> None:
    rows, k = x.shape
    if rows > MAX_ROWS or weight.shape[1] != k or (silu_mul and weight.shape[0] % 2):
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} does not fit weight "
                         f"{tuple(weight.shape)} (at most {MAX_ROWS} rows; silu_mul needs "
                         f"an even number of weight rows)")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"skinny_linear: norm_weight shape {tuple(norm_weight.shape)} "
                         f"!= ({k},)")
    if residual is not None and (norm_weight is None or residual.shape != x.shape):
        raise ValueError(f"skinny_linear: residual {tuple(residual.shape)} needs a norm "
                         f"and x's shape {tuple(x.shape)}")
