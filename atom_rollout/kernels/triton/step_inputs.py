"""One launch that loads a decode-shaped step into the static inputs of its CUDA graph.

It copies the step's uploaded input ids, positions, slots, context lengths and block
tables into the graph's buffers, feeds tokens the previous launch sampled into the input
ids (async scheduling: per input token a row of those tokens, or -1 where the uploaded
id stands) and pads the rows past the batch up to the captured size, as DecodeGraphs'
torch path does: padding rows write no KV (slot -1), see a context of query_len keys
and, where those span several blocks, point their first blocks at block 0; their ids,
positions and other table columns keep whatever the buffers held. One program per row
of the padded batch, each writing only its own row: no write races.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TABLE_BLOCK = 128  # block-table columns a program copies per iteration


@triton.jit(do_not_specialize=["batch", "query_len", "width", "src_table_stride",
                               "pad_blocks"])
def _load_kernel(ids_dst, pos_dst, slot_dst, ctx_dst, table_dst,
                 ids_src, pos_src, slot_src, ctx_src, table_src, feed_ptr, fed_ptr,
                 batch, query_len, width, src_table_stride, dst_table_stride, pad_blocks,
                 HAS_FEED: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    real = row < batch
    offs = tl.arange(0, BLOCK_Q)
    token = row * query_len + offs
    in_row = offs < query_len
    loaded = offs < tl.where(real, query_len, 0)  # (no scalar & block: the interpreter)
    ids = tl.load(ids_src + token, mask=loaded)
    if HAS_FEED:
        source = tl.load(feed_ptr + token, mask=loaded, other=-1)
        fed = tl.load(fed_ptr + tl.maximum(source, 0), mask=source >= 0)
        ids = tl.where(source >= 0, fed.to(ids.dtype), ids)
    tl.store(ids_dst + token, ids, mask=loaded)
    tl.store(pos_dst + token, tl.load(pos_src + token, mask=loaded), mask=loaded)
    slots = tl.load(slot_src + token, mask=loaded, other=-1)
    tl.store(slot_dst + token, slots, mask=in_row)
    context = tl.load(ctx_src + row, mask=real, other=query_len)
    tl.store(ctx_dst + row, context.to(ctx_dst.dtype.element_ty))
    columns = tl.where(real, width, pad_blocks)
    copied = tl.where(real, width, 0)
    for start in range(0, columns, BLOCK_W):
        cols = start + tl.arange(0, BLOCK_W)
        blocks = tl.load(table_src + row * src_table_stride + cols, mask=cols < copied,
                         other=0)
        tl.store(table_dst + row * dst_table_stride + cols, blocks, mask=cols < columns)


def load_step_inputs(static: tuple[torch.Tensor, ...], step: tuple[torch.Tensor, ...],
                     size: int, query_len: int, block_size: int,
                     feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """static, step: (input_ids [T], positions [T], slot_mapping [T], context_lens [B],
    block_tables [B, W]): the graph's buffers (sized for the largest batch) and the step's
    device tensors of batch B = step context_lens' length, T = B * query_len tokens.
    size: the padded batch (>= B); feed: (sources [T] int64, sampled tokens) or None."""
    ids, positions, slots, context_lens, tables = step
    batch, width = tables.shape
    table_dst = static[4]
    if size * query_len > static[0].shape[0] or size > table_dst.shape[0] \
            or width > table_dst.shape[1] or context_lens.shape[0] != batch \
            or ids.shape[0] != batch * query_len:
        raise ValueError(f"load_step_inputs: a batch of {batch} x {query_len} tokens with "
                         f"{width} table columns does not fit buffers padded to {size}")
    if table_dst.stride(1) != 1 or tables.stride(1) != 1:
        raise ValueError("load_step_inputs: block tables need contiguous rows")
    blocks = -(-query_len // block_size)
    sources, fed = feed if feed is not None else (ids, ids)  # never read without a feed
    _load_kernel[(size,)](
        *static[:4], table_dst, ids, positions, slots, context_lens, tables, sources, fed,
        batch, query_len, width, tables.stride(0), table_dst.stride(0),
        blocks if blocks > 1 else 0, HAS_FEED=feed is not None,
        BLOCK_Q=triton.next_power_of_2(query_len),
        BLOCK_W=min(TABLE_BLOCK, triton.next_power_of_2(table_dst.shape[1])), num_warps=1)
