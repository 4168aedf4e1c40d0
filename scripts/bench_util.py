"""Small helpers shared by the GPU scripts in this folder."""
from __future__ import annotations

import argparse
import math
import os

import torch


def json_safe(rows: list[dict]) -> list[dict]:
    """NaN -> None, so the rows serialise as strict JSON."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in rows]


def gpu_or_smoke(parser: argparse.ArgumentParser, smoke: bool) -> bool:
    """True on a CUDA machine; without one only --smoke may run, on Triton's CPU
    interpreter (chosen here, before triton is imported)."""
    if torch.cuda.is_available():
        return True
    if not smoke:
        parser.error("no CUDA device: only --smoke runs on CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return False
