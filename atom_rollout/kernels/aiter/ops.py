"""AiterOps: the KernelOps interface on AITER kernels (ROCm).

Our caches are already AITER's "NHD" / flash layout, [num_blocks, block_size,
kv_heads, head_dim], so no op converts layouts. Per op (AITER names as of
ROCm/aiter e4048607, as called by ROCm/ATOM ffdf3bb5):

- write_kv      aiter.reshape_and_cache_flash(k, v, k_cache, v_cache, slots,
                "auto", k_scale=1, v_scale=1); the kernel skips negative slots.
                Fallback: caches whose (block, head, dim) are not packed.
- attention     decode (one token per sequence): aiter.paged_attention_v1(...,
                kv_cache_layout="NHD") over our block_tables/context_lens.
                Anything else (prefill, chunked prefill over a cached prefix,
                mixed batches): aiter's Triton unified_attention, which reads
                the paged cache directly (ATOM's flash-layout path).
                Fallback to the Triton backend: query dtype not fp16/bf16, or
                caches of another dtype (e.g. fp32 runs).
- rms_norm      aiter.rmsnorm2d_fwd; with residual aiter.rmsnorm2d_fwd_with_add.
                Fallback: weight or residual dtype differs from x.
- rotary        aiter.rope_cached_positions_2c_fwd_inplace (NeoX, cos/sin
                [max_pos, 1, 1, d/2] split out of cos_sin once and cached).
                Fallback: query and key of different dtypes.
- silu_and_mul  aiter.silu_and_mul(out, x).
- prepare_qkv   the composition of rms_norm, rotary and write_kv above (no fused
                AITER call), each with its own fallback.
- linear        torch's F.linear (hipBLASLt).
- linear_add_rms_norm  silu_and_mul (when gated), F.linear, then rms_norm above.
Unverified on AMD hardware: tests check argument mapping against a fake aiter.
"""
from __future__ import annotations

import importlib
import math
import warnings
from types import ModuleType
from typing import Callable

import torch

from ..interface import KernelOps, unfused_linear_add_rms_norm, unfused_prepare_qkv
from ..metadata import AttentionMetadata

PA_PARTITION_SIZE = 256  # paged_attention_v1's partition; its workspace is sized by it
# What paged_attention_v1 is built and tested for (aiter paged_attn.py, test_pa_v1.py).
PA_HEAD_SIZES = frozenset({64, 80, 96, 112, 120, 128, 192, 256})
PA_BLOCK_SIZES = frozenset({1, 16, 32})
PA_MAX_GQA = 32
PA_MAX_CONTEXT = 65536
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The current module path first; the second is the pre-reorganisation alias ATOM imports.
UNIFIED_ATTENTION_MODULES = ("aiter.ops.triton.attention.unified_attention",
                             "aiter.ops.triton.unified_attention")
MAX_CACHED_TABLES = 8


