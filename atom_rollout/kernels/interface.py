"""The op interface that models call; every backend implements all of it."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


class KernelOps(Protocol):
    name: str

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store key/value [T, kv_heads, head_dim] at flat slots of caches shaped
        [num_blocks, block_size, kv_heads, head_dim]; negative slots are skipped."""

    def attention(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Causal attention of query [T, heads, head_dim] over the paged cache
        (GQA: heads is a multiple of kv_heads). Returns [T, heads, head_dim].
        meta.max_context_len must be >= every context length (an upper bound is fine)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
        """RMSNorm of x, or of x + residual when given: then returns
        (normed, x + residual) so the sum can be the next residual."""

    def rotary(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary on query [T, h, d] and key [T, kvh, d]; cos_sin is
        [max_positions, d] holding cos in the first d/2 and sin in the last d/2.
        Backends may rotate in place; callers use the returned tensors."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[..., :d]) * x[..., d:] for x [..., 2d]."""

    def prepare_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                    positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    prefetch: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything between the qkv projection and attention, equal to
        ``unfused_prepare_qkv``: per-head RMSNorm of query and key (only when
        q_weight and k_weight are given), rotary, then key and value stored at
        slot_mapping (negative slots skipped). Returns the rotated (query, key);
        backends may overwrite query and key in place. ``prefetch``: the weight the layer
        reads after attention (o_proj's), which a backend may start moving into cache."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias, as F.linear (a backend may pick its own kernel by shape)."""

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor,
                            residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A residual branch's last projection, the residual add and the next RMSNorm,
        equal to ``unfused_linear_add_rms_norm``: y = x @ weight.T (of silu_and_mul(x)
        when ``gated``), then rms_norm(y, norm_weight, eps, residual). Returns
        (normed, y + residual)."""


def unfused_linear_add_rms_norm(ops: KernelOps, x: torch.Tensor, weight: torch.Tensor,
                                residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_add_rms_norm as ops' own silu_and_mul and rms_norm around F.linear: the
    definition a fused backend must match."""
    y = F.linear(ops.silu_and_mul(x) if gated else x, weight)
    return ops.rms_norm(y, norm_weight, eps, residual)


def unfused_prepare_qkv(ops: KernelOps, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, q_weight: torch.Tensor | None,
                        k_weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prepare_qkv as a sequence of ops' own rms_norm, rotary and write_kv: the
    definition a fused backend must match."""
    check_qk_weights(q_weight, k_weight)
    if q_weight is not None:
        query, key = ops.rms_norm(query, q_weight, eps), ops.rms_norm(key, k_weight, eps)
    query, key = ops.rotary(query, key, positions, cos_sin)
    ops.write_kv(key, value, k_cache, v_cache, slot_mapping)
    return query, key


def check_qk_weights(q_weight: torch.Tensor | None, k_weight: torch.Tensor | None) -> None:
    if (q_weight is None) != (k_weight is None):
        raise ValueError("prepare_qkv: q_weight and k_weight must both be given or both None")
