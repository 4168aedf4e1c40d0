"""Qwen3-8B's batch-1 projections: cuBLAS against streaming Triton GEMV variants.

    python scripts/bench_gemv_8b.py [--quick]

For each projection of a Qwen3-8B layer (qkv 4096 -> 6144, o 4096 -> 4096, gate_up
4096 -> 24576, down 12288 -> 4096 with SiLU-and-mul) a CUDA graph holds 36 of them with
distinct weights, each after the kernel that precedes it in the model (RMSNorm before
qkv and gate_up; o and down end in the residual add + RMSNorm that reduces their K
splits), so weights stream from DRAM and kernel boundaries are the model's. Variants:
cuBLAS (the unfused path), our split-K kernel (kernels/triton/split_k_linear.py) over a
grid of tiles, and experimental loops: software-pipelined (``tl.range(num_stages=)``),
weights loaded with evict_first, and TMA tiles (host tensor descriptors). Prints us per
call and the weight stream's share of copy bandwidth measured in the run; JSON to
$OUT/gemv_8b.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_rollout.kernels.interface import unfused_linear_add_rms_norm  # noqa: E402
from atom_rollout.kernels.triton import TritonOps, pointwise, split_k_linear  # noqa: E402
from atom_rollout.kernels.triton.pdl import release_dependents, wait_for_inputs  # noqa: E402
from bench_util import graph_us  # noqa: E402

LAYERS = 36
HIDDEN = 4096
STAGES = {  # name: (n_out, k, gated, reduced by the norm after it)
    "qkv_proj": (6144, 4096, False, False),
    "o_proj": (4096, 4096, False, True),
    "gate_up_proj": (24576, 4096, False, False),
    "down_proj": (4096, 12288, True, True),
    "lm_head": (151936, 4096, False, False),
}
CHAIN = {"lm_head": 3}  # copies in the graph where not LAYERS (1.2 GB each)


@triton.jit
def _x_tile(x_ptr, cols, K, GATED: tl.constexpr):
    x = tl.load(x_ptr + cols)
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + K + cols).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
        x = (act.to(tl.float32) * up).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _stream_kernel(part_ptr, x_ptr, w_ptr, N, K, k_per_split, stride_w,
                   GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   NUM_STAGES: tl.constexpr, EVICT: tl.constexpr, PDL: tl.constexpr):
    """One row, no masks (N % BLOCK_N == 0, k_per_split % BLOCK_K == 0)."""
    tile, split = tl.program_id(0), tl.program_id(1)
    n_idx = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + n_idx.to(tl.int64)[:, None] * stride_w
    k_start = split * k_per_split
    cols = k_start + tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + cols[None, :], eviction_policy=EVICT)
    release_dependents(PDL)
    wait_for_inputs(PDL)
    acc = tl.sum(w.to(tl.float32) * _x_tile(x_ptr, cols, K, GATED)[None, :], 1)
    for k0 in tl.range(k_start + BLOCK_K, k_start + k_per_split, BLOCK_K,
                       num_stages=NUM_STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], eviction_policy=EVICT)
        acc += tl.sum(w.to(tl.float32) * _x_tile(x_ptr, cols, K, GATED)[None, :], 1)
    tl.store(part_ptr + split * N + n_idx, acc.to(part_ptr.dtype.element_ty))


@triton.jit
def _tma_kernel(part_ptr, x_ptr, w_desc, N, K, k_per_split,
                GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    tile, split = tl.program_id(0), tl.program_id(1)
    n0 = tile * BLOCK_N
    k_start = split * k_per_split
    release_dependents(PDL)
    wait_for_inputs(PDL)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        w = w_desc.load([n0, k0])
        cols = k0 + tl.arange(0, BLOCK_K)
        acc += tl.sum(w.to(tl.float32) * _x_tile(x_ptr, cols, K, GATED)[None, :], 1)
    tl.store(part_ptr + split * N + n0 + tl.arange(0, BLOCK_N),
             acc.to(part_ptr.dtype.element_ty))


def stream_linear(x, weight, *, gated, block_n, block_k, splits, warps, stages=1, evict="",
                  tma=False, out_dtype=torch.float32, pdl=True):
    n_out, k = weight.shape
    k_per_split = k // splits
    assert n_out % block_n == 0 and k_per_split % block_k == 0
    partials = torch.empty((splits, 1, n_out), dtype=out_dtype, device=x.device)
    grid = (n_out // block_n, splits)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
        _tma_kernel[grid](partials, x, desc, n_out, k, k_per_split, GATED=gated,
                          BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages, PDL=pdl,
                          num_warps=warps, launch_pdl=pdl)
    else:
        _stream_kernel[grid](partials, x, weight, n_out, k, k_per_split, weight.stride(0),
                             GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k,
                             NUM_STAGES=stages, EVICT=evict, PDL=pdl, num_warps=warps,
                             launch_pdl=pdl)
    return partials


def stage_inputs(stage: str) -> dict:
    n_out, k, gated, reduced = STAGES[stage]
    new = dict(device="cuda", dtype=torch.bfloat16)
    return dict(stage=stage, gated=gated, reduced=reduced,
                x=torch.randn(1, 2 * k if gated else k, **new),
                hidden=torch.randn(1, HIDDEN, **new),
                weights=[torch.randn(n_out, k, **new) * k ** -0.5
                         for _ in range(CHAIN.get(stage, LAYERS))],
                residual=torch.randn(1, HIDDEN, **new),
                norm_weight=torch.randn(HIDDEN, **new))


def cublas_link(ops, inputs: dict, weight) -> None:
    if inputs["reduced"]:
        unfused_linear_add_rms_norm(ops, inputs["x"], weight, inputs["residual"],
                                    inputs["norm_weight"], 1e-6, inputs["gated"])
        return
    normed = pointwise.rms_norm(inputs["hidden"], inputs["norm_weight"], 1e-6)
    torch.nn.functional.linear(normed, weight)


def ours_link(project, inputs: dict, weight, pdl: bool) -> None:
    """project(x, weight) -> partials; the model's kernel before or after it around it."""
    if inputs["reduced"]:
        partials = project(inputs["x"], weight)
        pointwise.rms_norm_of_partials(partials, torch.bfloat16, inputs["norm_weight"], 1e-6,
                                       inputs["residual"], pdl=pdl)
        return
    pointwise.rms_norm(inputs["hidden"], inputs["norm_weight"], 1e-6, pdl=pdl)
    project(inputs["x"], weight)


