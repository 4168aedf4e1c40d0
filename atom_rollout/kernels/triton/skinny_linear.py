"""Linear layers for a handful of rows (decode at small batch), with the op that
feeds them fused in front: y = prologue(x) @ W^T (+ bias).

At batch 1-8 a projection only streams its weight once, so its cost is the weight
bytes plus the launch; a separate RMSNorm or SiLU-and-mul launch before it costs
about as much as the small projection itself. Prologues:

* ``norm``: RMSNorm of x (or of x + residual, whose sum is also stored) times the
  norm weight, rounded exactly as ``rms_norm`` rounds before its projection;
* ``silu``: silu(x[:, :K]) * x[:, K:], rounded as ``silu_and_mul`` rounds.

A program owns BLOCK_N output columns for all rows (rows padded to 16 for
``tl.dot``) and streams its BLOCK_N x K slice of the weight; the norm prologue
re-reads the (tiny) input rows once per program to get their inverse RMS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # rows per launch; callers route larger batches to the GEMM path
PLAIN, NORM, SILU = 0, 1, 2


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _input_tile(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, K,
                PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """The rows' input at cols in the input dtype (before any norm scaling)."""
    offs = rows[:, None] * stride_x + cols[None, :]
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + offs + K, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
        return (act.to(tl.float32) * up).to(x_ptr.dtype.element_ty)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _inverse_rms(x_ptr, res_ptr, sum_ptr, rows, row_mask, stride_x, stride_r, stride_s, K,
                 eps, sum_rows, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row 1/RMS of the input; the first sum_rows rows' x + residual are stored."""
    squares = tl.zeros([16, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = _input_tile(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, K, 1, HAS_RES)
        if HAS_RES:
            tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], x,
                     mask=mask & (rows < sum_rows)[:, None])
        x32 = x.to(tl.float32)
        squares += x32 * x32
    return 1.0 / tl.sqrt(tl.sum(squares, 1) / K + eps)


@triton.jit
def _skinny_linear_kernel(
    y_ptr, sum_ptr, x_ptr, res_ptr, norm_w_ptr, w_ptr, b_ptr,
    M, N, K, eps, stride_x, stride_r, stride_s, stride_w, stride_y,
    PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, 16)
    row_mask = rows < M
    n_idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_idx < N
    if PROLOGUE == 1:
        inv_rms = _inverse_rms(x_ptr, res_ptr, sum_ptr, rows, row_mask, stride_x, stride_r,
                               stride_s, K, eps, tl.where(pid == 0, M, 0), HAS_RES, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    w_rows = w_ptr + n_idx.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = _input_tile(x_ptr, res_ptr, rows, cols, row_mask[:, None] & k_mask[None, :],
                        stride_x, stride_r, K, PROLOGUE, HAS_RES)
        if PROLOGUE == 1:
            normed = (x.to(tl.float32) * inv_rms[:, None]).to(x_ptr.dtype.element_ty)
            g = tl.load(norm_w_ptr + cols, mask=k_mask, other=0.0)
            x = (g.to(tl.float32)[None, :] * normed.to(tl.float32)).to(x_ptr.dtype.element_ty)
        acc += tl.dot(x.to(w.dtype), tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_idx, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + n_idx[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  *, prologue: int = PLAIN, residual: torch.Tensor | None = None,
                  norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  config: SkinnyConfig = SkinnyConfig()):
    """prologue(x) @ weight.T + bias for x [M <= 16, K_in]. With prologue NORM and a
    residual, returns (y, x + residual); otherwise y."""
    rows, k_in = x.shape
    n, k = weight.shape
    expected_k = 2 * k if prologue == SILU else k
    if rows > MAX_ROWS or k_in != expected_k:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} does not fit weight "
                         f"{tuple(weight.shape)} (at most {MAX_ROWS} rows)")
    if prologue == NORM and (norm_weight is None or norm_weight.shape != (k,)):
        raise ValueError(f"skinny_linear: norm prologue needs norm_weight of shape ({k},)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if rows:
        cfg = config
        _skinny_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
            y, total if total is not None else y, x,
            residual if residual is not None else x,
            norm_weight if norm_weight is not None else weight, weight,
            bias if bias is not None else weight,
            rows, n, k, eps, x.stride(0),
            residual.stride(0) if residual is not None else 0,
            total.stride(0) if total is not None else 0, weight.stride(0), y.stride(0),
            PROLOGUE=prologue, HAS_RES=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y if residual is None else (y, total)
