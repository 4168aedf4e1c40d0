"""Small-batch projections: the fused Triton skinny linear (norm / SiLU prologue in
the same launch) against the sequence it replaces (Triton rms_norm or silu_and_mul,
then cuBLAS through F.linear), per projection of Qwen3-0.6B and Qwen3-8B.

    python scripts/bench_skinny_linear.py               # GPU: sweeps tile configs
    python scripts/bench_skinny_linear.py --smoke       # tiny shapes on CPU (interpreter)

Times are per call inside a CUDA graph that cycles through enough weight copies to
defeat the L2 cache (as 28-36 layers do). Prints the best config per shape and row
count with its effective weight bandwidth; writes $OUT/skinny_linear.json (or --out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import graph_us, gpu_or_smoke, json_safe, run_guarded  # noqa: E402

# (model, projection, N, K, prologue)
SHAPES = [("0.6b", "qkv", 4096, 1024, "norm"), ("0.6b", "o", 1024, 2048, "plain"),
          ("0.6b", "gate_up", 6144, 1024, "norm"), ("0.6b", "down", 1024, 3072, "silu"),
          ("0.6b", "lm_head", 151936, 1024, "plain"),
          ("8b", "qkv", 6144, 4096, "norm"), ("8b", "o", 4096, 4096, "plain"),
          ("8b", "gate_up", 24576, 4096, "norm"), ("8b", "down", 4096, 12288, "silu"),
          ("8b", "lm_head", 151936, 4096, "plain")]
SMOKE_SHAPES = [("tiny", "qkv", 48, 64, "norm"), ("tiny", "down", 32, 64, "silu"),
                ("tiny", "o", 40, 32, "plain")]
ROWS = (1, 4, 8)
L2_DEFEAT_BYTES = 256 << 20


def configs(smoke: bool):
    from atom_rollout.kernels.triton.skinny_linear import SkinnyConfig
    if smoke:
        return [SkinnyConfig(16, 32, 4, 2)]
    return [SkinnyConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product(
        (16, 32, 64), (128, 256), (4, 8), (3, 4))]


def make_case(n: int, k: int, prologue: str, rows: int, copies: int, device) -> dict:
    k_in = 2 * k if prologue == "silu" else k
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    return dict(x=torch.randn(rows, k_in, device=device).to(dtype),
                residual=torch.randn(rows, k, device=device).to(dtype),
                norm_weight=(1 + 0.1 * torch.randn(k, device=device)).to(dtype),
                weights=[(torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
                         for _ in range(copies)])


def reference(ops, case: dict, weight: torch.Tensor, prologue: str) -> torch.Tensor:
    if prologue == "norm":
        return F.linear(ops.rms_norm(case["x"], case["norm_weight"], 1e-6, case["residual"])[0],
                        weight)
    if prologue == "silu":
        return F.linear(ops.silu_and_mul(case["x"]), weight)
    return F.linear(case["x"], weight)


def fused(sl, case: dict, weight: torch.Tensor, prologue: str, config) -> torch.Tensor:
    code = {"norm": sl.NORM, "silu": sl.SILU, "plain": sl.PLAIN}[prologue]
    out = sl.skinny_linear(case["x"], weight, prologue=code,
                           residual=case["residual"] if prologue == "norm" else None,
                           norm_weight=case["norm_weight"], eps=1e-6, config=config)
    return out[0] if prologue == "norm" else out


def cycling(fn, weights: list[torch.Tensor]):
    order = itertools.cycle(weights)
    return lambda: fn(next(order))


def run_case(shape, rows: int, smoke: bool, on_gpu: bool, device) -> dict:
    from atom_rollout.kernels.triton import TritonOps, skinny_linear as sl
    model, name, n, k, prologue = shape
    ops = TritonOps()

    def measure(row: dict) -> None:
        copies = max(2, min(64, -(-L2_DEFEAT_BYTES // (n * k * 2))))
        case = make_case(n, k, prologue, rows, copies, device)
        weight = case["weights"][0]
        expected = reference(ops, case, weight, prologue).float()
        row["ref_us"] = graph_us(cycling(lambda w: reference(ops, case, w, prologue),
                                         case["weights"]), copies, on_gpu)
        best = None
        for config in configs(smoke):
            got = fused(sl, case, weight, prologue, config).float()
            diff = (got - expected).abs().max().item() / max(1e-6, expected.abs().max().item())
            us = graph_us(cycling(lambda w, c=config: fused(sl, case, w, prologue, c),
                                  case["weights"]), copies, on_gpu)
            if best is None or us < best[0]:
                best = (us, config, diff)
        row["fused_us"], config, row["rel_diff"] = best
        row["config"] = config.__dict__
        row["weight_MB"] = n * k * 2 / 1e6
        row["ref_GBps"] = n * k * 2 / row["ref_us"] / 1e3
        row["fused_GBps"] = n * k * 2 / row["fused_us"] / 1e3
        row["speedup"] = row["ref_us"] / row["fused_us"]
        row["ok"] = row["rel_diff"] < 2e-2
    return run_guarded({"model": model, "proj": name, "N": n, "K": k, "prologue": prologue,
                        "rows": rows}, measure, _format_row)


def _format_row(row: dict) -> str:
    head = f"{row['model']:>5} {row['proj']:<8} {row['rows']:>4}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:90]}"
    c = row["config"]
    return (f"{head} {row['ref_us']:9.2f} {row['fused_us']:9.2f} {row['speedup']:6.2f}x "
            f"{row['ref_GBps']:8.0f} {row['fused_GBps']:8.0f} {row['rel_diff']:9.1e} "
            f"{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    on_gpu = gpu_or_smoke(parser, args.smoke)
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows = [run_case(shape, m, args.smoke, on_gpu, device) for shape in shapes for m in ROWS]
    name = torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)"
    print(f"\n# skinny linear (fused prologue) vs prologue kernel + F.linear on {name}; "
          "us per call in a CUDA graph, weight GB/s")
    print(f"{'model':>5} {'proj':<8} {'rows':>4} {'ref_us':>9} {'fused_us':>9} {'speed':>7} "
          f"{'ref_GBs':>8} {'fus_GBs':>8} {'rel_diff':>9} config")
    for row in rows:
        print(_format_row(row))
    out = Path(args.out) / "skinny_linear.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "rows": json_safe(rows)}, indent=1))
    return 0 if all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
