"""log_softmax(logits / T) per row: the processed distribution of rows without top-k,
top-p or min-p, as speculative verification and drafting need it whole.

The torch path takes three passes and a float32 copy (upcast, a broadcast division that
does not vectorise, the log-softmax). Here two launches over chunks of each row (as the
fused sampling pass splits them, so that even one row spreads over many programs) read
the logits in their own dtype: ``_chunk_stats_kernel`` writes each chunk's max and sum of
exp(s - max) for s = logits / T, ``_write_kernel`` combines a row's chunks into its log
normaliser and writes s - log Z in float32. Temperature 0 counts as 1, as in
sampler.processing.processed_logprobs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampling import choose_block


@triton.jit
def _scaled_chunk(logits_ptr, temp_ptr, stride, row, chunk, vocab, BLOCK: tl.constexpr):
    """s = logits / T of one chunk (-inf past the vocabulary) and whether each lane is in."""
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    temperature = tl.load(temp_ptr + row)
    divisor = tl.where(temperature > 0, temperature, 1.0)
    x = tl.load(logits_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    return tl.where(inside, tl.math.div_rn(x, divisor), float("-inf")), cols, inside


@triton.jit
def _chunk_stats_kernel(part_ptr, logits_ptr, temp_ptr, vocab, num_chunks, stride,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    scaled, _, _ = _scaled_chunk(logits_ptr, temp_ptr, stride, row, chunk, vocab, BLOCK)
    chunk_max = tl.max(scaled, 0)
    part = part_ptr + row * 2 * num_chunks + chunk
    tl.store(part, chunk_max)
    tl.store(part + num_chunks, tl.sum(tl.exp(scaled - chunk_max), 0))


@triton.jit
def _write_kernel(out_ptr, part_ptr, logits_ptr, temp_ptr, vocab, num_chunks, in_stride,
                  out_stride, BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, CHUNKS_PAD)
    part = part_ptr + row * 2 * num_chunks
    maxes = tl.load(part + offs, mask=offs < num_chunks, other=float("-inf"))
    sums = tl.load(part + num_chunks + offs, mask=offs < num_chunks, other=0.0)
    top = tl.max(maxes, 0)
    log_z = top + tl.log(tl.sum(sums * tl.exp(maxes - top), 0))
    scaled, cols, inside = _scaled_chunk(logits_ptr, temp_ptr, in_stride, row, chunk, vocab,
                                         BLOCK)
    tl.store(out_ptr + row * out_stride + cols, scaled - log_z, mask=inside)


def scaled_log_softmax(logits: torch.Tensor, temperature: torch.Tensor,
                       block: int | None = None, out: torch.Tensor | None = None,
                       ) -> torch.Tensor:
    """float32 [R, V]: log_softmax(logits / temperature) per row; logits [R, V] in any
    float dtype, temperature [R] (0 counts as 1); ``block`` overrides the chunk size;
    ``out``: where to write it (float32 [R, V], rows may be strided)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    elif out.shape != (rows, vocab) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError("out: must be a float32 [R, V] tensor with unit column stride")
    if rows == 0:
        return out
    block = block or choose_block(rows, vocab, logits.device)
    num_chunks = triton.cdiv(vocab, block)
    part = torch.empty(rows, 2, num_chunks, dtype=torch.float32, device=logits.device)
    temperature = temperature.float().contiguous()
    warps = 4 if block <= 1024 else 8
    _chunk_stats_kernel[(rows, num_chunks)](part, logits, temperature, vocab, num_chunks,
                                            logits.stride(0), BLOCK=block, num_warps=warps)
    _write_kernel[(rows, num_chunks)](
        out, part, logits, temperature, vocab, num_chunks, logits.stride(0), out.stride(0),
        BLOCK=block, CHUNKS_PAD=max(16, triton.next_power_of_2(num_chunks)), num_warps=warps)
    return out
