"""q/k RMSNorm + neox rotary + KV-cache write in one launch.

One program per (token, head) over the query heads followed by the key heads;
a key-head program also stores its rotated key and its value head into the
paged caches. The arithmetic repeats pointwise.rms_norm, pointwise.rotary and
kv_cache.write_kv step by step, rounding to the same dtypes at the same points,
so results equal that unfused sequence:

- the sum of squares is taken over one full-head load, as rms_norm's row load
  (same block size and warps, hence the same reduction order on the GPU);
- the normed head is rounded to the input dtype, scaled by the weight and
  rounded to promote(weight, input), as rms_norm stores it;
- rotary then works on halves in float32 and rounds to that dtype;
- the cache gets that rounded key converted to the cache dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..interface import check_qk_weights
from .pdl import release_dependents, wait_for_inputs
from .pointwise import _cos_sin, _row_warps


@triton.jit
def _inv_rms(src, head_dim, eps, BLOCK_D: tl.constexpr):
    """1 / rms of one head, written as _rms_norm_kernel writes it."""
    cols = tl.arange(0, BLOCK_D)
    x32 = tl.load(src + cols, mask=cols < head_dim, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / head_dim + eps)


@triton.jit
def _normed_half(src, w_ptr, offsets, mask, inv_rms, dst_ty: tl.constexpr):
    """One half of a normed head as float32, after the rounding rms_norm's store does."""
    x = tl.load(src + offsets, mask=mask, other=0.0)
    normed = (x.to(tl.float32) * inv_rms).to(x.dtype)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    return (w.to(tl.float32) * normed.to(tl.float32)).to(dst_ty).to(tl.float32)


