"""sampler.noise's counter-based uniforms in one launch: the torch body is ~30 tiny
elementwise kernels (three integer mixers), which inside a speculative step's graph cost
more than the math. Same int64 operations, so the same bits."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MASK32 = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


@triton.jit
def _step_uniforms_kernel(out_ptr, key_ptr, counter_ptr, salt_ptr, num, num_salts,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < num
    row = offs // num_salts
    key = tl.load(key_ptr + row, mask=inside, other=0)
    step = tl.load(counter_ptr + row, mask=inside, other=0) * 16 + \
        tl.load(salt_ptr + offs % num_salts, mask=inside, other=0)
    key_lo = key & _MASK32
    key_hi = (key >> 32) & _MASK32
    hi = _mix32(key_lo ^ _mix32((step & _MASK32) ^ key_hi))
    lo = _mix32(hi ^ 0x5BD1E995)
    bits = (hi >> 5) * (1 << 26) + (lo >> 6)  # 53 random bits
    uniform = (bits.to(tl.float64) + 0.5) / 9007199254740992.0  # 2 ** 53
    tl.store(out_ptr + offs, uniform, mask=inside)


def step_uniforms(keys: torch.Tensor, counters: torch.Tensor,
                  salts: torch.Tensor) -> torch.Tensor:
    """float64 [R, S]: row r's uniform at step counters[r] * 16 + salts[s] for its int64
    key keys[r] (sampler.noise.row_uniforms of those steps)."""
    rows, num_salts = keys.shape[0], salts.shape[0]
    out = torch.empty(rows, num_salts, dtype=torch.float64, device=keys.device)
    num = rows * num_salts
    if num:
        block = 256
        _step_uniforms_kernel[(triton.cdiv(num, block),)](
            out, keys.contiguous(), counters.contiguous(), salts.contiguous(), num,
            num_salts, BLOCK=block)
    return out
