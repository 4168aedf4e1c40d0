"""Programmatic dependent launch (PDL, Hopper and newer) for the decode chain.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it still
runs: it does what needs no input of that kernel (a projection loads its first weight
tile), then ``wait_for_inputs`` blocks until the previous kernel has finished and its
writes are visible. ``release_dependents`` lets the next kernel start. Every PDL kernel
waits before it writes anything or reads another kernel's output, so completion stays
ordered along the stream (each kernel finishes only after the one before it has).
Before waiting a kernel may read what no PDL kernel writes (weights, the step's metadata:
written before the chain's first kernel started), so those loads overlap the kernel
before. Asking L2 for the lines it reads after the wait (prefetch.global.L2 per 128-byte
line, weights past a projection's first tile, a decode tile's K/V) made Qwen3-0.6B's
batch-1 graph slower (961 -> 982 us, H100, scripts/ab_latency.py), so none do (the one
prefetch that pays, of o_proj's weight from a side stream, is l2_prefetch.py's).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
