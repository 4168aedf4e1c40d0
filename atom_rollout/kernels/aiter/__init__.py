"""AITER kernel backend (ROCm). Importing this package never imports aiter:
that happens in is_available and when the first AiterOps is built."""
from __future__ import annotations

import torch

from .ops import AiterOps


def is_available(device: torch.device) -> bool:
    """True when the device is a ROCm GPU and aiter imports."""
    if torch.version.hip is None or torch.device(device).type != "cuda" \
            or not torch.cuda.is_available():
        return False
    try:
        import aiter  # noqa: F401
    except Exception:  # a broken install (or a JIT failure at import) counts as unavailable
        return False
    return True


__all__ = ["AiterOps", "is_available"]
