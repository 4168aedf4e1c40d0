"""Does prefetching the next weight into L2 (side stream, inside the CUDA graph) speed up a
decode step's chain of projections? Times a layer stack of real projection shapes
(random bf16 weights, F.linear = cuBLAS, a few pointwise kernels between) per variant.
The idea: a batch-1 GEMV pays DRAM latency and ramp-up before it streams its weight
(H100: 4 MB in 5.5 us where 4 MB / 3 TB/s is 1.4 us); a prefetch one matrix ahead could
overlap that with the current kernel. Measured on an H100 (docs/results/l2_prefetch_h100.json):
every variant was slower (batch 1: 839 -> 942 us per 28-layer step with per-line
prefetch, 1,238 us with Hopper's bulk prefetch), so the engine does not prefetch one
matrix ahead. What it does instead (kernels/triton/l2_prefetch.py, README "(c), Qwen3-8B:
o_proj's weight into L2"): at batch 1 only o_proj's first 4 MiB, through the attention
block, where DRAM is idle; this script's kernels stay as they were measured.

  python scripts/bench_l2_prefetch.py            # writes $OUT/l2_prefetch.json if set
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import graph_us  # noqa: E402

CHUNK_BYTES = 16384
LANES = 128  # chunks per program


@triton.jit
def _bulk_prefetch_kernel(base_addr, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    offsets = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    sizes = tl.minimum(n_bytes - offsets, CHUNK)
    sizes = tl.where(sizes > 0, sizes, 0).to(tl.int32) // 16 * 16
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base_addr + offsets, sizes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _line_prefetch_kernel(base_addr, n_bytes, BLOCK: tl.constexpr):
    offsets = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * 128
    live = (offsets < n_bytes).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; "
        "@p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [base_addr + offsets, live], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_l2(tensor: torch.Tensor, max_bytes: int | None = None,
                kind: str = "bulk") -> None:
    """Asks L2 to fetch the first max_bytes (default all) of a contiguous CUDA tensor.
    Only a hint: it changes no value, and nothing waits for it."""
    n_bytes = tensor.numel() * tensor.element_size()
    if max_bytes is not None:
        n_bytes = min(n_bytes, max_bytes)
    if n_bytes <= 0:
        return
    if kind == "bulk":
        grid = (triton.cdiv(n_bytes, CHUNK_BYTES * LANES),)
        _bulk_prefetch_kernel[grid](tensor.data_ptr(), n_bytes, CHUNK=CHUNK_BYTES, BLOCK=LANES,
                                    num_warps=4)
    else:
        grid = (triton.cdiv(n_bytes, 128 * 1024),)
        _line_prefetch_kernel[grid](tensor.data_ptr(), n_bytes, BLOCK=1024, num_warps=8)


SHAPES = {  # hidden, intermediate, q size, kv size, layers
    "qwen3-0.6b": (1024, 3072, 2048, 1024, 28),
    "qwen3-8b": (4096, 12288, 4096, 1024, 36),
}


def make_layers(shape: str):
    hidden, inter, q, kv, n = SHAPES[shape]
    def weight(rows, cols):
        return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
    return [dict(qkv=weight(q + 2 * kv, hidden), o=weight(hidden, q),
                 gate_up=weight(2 * inter, hidden), down=weight(hidden, inter))
            for _ in range(n)], q


def step(x, layers, q, prefetch, side):
    order = [w for layer in layers for w in (layer["qkv"], layer["o"], layer["gate_up"],
                                              layer["down"])]
    main = torch.cuda.current_stream()
    index = 0

    def linear(inp, weight):
        nonlocal index
        if prefetch is not None:
            kind, ahead, cap = prefetch
            if index + ahead < len(order):
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch_l2(order[index + ahead], cap, kind)
        index += 1
        return F.linear(inp, weight)

    for layer in layers:
        attn = linear(x, layer["qkv"])[:, :q].contiguous()
        x = x + linear(attn, layer["o"])
        gate, up = linear(x, layer["gate_up"]).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, layer["down"])
    if prefetch is not None:
        main.wait_stream(side)
    return x


VARIANTS = [
    ("none", None),
    ("bulk next", ("bulk", 1, None)),
    ("bulk next 8MB", ("bulk", 1, 8 << 20)),
    ("bulk next 16MB", ("bulk", 1, 16 << 20)),
    ("bulk +2", ("bulk", 2, None)),
    ("line next", ("line", 1, None)),
    ("line next 16MB", ("line", 1, 16 << 20)),
]


def main() -> None:
    side = torch.cuda.Stream()
    rows = []
    for shape, batches in (("qwen3-0.6b", (1, 8, 64, 256)), ("qwen3-8b", (1, 64))):
        layers, q = make_layers(shape)
        hidden = SHAPES[shape][0]
        for batch in batches:
            x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
            for name, prefetch in VARIANTS:
                if shape == "qwen3-8b" and prefetch and prefetch[2] is None:
                    continue
                us = graph_us(lambda: step(x, layers, q, prefetch, side), 1, True)
                rows.append(dict(shape=shape, batch=batch, variant=name, us_per_step=us,
                                 us_per_layer=us / len(layers)))
                print(f"{shape:10s} b{batch:<4d} {name:16s} {us:9.1f} us "
                      f"{us / len(layers):7.2f} us/layer", flush=True)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            us = graph_us(lambda: step(x, layers, q, None, side), 1, True)
            torch.backends.cuda.preferred_blas_library("cublas")
            rows.append(dict(shape=shape, batch=batch, variant="cublaslt", us_per_step=us,
                             us_per_layer=us / len(layers)))
            print(f"{shape:10s} b{batch:<4d} {'cublaslt':16s} {us:9.1f} us", flush=True)
        layers = None  # frees the weights before the next shape
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), rows=rows)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "l2_prefetch.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