def chain_us(inputs: dict, link) -> float:
    weights = inputs["weights"]
    return graph_us(lambda: [link(inputs, w) for w in weights], 1, True) / len(weights)


def variants(stage: str, sms: int, quick: bool):
    """name -> project(x, weight) for the grid of this stage."""
    n_out, k, gated, reduced = STAGES[stage]
    out = {}
    out["shipped_split_k"] = partial(split_k_linear.split_k_partials, gated=gated,
                                     multiprocessors=sms, pdl=True)
    per_sm = (1, 2, 4) if reduced else (0,)
    grid = itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), per_sm)
    if quick:
        grid = [(16, 512, 4, p) for p in per_sm]
    for block_n, block_k, warps, programs in grid:
        splits = split_k_linear.config_for(n_out, k, programs * sms, block_n, block_k,
                                           warps).splits if programs else 1
        base = dict(gated=gated, block_n=block_n, block_k=block_k, splits=splits,
                    warps=warps, out_dtype=torch.float32 if reduced else torch.bfloat16)
        tag = f"n{block_n}k{block_k}w{warps}s{splits}"
        out[tag] = partial(stream_linear, **base)
    return out


def refine(stage: str, best: list[str], table: dict) -> dict:
    """Pipelined / evict_first variants of the best plain configs, and TMA tiles."""
    n_out, k, gated, reduced = STAGES[stage]
    out = {}
    for tag in best:
        base = dict(table[tag].keywords)
        for stages, evict in ((3, ""), (1, "evict_first"), (3, "evict_first")):
            out[f"{tag}/st{stages}{'/ef' if evict else ''}"] = partial(
                stream_linear, **{**base, "stages": stages, "evict": evict})
        out[f"{tag}/nopdl"] = partial(stream_linear, **{**base, "pdl": False})
    splits = table[best[0]].keywords["splits"]
    for block_n, block_k, stages in itertools.product((16, 32, 64), (128, 256), (3, 4)):
        if (k // splits) % block_k:
            continue
        out[f"tma/n{block_n}k{block_k}st{stages}s{splits}"] = partial(
            stream_linear, gated=gated, block_n=block_n, block_k=block_k, splits=splits,
            warps=4, stages=stages, tma=True,
            out_dtype=torch.float32 if reduced else torch.bfloat16)
    return out


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), 4, True)
    return 2 * src.numel() / us / 1e3  # GB/s


