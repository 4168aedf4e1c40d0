"""Row-wise kernels: RMSNorm (optionally fused with the residual add), neox
rotary embedding (in place) and SiLU-and-multiply. Rounding follows TorchOps:
fp32 math, rounded to the tensor dtype where the reference rounds."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import release_dependents, wait_for_inputs


@triton.jit
def _row_input(x_ptr, row, cols, mask, stride_x, split_stride, dtype: tl.constexpr,
               SPLITS: tl.constexpr):
    """x's row, or (SPLITS > 0) the sum of SPLITS float32 partials rounded to dtype,
    added in split order."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if SPLITS > 0:
        for split in range(1, SPLITS):
            x += tl.load(x_ptr + split * split_stride + row * stride_x + cols, mask=mask,
                         other=0.0)
        x = x.to(dtype)
    return x


@triton.jit
def _rms_norm_kernel(out_ptr, sum_ptr, x_ptr, res_ptr, w_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_s, split_stride,
                     HAS_RESIDUAL: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    release_dependents(PDL)  # the next projection may start loading its weights
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: read before the wait
    wait_for_inputs(PDL)
    x = _row_input(x_ptr, row, cols, mask, stride_x, split_stride, sum_ptr.dtype.element_ty,
                   SPLITS)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    normed = (x32 * inv_rms).to(x.dtype)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, pdl: bool = False):
    """Same contract as TorchOps.rms_norm; outputs are new tensors. ``pdl``: launched as
    a programmatic dependent of the kernel before (see pdl.py)."""
    _check_norm_args(x.shape, weight, residual)
    x2 = _rows(x)
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return _launch_rms_norm(x2, 0, x.shape, sum_dtype, weight, eps, residual, pdl)


def rms_norm_of_partials(partials: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor,
                         eps: float, residual: torch.Tensor,
                         pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(x, weight, eps, residual) where x, of ``dtype``, is the sum of the float32
    partials [splits, *residual.shape] (added in split order, then rounded to dtype)."""
    _check_norm_args(partials.shape[1:], weight, residual)
    if residual.dtype != dtype or not partials.is_contiguous():
        raise ValueError(f"rms_norm_of_partials: residual dtype {residual.dtype} must be "
                         f"{dtype} and the partials contiguous")
    x2 = partials.view(partials.shape[0], -1, partials.shape[-1])
    return _launch_rms_norm(x2, partials.shape[0], residual.shape, dtype, weight, eps, residual,
                            pdl)


def _check_norm_args(shape, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    n_cols = shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({n_cols},)")
    if residual is not None and residual.shape != shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape "
                         f"{tuple(shape)}")


def _launch_rms_norm(x2: torch.Tensor, splits: int, shape, sum_dtype: torch.dtype,
                     weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                     pdl: bool):
    """x2 is [rows, n] (splits == 0) or float32 partials [splits, rows, n]."""
    n_cols = shape[-1]
    device = x2.device
    out = torch.empty(shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=device)
    out2 = out.view(-1, n_cols)
    res2 = _rows(residual) if residual is not None else out2
    total = torch.empty(shape, dtype=sum_dtype, device=device) if residual is not None else out
    total2 = total.view(-1, n_cols)
    if out2.shape[0]:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_kernel[(out2.shape[0],)](
            out2, total2, x2, res2, weight.contiguous(), n_cols, eps,
            x2.stride(-2), res2.stride(0), out2.stride(0), total2.stride(0),
            x2.stride(0) if splits else 0,
            HAS_RESIDUAL=residual is not None, SPLITS=splits, BLOCK=block, PDL=pdl,
            num_warps=_row_warps(block), launch_pdl=pdl)
    return out if residual is None else (out, total)


@triton.jit
def _rotate_heads(base, stride_h, num_heads, cos, sin, halves, half_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & half_mask[None, :]
    ptr1 = base + heads[:, None] * stride_h + halves[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptr1, out1.to(base.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, out2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(cos_sin_ptr, pos_ptr, token, stride_cs, HALF: tl.constexpr,
             BLOCK_HALF: tl.constexpr):
    """A token's rotary cos and sin halves (fp32), their offsets and mask."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    halves = tl.arange(0, BLOCK_HALF)
    half_mask = halves < HALF
    row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(row + halves, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + halves, mask=half_mask, other=0.0).to(tl.float32)
    return cos, sin, halves, half_mask


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_sin_ptr, num_q_heads, num_k_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin, halves, half_mask = _cos_sin(cos_sin_ptr, pos_ptr, token, stride_cs, HALF,
                                           BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin,
                  halves, half_mask, HALF, BLOCK_QH)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_k_heads, cos, sin,
                  halves, half_mask, HALF, BLOCK_KH)


def rotary(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
           cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates query [T, h, d] and key [T, kvh, d] in place and returns them
    (tensors whose last dim is strided are rotated in a contiguous copy)."""
    head_dim = query.shape[-1]
    if query.dim() != 3 or key.dim() != 3 or key.shape[-1] != head_dim \
            or key.shape[0] != query.shape[0]:
        raise ValueError(f"rotary: query {tuple(query.shape)} and key {tuple(key.shape)} "
                         f"must be [T, heads, head_dim] with equal T and head_dim")
    if cos_sin.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rotary: cos_sin last dim {cos_sin.shape[-1]} must equal the "
                         f"(even) head_dim {head_dim}")
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    cos_sin = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    if query.shape[0]:
        half = head_dim // 2
        _rotary_kernel[(query.shape[0],)](
            query, key, positions, cos_sin, query.shape[1], key.shape[1],
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin.stride(0),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_QH=triton.next_power_of_2(query.shape[1]),
            BLOCK_KH=triton.next_power_of_2(key.shape[1]), num_warps=4)
    return query, key


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} must be even")
    d = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    if x2.shape[0] and d:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            out2, x2, d, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, last] tensor with a unit last stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _row_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8