class AiterOps:
    name = "aiter"

    def __init__(self, fallback: KernelOps | None = None) -> None:
        import aiter  # only here: importing this module must work without aiter
        self._aiter: ModuleType = aiter
        self._unified_attention = _import_unified_attention()
        self._fallback = fallback
        self._unit_scales: dict[torch.device, torch.Tensor] = {}
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not (_packed_cache(k_cache) and _packed_cache(v_cache)
                and k_cache.stride(0) == v_cache.stride(0)):
            return self._fallback_ops().write_kv(key, value, k_cache, v_cache, slot_mapping)
        if key.shape[0] == 0:
            return
        # The kernel takes one token stride and assumes (head, dim) packed, with
        # key/value already in the cache dtype ("auto" means no conversion).
        key = _packed_rows(key.to(k_cache.dtype))
        value = _packed_rows(value.to(v_cache.dtype))
        scale = self._unit_scale(key.device)
        self._aiter.reshape_and_cache_flash(key, value, k_cache, v_cache, slot_mapping,
                                            "auto", scale, scale)

    def attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not _aiter_attention_dtypes(query, k_cache, v_cache):
            return self._fallback_ops().attention(query, k_cache, v_cache, meta, scale)
        if _fits_paged_decode(query, k_cache, meta):
            return self._paged_decode(query, k_cache, v_cache, meta, scale)
        if self._unified_attention is None:
            return self._fallback_ops().attention(query, k_cache, v_cache, meta, scale)
        return self._unified(query, k_cache, v_cache, meta, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
        if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
            return self._fallback_ops().rms_norm(x, weight, eps, residual)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if residual is None:
            return self._aiter.rmsnorm2d_fwd(rows, weight, eps).view(x.shape)
        out, residual_out = torch.empty_like(rows), torch.empty_like(rows)
        self._aiter.rmsnorm2d_fwd_with_add(out, rows, residual.reshape(rows.shape).contiguous(),
                                           residual_out, weight, eps)
        return out.view(x.shape), residual_out.view(x.shape)

    def rotary(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if query.dtype != key.dtype:
            return self._fallback_ops().rotary(query, key, positions, cos_sin)
        query, key = _unit_last_stride(query), _unit_last_stride(key)
        cos, sin = self._rope_table(cos_sin)
        # AITER rope is "sbhd": the token axis is b, with s = 1; int64 positions
        # are what its default build (ENABLE_ROPE_POSITIONS_INT32=0) accepts.
        self._aiter.rope_cached_positions_2c_fwd_inplace(
            query.unsqueeze(0), key.unsqueeze(0), cos, sin,
            positions.reshape(1, -1).long().contiguous(),
            0, reuse_freqs_front_part=True, nope_first=False)  # 0: NeoX rotate style
        return query, key

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
        self._aiter.silu_and_mul(out, x)
        return out

    def prepare_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                    positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    prefetch: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return unfused_prepare_qkv(self, query, key, value, q_weight, k_weight, eps,
                                   positions, cos_sin, k_cache, v_cache, slot_mapping)

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return unfused_linear_add_rms_norm(self, x, weight, residual, norm_weight, eps, gated)

    def _paged_decode(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
        query = query.contiguous()
        out = torch.empty_like(query)
        # paged_attention_v1 rejects a max_context_len beyond the block table's
        # width; an upper bound past it cannot be a real length anyway.
        max_context = max(1, min(meta.max_context_len,
                                 meta.block_tables.shape[1] * k_cache.shape[1]))
        workspace = torch.empty(_pa_workspace_bytes(query, max_context), dtype=torch.uint8,
                                device=query.device)
        unit = self._unit_scale(query.device)
        # cu_query_lens=None: one query row per sequence, row b for sequence b.
        self._aiter.paged_attention_v1(
            out, workspace, query, k_cache, v_cache, scale, meta.block_tables, None,
            meta.context_lens, max_context, None, "auto", "NHD", 0.0, unit, unit, None,
            PA_PARTITION_SIZE)
        return out

    def _unified(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        self._unified_attention(
            query, k_cache, v_cache, out,
            cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            seqused_k=meta.context_lens, max_seqlen_k=meta.max_context_len,
            softmax_scale=scale, causal=True, window_size=(-1, -1),
            block_table=meta.block_tables, softcap=0,
            q_descale=None, k_descale=None, v_descale=None)
        return out

    def _fallback_ops(self) -> KernelOps:
        if self._fallback is None:
            from ..triton import TritonOps
            self._fallback = TritonOps()
        return self._fallback

    def _unit_scale(self, device: torch.device) -> torch.Tensor:
        """float32 [1] of 1.0: the AITER cache/decode kernels read a k/v scale
        even for unquantised caches."""
        if device not in self._unit_scales:
            self._unit_scales[device] = torch.ones(1, dtype=torch.float32, device=device)
        return self._unit_scales[device]

    def _rope_table(self, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin as contiguous [max_pos, 1, 1, d/2] (the kernel takes no
        strides for them), kept in the table's own dtype for precision."""
        # Holding the source keeps its storage alive, so its address is not reused.
        key = (cos_sin.data_ptr(), cos_sin.shape, cos_sin.dtype, cos_sin.device)
        cached = self._rope_tables.get(key)
        if cached is None or cached[0] is not cos_sin:
            if len(self._rope_tables) >= MAX_CACHED_TABLES:
                self._rope_tables.clear()
            cos, sin = cos_sin.chunk(2, dim=-1)
            cached = (cos_sin, cos.contiguous()[:, None, None, :],
                      sin.contiguous()[:, None, None, :])
            self._rope_tables[key] = cached
        return cached[1], cached[2]


def _import_unified_attention() -> Callable | None:
    """aiter's Triton unified_attention, or None (then non-decode attention
    falls back) when this aiter lacks it or its Triton side fails to load."""
    errors = []
    for module in UNIFIED_ATTENTION_MODULES:
        try:
            return importlib.import_module(module).unified_attention
        except Exception as error:  # noqa: BLE001 - any failure means "not usable"
            errors.append(f"{module}: {error!r}")
    warnings.warn("aiter unified_attention unavailable, prefill attention falls back to "
                  "the Triton backend (" + "; ".join(errors) + ")", RuntimeWarning, stacklevel=3)
    return None


def _aiter_attention_dtypes(query: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor) -> bool:
    return query.dtype in HALF_DTYPES and k_cache.dtype == v_cache.dtype == query.dtype


def _fits_paged_decode(query: torch.Tensor, k_cache: torch.Tensor,
                       meta: AttentionMetadata) -> bool:
    """One token per sequence (T == B and max_query_len == 1, host ints only)
    and a shape paged_attention_v1 is built for."""
    gqa = query.shape[1] // k_cache.shape[2]
    return (meta.max_query_len == 1 and query.shape[0] == meta.num_seqs
            and query.shape[2] in PA_HEAD_SIZES and k_cache.shape[1] in PA_BLOCK_SIZES
            and 1 <= gqa <= PA_MAX_GQA and meta.max_context_len <= PA_MAX_CONTEXT)


def _pa_workspace_bytes(query: torch.Tensor, max_context: int) -> int:
    """tmp_out [B, H, P, D] in the query dtype, then exp_sums and max_logits
    [B, H, P] float32, P the number of partitions."""
    num_seqs, num_heads, head_size = query.shape
    partitions = math.ceil(max_context / PA_PARTITION_SIZE)
    cells = num_seqs * num_heads * partitions
    return cells * head_size * query.element_size() + 2 * cells * 4


def _packed_cache(cache: torch.Tensor) -> bool:
    """(block_size, kv_heads, head_dim) packed: the kernel derives offsets
    inside a block from the shape, taking only the block stride."""
    heads, dim = cache.shape[2:]
    return cache.stride(3) == 1 and cache.stride(2) == dim and cache.stride(1) == heads * dim


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
