"""Counter-based per-row uniforms: reproducible whatever shares the batch.

Each sample owns a 64-bit key; its i-th draw is a pure function of (key, i), so
a seeded sample gives the same tokens alone or inside any batch, on any device,
and rows never share noise. The mixer stays inside int64 arithmetic without
overflow (values < 2**32, multipliers < 2**31).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_SCALAR_ROWS = 8


def sample_key(seed: int, sample_index: int) -> int:
    """The 64-bit noise key of sample ``sample_index`` of a request seeded ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def signed64(value: int) -> int:
    """A 64-bit key as the int64 torch stores."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


def row_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in (0, 1) per row, from int64 keys and counters."""
    if keys.device.type == "cpu" and counters.device.type == "cpu":
        # numpy runs the same integer ops bit for bit at a fraction of torch's dispatch cost
        return torch.from_numpy(row_uniforms_np(keys.numpy(), counters.numpy()))
    return _uniforms(keys, counters)


def step_uniforms(keys: torch.Tensor, counters: torch.Tensor, salts: torch.Tensor,
                  fused: bool = False) -> torch.Tensor:
    """float64 [R, S] on the device: row r's draw at step counters[r] * 16 + salts[s]
    (keys [R], counters [R], salts [S] int64). fused: one Triton launch instead of ~30
    elementwise torch kernels, the same bits."""
    if fused:
        from ..kernels.triton.noise import step_uniforms as one_launch
        return one_launch(keys, counters, salts)
    return _uniforms(keys[:, None], counters[:, None] * 16 + salts)


def row_uniforms_np(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """row_uniforms on int64 numpy arrays (the host path of a step)."""
    if keys.ndim == 1 and keys.size <= _SCALAR_ROWS and counters.shape == keys.shape:
        # Python ints beat numpy's per-call cost on a few rows
        return np.array([_uniforms(k, c) for k, c in zip(keys.tolist(), counters.tolist())],
                        dtype=np.float64)
    return np.asarray(_uniforms(keys.astype(np.int64, copy=False),
                                counters.astype(np.int64, copy=False)), dtype=np.float64)


def _uniforms(keys, counters):
    """One body for torch tensors, int64 numpy arrays and Python ints (within int64 range):
    the operators mean the same and no product exceeds 2**63."""
    key_lo, key_hi = keys & _MASK32, (keys >> 32) & _MASK32
    hi = _mix32(key_lo ^ _mix32((counters & _MASK32) ^ key_hi))
    lo = _mix32(hi ^ 0x5BD1E995)
    bits = (hi >> 5) * (1 << 26) + (lo >> 6)  # 53 random bits
    if isinstance(bits, torch.Tensor):
        as_double = bits.double()
    else:
        as_double = bits.astype(np.float64) if isinstance(bits, np.ndarray) else float(bits)
    return (as_double + 0.5) / float(1 << 53)
