"""Triton kernel backend. Importing this package does not compile or decorate
any kernel; that happens when the first TritonOps is built."""
from __future__ import annotations

import importlib.util

import torch

from .ops import TritonOps


def is_available(device: torch.device) -> bool:
    """True when triton imports and the device is a usable CUDA (or ROCm) GPU."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available() \
            or importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as unavailable, not as a crash
        return False
    return True


__all__ = ["TritonOps", "is_available"]
