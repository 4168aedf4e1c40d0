"""Does prefetching the next weight into L2 (side stream, inside the CUDA graph) speed up a
decode step's chain of projections? Times a layer stack of real projection shapes
(random bf16 weights, F.linear = cuBLAS, a few pointwise kernels between) per variant.

  python scripts/bench_l2_prefetch.py            # writes $OUT/l2_prefetch.json if set
"""
from __future__ import annotations

import json
import os
import statistics

import torch
import torch.nn.functional as F

from atom_rollout.kernels.triton.prefetch import prefetch_l2

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


def time_graph(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(30):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


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
                us = time_graph(lambda: step(x, layers, q, prefetch, side))
                rows.append(dict(shape=shape, batch=batch, variant=name, us_per_step=us,
                                 us_per_layer=us / len(layers)))
                print(f"{shape:10s} b{batch:<4d} {name:16s} {us:9.1f} us "
                      f"{us / len(layers):7.2f} us/layer", flush=True)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            us = time_graph(lambda: step(x, layers, q, None, side))
            torch.backends.cuda.preferred_blas_library("cublas")
            rows.append(dict(shape=shape, batch=batch, variant="cublaslt", us_per_step=us,
                             us_per_layer=us / len(layers)))
            print(f"{shape:10s} b{batch:<4d} {'cublaslt':16s} {us:9.1f} us", flush=True)
        del layers
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), rows=rows)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "l2_prefetch.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
