"""Reference backend in plain PyTorch: runs everywhere, defines correctness."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import unfused_linear_add_rms_norm, unfused_prepare_qkv
from .metadata import AttentionMetadata


class TorchOps:
    name = "torch"

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping):
        keep = slot_mapping >= 0  # negative slots are padding (e.g. CUDA-graph batches)
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)

    def attention(self, query, k_cache, v_cache, meta: AttentionMetadata, scale):
        keys, values, key_valid = _gather_context(k_cache, v_cache, meta)
        q_pad, token_index, q_pos = _pad_queries(query, meta)
        # mask [B, 1, max_q, max_ctx]: key must exist and not lie after the query
        key_pos = torch.arange(keys.shape[1], device=query.device)
        mask = key_valid[:, None, :] & (key_pos[None, None, :] <= q_pos[:, :, None])
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys.transpose(1, 2).to(query.dtype),
            values.transpose(1, 2).to(query.dtype), attn_mask=mask[:, None],
            scale=scale, enable_gqa=True)
        out = out.transpose(1, 2)  # [B, max_q, H, D]
        return out.reshape(-1, *out.shape[2:])[token_index]

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is not None:
            x = x + residual
            residual = x
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * normed.to(x.dtype)
        return out if residual is None else (out, residual)

    def rotary(self, query, key, positions, cos_sin):
        cos, sin = cos_sin[positions].chunk(2, dim=-1)
        return _rotate(query, cos, sin), _rotate(key, cos, sin)

    def silu_and_mul(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def prepare_qkv(self, query, key, value, q_weight, k_weight, eps, positions, cos_sin,
                    k_cache, v_cache, slot_mapping, prefetch=None):
        return unfused_prepare_qkv(self, query, key, value, q_weight, k_weight, eps,
                                   positions, cos_sin, k_cache, v_cache, slot_mapping)

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def linear_add_rms_norm(self, x, weight, residual, norm_weight, eps, gated=False):
        return unfused_linear_add_rms_norm(self, x, weight, residual, norm_weight, eps, gated)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def _gather_context(k_cache, v_cache, meta: AttentionMetadata):
    """Each sequence's context KV as padded [B, max_ctx, kvh, D] plus validity."""
    block_size = k_cache.shape[1]
    max_blocks = -(-meta.max_context_len // block_size)
    tables = meta.block_tables[:, :max_blocks].long()
    offsets = torch.arange(block_size, device=tables.device)
    slots = (tables.clamp(min=0)[:, :, None] * block_size + offsets).flatten(1)
    slots = slots[:, :meta.max_context_len]
    key_pos = torch.arange(meta.max_context_len, device=tables.device)
    key_valid = key_pos[None, :] < meta.context_lens[:, None]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    return flat_k[slots], flat_v[slots], key_valid


def _pad_queries(query, meta: AttentionMetadata):
    """Scatter the flat queries to [B, max_q, H, D]; also return each flat token's
    index in that padded layout and every padded query's absolute position."""
    starts = meta.query_start_loc[:-1].long()
    query_lens = meta.query_start_loc[1:].long() - starts
    num_seqs, max_q = meta.num_seqs, meta.max_query_len
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=query.device),
                                           query_lens, output_size=query.shape[0])
    row_of_token = torch.arange(query.shape[0], device=query.device) - starts[seq_of_token]
    token_index = seq_of_token * max_q + row_of_token
    q_pad = query.new_zeros(num_seqs * max_q, *query.shape[1:])
    q_pad[token_index] = query
    first_pos = meta.context_lens.long() - query_lens
    q_pos = first_pos[:, None] + torch.arange(max_q, device=query.device)[None, :]
    return q_pad.view(num_seqs, max_q, *query.shape[1:]), token_index, q_pos
