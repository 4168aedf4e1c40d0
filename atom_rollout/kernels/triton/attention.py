"""Paged causal attention over a flat batch of prefill chunks and decode tokens.

One kernel serves every mix: a program owns a tile of BLOCK_Q query tokens of
one sequence times the GROUP query heads that share one kv head, so K/V is read
once per tile for the whole GQA group. Prefill programs find their sequence by
binary search over ``query_start_loc`` (grid size comes from host ints only, so
the launch is CUDA-graph capturable). For decode-shaped batches the key range is
split over several programs (flash-decoding) and a second kernel merges them;
their grid is sequence-major (all heads and splits of one sequence launch
together) and, from ORDER_MIN_SEQS sequences up, walks the sequences longest
context first, so the longest programs start first and the short ones fill the
SMs at the end (H100, Qwen3-0.6B heads, contexts 100-2048: batch 48-128 4-15%
faster, scripts/bench_decode_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..metadata import AttentionMetadata
from .pdl import release_dependents, wait_for_inputs

LOG2E = 1.4426950408889634
DECODE_MAX_QUERY_LEN = 16  # batches up to this max_query_len use decode tiles
MAX_SPLITS = 32
MIN_KEYS_PER_SPLIT = 256
ORDER_MIN_SEQS = 16  # below this the sort costs about what the order saves


@triton.jit
def _find_seq(query_start_loc, q_block_id, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence b whose first q block (start_b // BLOCK_Q + b) is the
    largest one not after q_block_id."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _program_tile(query_start_loc, seq_order, num_seqs, num_heads, q_blocks_per_seq,
                  GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, DECODE: tl.constexpr,
                  ORDERED: tl.constexpr):
    """(kv_head, split, seq, q_block, q_start, q_len) of this program. Decode grid:
    (kv_heads * splits, sequence slots * q_blocks_per_seq); prefill: (q blocks, kv_heads,
    splits)."""
    if DECODE:
        kv_head = tl.program_id(0) % (num_heads // GROUP)
        split = tl.program_id(0) // (num_heads // GROUP)
        seq = tl.program_id(1) // q_blocks_per_seq
        q_block = tl.program_id(1) % q_blocks_per_seq
        if ORDERED:
            seq = tl.load(seq_order + seq)
        q_start = tl.load(query_start_loc + seq)
        q_len = tl.load(query_start_loc + seq + 1) - q_start
    else:
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq = _find_seq(query_start_loc, tl.program_id(0), num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_loc + seq)
        q_len = tl.load(query_start_loc + seq + 1) - q_start
        q_block = tl.program_id(0) - (q_start // BLOCK_Q + seq)
    return kv_head, split, seq, q_block, q_start, q_len


@triton.jit
def _attend_tile(q, m_i, l_i, acc, start, kv_hi, q_pos, table, kv_head, k_cache_ptr,
                 v_cache_ptr, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb,
                 stride_vs, stride_vh, dims, dim_valid, BLOCK_N: tl.constexpr,
                 PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One BLOCK_N-key tile of the online softmax: the running (max, sum, output)."""
    keys = start + tl.arange(0, BLOCK_N)
    key_valid = keys < kv_hi
    page = tl.load(table + keys // PAGE, mask=key_valid, other=0).to(tl.int64)
    in_page = (keys % PAGE).to(tl.int64)
    kv_mask = key_valid[:, None] & dim_valid[None, :]
    k_off = page * stride_kb + in_page * stride_ks + kv_head * stride_kh
    k = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
    visible = key_valid[None, :] & (keys[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = page * stride_vb + in_page * stride_vs + kv_head * stride_vh
    v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                        input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _store_result(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, part_n_ptr, m_i, l_i, acc,
                  token, head, row_valid, dims, dim_valid, split, used_splits, num_heads,
                  num_splits, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                  SPLIT: tl.constexpr):
    """The normalised output, or with SPLIT this split's partial (and, from split 0, the
    number of splits that hold keys)."""
    store_mask = row_valid[:, None] & dim_valid[None, :]
    if SPLIT:
        part = (token * num_heads + head) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
        if split == 0:
            tl.store(part_n_ptr + token * num_heads + head, used_splits, mask=row_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)


# Per-batch integers stay unspecialised: Triton would otherwise compile a variant for
# each of ==1 / multiple of 16 / other, and a first rollout would pay for those the
# start-up warm-up (one prompt, a 3-block table) never meets.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, part_n_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr,
    query_start_loc, context_lens, block_tables, seq_order,
    num_seqs, num_heads, num_splits, q_blocks_per_seq, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DECODE: tl.constexpr, ORDERED: tl.constexpr, PDL: tl.constexpr,
):
    release_dependents(PDL)
    # Until the wait this reads only the step's metadata, which no PDL kernel writes.
    kv_head, split, seq, q_block, q_start, q_len = _program_tile(
        query_start_loc, seq_order, num_seqs, num_heads, q_blocks_per_seq, GROUP, BLOCK_Q,
        DECODE, ORDERED)
    if q_block * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(context_lens + seq)

    # keys this tile can see end at the causal position of its last query
    last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = ctx_len - q_len + last_q + 1
    kv_lo = 0
    kv_hi = kv_end
    chunk = kv_end
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * chunk
        # a split past the keys does nothing: the merge reads the first
        # cdiv(kv_end, chunk) splits only (a graph's grid is sized for its longest context)
        if (split > 0) & (kv_lo >= kv_end):
            return
        kv_hi = tl.minimum(kv_lo + chunk, kv_end)

    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    table = block_tables + seq.to(tl.int64) * stride_bt
    wait_for_inputs(PDL)

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (rows // GROUP_PAD < BLOCK_Q) & (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = ctx_len - q_len + q_idx
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, kv_hi, q_pos, table, kv_head,
                                     k_cache_ptr, v_cache_ptr, scale_log2, stride_kb,
                                     stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                     dims, dim_valid, BLOCK_N, PAGE, DOT_PRECISION)
    _store_result(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, part_n_ptr, m_i, l_i, acc,
                  token, head, row_valid, dims, dim_valid, split, tl.cdiv(kv_end, chunk),
                  num_heads, num_splits, stride_ot, stride_oh, HEAD_DIM, SPLIT)


@triton.jit
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, part_n_ptr,
                         num_heads, num_splits, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         SPLIT_PAD: tl.constexpr, PDL: tl.constexpr):
    release_dependents(PDL)
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLIT_PAD)
    split_valid = splits < tl.load(part_n_ptr + token * num_heads + head)  # splits with keys
    part = (token * num_heads + head) * num_splits + splits
    m = tl.load(part_m_ptr + part, mask=split_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    denom = tl.sum(weight * l, 0)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@dataclass(frozen=True)
class TileConfig:
    block_q: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 3


def tile_config(max_query_len: int, group_pad: int) -> TileConfig:
    """Decode-shaped batches get short query tiles; prefill gets 64-row tiles."""
    if max_query_len <= DECODE_MAX_QUERY_LEN:
        block_q = min(triton.next_power_of_2(max(max_query_len, 1)), max(1, 64 // group_pad))
        return TileConfig(block_q, max(16, block_q * group_pad), 64, 4)
    block_m = max(64, group_pad)
    return TileConfig(block_m // group_pad, block_m, 64, 4)


def choose_num_splits(meta: AttentionMetadata, config: TileConfig, kv_heads: int,
                      target_programs: int, max_splits: int = MAX_SPLITS) -> int:
    """Split the key range only when the unsplit grid would leave the GPU idle
    and every split still gets a useful number of keys; powers of two keep the
    number of compiled merge kernels small."""
    if meta.max_query_len > DECODE_MAX_QUERY_LEN:
        return 1
    q_blocks = meta.num_seqs * triton.cdiv(meta.max_query_len, config.block_q)
    wanted = triton.cdiv(target_programs, max(1, q_blocks * kv_heads))
    by_length = triton.cdiv(meta.max_context_len, MIN_KEYS_PER_SPLIT)
    splits = max(1, min(wanted, by_length, max_splits))
    return 1 << (splits.bit_length() - 1)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, num_splits: int = 1,
                    config: TileConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """Causal paged attention; ``num_splits`` > 1 splits every tile's key range;
    ``config`` overrides the tile shape chosen from the batch (for tuning); ``pdl``:
    its kernels launch as programmatic dependents (see pdl.py)."""
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = k_cache.shape[2]
    _check_shapes(query, k_cache, v_cache, meta)
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    group = num_heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    config = config or tile_config(meta.max_query_len, group_pad)
    decode = meta.max_query_len <= DECODE_MAX_QUERY_LEN
    split = num_splits > 1
    part_acc, part_m, part_l, part_n = (_split_buffers(query, num_splits) if split
                                        else (out, out, out, out))
    # 1 where unused: Triton specialises integer arguments by value class, so a varying
    # unused one would compile prefill variants for nothing
    q_blocks_per_seq = triton.cdiv(meta.max_query_len, config.block_q) if decode else 1
    grid = ((kv_heads * num_splits, meta.num_seqs * q_blocks_per_seq) if decode
            else (num_tokens // config.block_q + meta.num_seqs, kv_heads, num_splits))
    ordered = decode and meta.num_seqs >= ORDER_MIN_SEQS
    _paged_attention_kernel[grid](
        out, part_acc, part_m, part_l, part_n, query, k_cache, v_cache,
        meta.query_start_loc, meta.context_lens, meta.block_tables,
        meta.longest_first if ordered else meta.context_lens,  # read only when ORDERED
        meta.num_seqs, num_heads, num_splits, q_blocks_per_seq, scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_Q=config.block_q, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        PAGE=k_cache.shape[1], SPLIT=split, DECODE=decode, ORDERED=ordered, PDL=pdl,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl)
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_m, part_l, part_n, num_heads, num_splits,
            out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            SPLIT_PAD=triton.next_power_of_2(num_splits), PDL=pdl, launch_pdl=pdl)
    return out


def _split_buffers(query: torch.Tensor, num_splits: int):
    """fp32 partial (unnormalised output, running max, running sum) per split, and the
    number of splits that saw keys per (token, head)."""
    num_tokens, num_heads, head_dim = query.shape
    shape = (num_tokens, num_heads, num_splits)
    part_acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=query.device)
    part_m = torch.empty(shape, dtype=torch.float32, device=query.device)
    part_n = torch.empty(shape[:2], dtype=torch.int32, device=query.device)
    return part_acc, part_m, torch.empty_like(part_m), part_n


def _check_shapes(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata) -> None:
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention: query must be [T, heads, head_dim] and caches "
                         f"[num_blocks, block_size, kv_heads, head_dim]; got query "
                         f"{tuple(query.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if query.shape[1] % k_cache.shape[2] or query.shape[2] != k_cache.shape[3]:
        raise ValueError(f"attention: query {tuple(query.shape)} does not fit kv cache "
                         f"{tuple(k_cache.shape)} (heads must be a multiple of kv_heads)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention: k_cache and v_cache need a contiguous last dimension")