def check(project, inputs: dict) -> float:
    """max |ours - reference| over the first weight (partials summed)."""
    x = inputs["x"]
    if inputs["gated"]:
        half = x.shape[1] // 2
        gate = x[:, :half].float()
        x = ((torch.nn.functional.silu(gate).to(x.dtype).float() * x[:, half:].float())
             .to(x.dtype))
    ref = x.float() @ inputs["weights"][0].float().T
    got = project(inputs["x"], inputs["weights"][0]).float().sum(0)
    return (got - ref).abs().max().item()


def time_stage(stage: str, sms: int, bandwidth: float, quick: bool) -> dict:
    inputs = stage_inputs(stage)
    weight_mb = inputs["weights"][0].numel() * 2 / 1e6
    ops = TritonOps()
    rows = {"cublas": chain_us(inputs, partial(cublas_link, ops))}
    table = variants(stage, sms, quick)
    for round_ in (1, 2):
        for tag, project in table.items():
            try:
                err = check(project, inputs)
                pdl = project.keywords.get("pdl", True)
                rows[tag] = chain_us(inputs, lambda i, w, p=project, d=pdl: ours_link(p, i, w, d))
                if err > 0.05:
                    rows[tag + "!err"] = err
            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                print(f"{stage} {tag}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        if round_ == 1:
            plain = sorted((t for t in table if t in rows and t != "shipped_split_k"),
                           key=rows.get)[:3]
            table = refine(stage, plain, table)
    floor_us = weight_mb / bandwidth * 1e3
    best = min((t for t in rows if not t.endswith("err")), key=rows.get)
    print(f"{stage:12s} {weight_mb:6.1f} MB floor {floor_us:6.1f} us | cuBLAS "
          f"{rows['cublas']:6.1f} | shipped {rows.get('shipped_split_k', float('nan')):6.1f} "
          f"| best {best} {rows[best]:6.1f}", flush=True)
    del inputs
    torch.cuda.empty_cache()
    return {"stage": stage, "weight_mb": weight_mb, "floor_us": floor_us, "us": rows,
            "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bandwidth = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "copy_gb_s": bandwidth, "stages": []}
    print(f"{report['device']}: copy {bandwidth:.0f} GB/s", flush=True)
    path = os.path.join(os.environ.get("OUT", "."), "gemv_8b.json")
    for stage in args.stages.split(","):
        report["stages"].append(time_stage(stage, sms, bandwidth, args.quick))
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    for row in report["stages"]:
        top = sorted(row["us"].items(), key=lambda kv: kv[1])[:5]
        print(row["stage"], f"floor {row['floor_us']:.1f}", f"cublas {row['us']['cublas']:.1f}",
              " ".join(f"{t}={v:.1f}" for t, v in top))


if __name__ == "__main__":
    main()
