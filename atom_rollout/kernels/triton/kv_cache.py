"""Scatter new tokens' K/V into the paged cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_heads(src, stride_sh, dst, stride_dh, num_heads, head_dim,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (dims < head_dim)[None, :]
    x = tl.load(src + heads[:, None] * stride_sh + dims[None, :], mask=mask)
    tl.store(dst + heads[:, None] * stride_dh + dims[None, :],
             x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     num_heads, head_dim, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padded token (e.g. a CUDA-graph batch larger than the real one)
        return
    page = slot // block_size
    in_page = slot % block_size
    _copy_heads(k_ptr + token * stride_kt, stride_kh,
                k_cache_ptr + page * stride_kcb + in_page * stride_kcs, stride_kch,
                num_heads, head_dim, BLOCK_H, BLOCK_D)
    _copy_heads(v_ptr + token * stride_vt, stride_vh,
                v_cache_ptr + page * stride_vcb + in_page * stride_vcs, stride_vch,
                num_heads, head_dim, BLOCK_H, BLOCK_D)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, kv_heads, head_dim] at flat slots; negative slots are skipped."""
    if key.shape != value.shape or key.shape[1:] != k_cache.shape[2:] \
            or v_cache.shape != k_cache.shape or slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"write_kv: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)} do not fit caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("write_kv: k_cache and v_cache need a contiguous last dimension")
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_heads, head_dim, k_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4)
