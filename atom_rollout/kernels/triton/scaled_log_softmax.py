"""log_softmax(logits / T) per row in one launch: the processed distribution of rows
without top-k, top-p or min-p, as speculative verification and drafting need it whole.

The torch path takes three passes and a float32 copy (upcast, a broadcast division that
does not vectorise, the log-softmax); here one program per row reads the logits in their
own dtype twice (an online max and sum, then the write) and writes float32 once.
Temperature 0 counts as 1, as in sampler.processing.processed_logprobs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _scaled_log_softmax_kernel(out_ptr, logits_ptr, temp_ptr, vocab, in_stride, out_stride,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temp_ptr + row)
    inv_t = 1.0 / tl.where(temperature > 0, temperature, 1.0)
    source = logits_ptr + row.to(tl.int64) * in_stride
    cols = tl.arange(0, BLOCK)
    row_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, vocab, BLOCK):  # per lane: running max and sum of exp
        x = tl.load(source + start + cols, mask=start + cols < vocab,
                    other=float("-inf")).to(tl.float32) * inv_t
        new_max = tl.maximum(row_max, x)
        row_sum = row_sum * tl.exp(tl.where(new_max == float("-inf"), 0.0, row_max - new_max)) \
            + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        row_max = new_max
    top = tl.max(row_max, axis=0)
    total = tl.sum(row_sum * tl.exp(tl.where(row_max == float("-inf"), 0.0, row_max - top)),
                   axis=0)
    log_z = top + tl.log(total)
    target = out_ptr + row.to(tl.int64) * out_stride
    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        x = tl.load(source + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        tl.store(target + start + cols, x - log_z, mask=mask)


def scaled_log_softmax(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """float32 [R, V]: log_softmax(logits / temperature) per row; logits [R, V] in any
    float dtype, temperature [R] (0 counts as 1)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    if rows:
        _scaled_log_softmax_kernel[(rows,)](
            out, logits, temperature.float().contiguous(), vocab, logits.stride(0),
            out.stride(0), BLOCK=BLOCK, num_warps=8)
    return out