@triton.jit
def _prepare_head(src, dst, w_ptr, cos, sin, halves, half_mask, head_dim, eps,
                  HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Norm (optional) and rotate one head from src into dst; returns the two
    rotated halves, rounded to dst's dtype."""
    dst_ty: tl.constexpr = dst.dtype.element_ty
    if HAS_NORM:
        inv_rms = _inv_rms(src, head_dim, eps, BLOCK_D)
        x1 = _normed_half(src, w_ptr, halves, half_mask, inv_rms, dst_ty)
        x2 = _normed_half(src, w_ptr, HALF + halves, half_mask, inv_rms, dst_ty)
    else:
        x1 = tl.load(src + halves, mask=half_mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + halves, mask=half_mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(dst_ty)
    out2 = (x2 * cos + x1 * sin).to(dst_ty)
    tl.store(dst + halves, out1, mask=half_mask)
    tl.store(dst + HALF + halves, out2, mask=half_mask)
    return out1, out2


@triton.jit
def _prepare_qkv_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, q_w_ptr, k_w_ptr,
                        pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                        num_q_heads, head_dim, eps, block_size,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_oqt, stride_oqh, stride_okt, stride_okh, stride_cs,
                        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                        HAS_NORM: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    release_dependents(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    # positions, the rotary table and slots: no PDL kernel writes them (pdl.py), read early
    cos, sin, halves, half_mask = _cos_sin(cos_sin_ptr, pos_ptr, token, stride_cs, HALF,
                                           BLOCK_HALF)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    wait_for_inputs(PDL)
    if head < num_q_heads:
        _prepare_head(q_ptr + token * stride_qt + head * stride_qh,
                      q_out_ptr + token * stride_oqt + head * stride_oqh, q_w_ptr,
                      cos, sin, halves, half_mask, head_dim, eps, HAS_NORM, HALF, BLOCK_D)
    else:
        kv_head = (head - num_q_heads).to(tl.int64)
        k1, k2 = _prepare_head(k_ptr + token * stride_kt + kv_head * stride_kh,
                               k_out_ptr + token * stride_okt + kv_head * stride_okh, k_w_ptr,
                               cos, sin, halves, half_mask, head_dim, eps,
                               HAS_NORM, HALF, BLOCK_D)
        if slot >= 0:  # negative: padding (e.g. a CUDA-graph batch larger than the real one)
            page = slot // block_size
            in_page = slot % block_size
            k_dst = k_cache_ptr + page * stride_kcb + in_page * stride_kcs + kv_head * stride_kch
            cache_ty: tl.constexpr = k_cache_ptr.dtype.element_ty
            tl.store(k_dst + halves, k1.to(cache_ty), mask=half_mask)
            tl.store(k_dst + HALF + halves, k2.to(cache_ty), mask=half_mask)
            v_src = v_ptr + token * stride_vt + kv_head * stride_vh
            v_dst = v_cache_ptr + page * stride_vcb + in_page * stride_vcs + kv_head * stride_vch
            cols = tl.arange(0, BLOCK_D)
            v = tl.load(v_src + cols, mask=cols < head_dim)
            tl.store(v_dst + cols, v.to(v_cache_ptr.dtype.element_ty), mask=cols < head_dim)


def prepare_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slot_mapping: torch.Tensor, pdl: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """KernelOps.prepare_qkv in one launch (``pdl``: see pdl.py). Query and key are overwritten in
    place when the result keeps their dtype (as rotary does); with norm weights
    of a wider dtype the results are new tensors of the promoted dtype."""
    _check_shapes(query, key, value, q_weight, k_weight, cos_sin, k_cache, v_cache,
                  slot_mapping)
    query, key, value = (_unit_last_stride(t) for t in (query, key, value))
    cos_sin = _unit_last_stride(cos_sin)
    q_out = _output(query, q_weight)
    k_out = _output(key, k_weight)
    num_tokens, num_q_heads, head_dim = query.shape
    if num_tokens == 0:
        return q_out, k_out
    has_norm = q_weight is not None
    q_w = q_weight.contiguous() if has_norm else query
    k_w = k_weight.contiguous() if has_norm else key
    block_d = triton.next_power_of_2(head_dim)
    _prepare_qkv_kernel[(num_tokens, num_q_heads + key.shape[1])](
        query, key, value, q_out, k_out, q_w, k_w, positions, cos_sin, k_cache, v_cache,
        slot_mapping, num_q_heads, head_dim, eps, k_cache.shape[1],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), q_out.stride(0), q_out.stride(1),
        k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_NORM=has_norm, HALF=head_dim // 2,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), BLOCK_D=block_d, PDL=pdl,
        num_warps=_row_warps(block_d), launch_pdl=pdl)  # rms_norm's warps: its reduction order
    return q_out, k_out


def _output(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """x itself (rotated in place) unless the norm weight promotes the dtype."""
    if weight is None or torch.promote_types(weight.dtype, x.dtype) == x.dtype:
        return x
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                       device=x.device)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_shapes(query, key, value, q_weight, k_weight, cos_sin, k_cache, v_cache,
                  slot_mapping) -> None:
    check_qk_weights(q_weight, k_weight)
    if query.dim() != 3 or key.dim() != 3 or key.shape[-1] != query.shape[-1] \
            or key.shape[0] != query.shape[0]:
        raise ValueError(f"prepare_qkv: query {tuple(query.shape)} and key "
                         f"{tuple(key.shape)} must be [T, heads, head_dim] with equal T "
                         f"and head_dim")
    head_dim = query.shape[-1]
    if cos_sin.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"prepare_qkv: cos_sin last dim {cos_sin.shape[-1]} must equal "
                         f"the (even) head_dim {head_dim}")
    if q_weight is not None and (q_weight.shape != (head_dim,)
                                 or k_weight.shape != (head_dim,)):
        raise ValueError(f"prepare_qkv: q/k norm weights {tuple(q_weight.shape)} / "
                         f"{tuple(k_weight.shape)} must be ({head_dim},)")
    if value.shape != key.shape or key.shape[1:] != k_cache.shape[2:] \
            or v_cache.shape != k_cache.shape or slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"prepare_qkv: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)} do not fit caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("prepare_qkv: k_cache and v_cache need a contiguous last dimension")
