"""Time TritonOps.prepare_qkv (one launch) against the unfused Triton sequence it replaces.

    python scripts/bench_prepare_qkv.py                            # GPU: Qwen3-0.6B heads
    TRITON_INTERPRET=1 python scripts/bench_prepare_qkv.py --smoke  # tiny shapes, CPU is fine

Per token count (T = 1, 64, 256) and with/without q/k norm, at 16 q heads, 8 kv heads,
head_dim 128, bf16, block_size 16: the largest difference of the fused results (q, k,
both caches) from the unfused Triton ops (rms_norm x2, rotary, write_kv; expected 0) and
from TorchOps, then median microseconds eager (triton.testing.do_bench) and per call
inside a CUDA graph of --repeat back-to-back calls (GPU time without launch overhead,
as the engine's decode graphs run it). Writes JSON to $OUT/prepare_qkv.json (or --out).
Exits 1 when the fused results are not bit-for-bit the unfused ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_rollout.kernels import TorchOps, unfused_prepare_qkv  # noqa: E402
from bench_util import graph_us, gpu_or_smoke, json_safe, median_us, run_guarded  # noqa: E402


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int = 16
    max_positions: int = 8192


QWEN3_06B = Shape(16, 8, 128)
SMOKE = Shape(4, 2, 64, max_positions=64)
TOKENS = (1, 64, 256)
SMOKE_TOKENS = (1, 5)


def make_inputs(shape: Shape, num_tokens: int, norm: bool, dtype: torch.dtype,
                device: torch.device) -> dict:
    """prepare_qkv's arguments: q/k/v views of one qkv projection output, random
    positions and distinct random cache slots, as in a decode or prefill step."""
    h, kvh, d = shape.heads, shape.kv_heads, shape.head_dim
    qkv = torch.randn(num_tokens, (h + 2 * kvh) * d, device=device).to(dtype)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    num_blocks = -(-num_tokens // shape.block_size) * 2 + 1
    inv_freq = 1e6 ** (-torch.arange(0, d, 2, device=device).float() / d)
    angles = torch.arange(shape.max_positions, device=device).float()[:, None] * inv_freq
    cache_shape = (num_blocks, shape.block_size, kvh, d)
    return dict(
        query=q.view(num_tokens, h, d), key=k.view(num_tokens, kvh, d),
        value=v.view(num_tokens, kvh, d),
        q_weight=torch.randn(d, device=device).to(dtype) if norm else None,
        k_weight=torch.randn(d, device=device).to(dtype) if norm else None, eps=1e-6,
        positions=torch.randint(0, shape.max_positions, (num_tokens,), device=device),
        cos_sin=torch.cat((angles.cos(), angles.sin()), dim=-1),
        k_cache=torch.zeros(cache_shape, dtype=dtype, device=device),
        v_cache=torch.zeros(cache_shape, dtype=dtype, device=device),
        slot_mapping=torch.randperm(num_blocks * shape.block_size, device=device)[:num_tokens])


def results(prepare: Callable, inputs: dict) -> list[torch.Tensor]:
    """(q, k, k_cache, v_cache) from prepare run on copies of everything it may write."""
    args = dict(inputs)
    for name in ("query", "key", "k_cache", "v_cache"):
        args[name] = inputs[name].clone()
    return [*prepare(**args), args["k_cache"], args["v_cache"]]


def max_diff(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max((g.float() - e.float()).abs().max().item() if g.numel() else 0.0
               for g, e in zip(got, expected))


def run_case(ops: dict, shape: Shape, num_tokens: int, norm: bool, dtype, repeat: int,
             device: torch.device, on_gpu: bool) -> dict:
    def measure(row: dict) -> None:
        inputs = make_inputs(shape, num_tokens, norm, dtype, device)
        tri = ops["triton"]
        fused = lambda **a: tri.prepare_qkv(**a)  # noqa: E731
        unfused = lambda **a: unfused_prepare_qkv(tri, **a)  # noqa: E731
        fused_out = results(fused, inputs)
        row["diff_unfused"] = max_diff(fused_out, results(unfused, inputs))
        row["diff_torch"] = max_diff(fused_out, results(ops["torch"].prepare_qkv, inputs))
        # Timed calls rotate the same q/k in place again and again; fine for timing.
        for name, prepare in (("fused", fused), ("unfused", unfused)):
            run = lambda prepare=prepare: prepare(**inputs)  # noqa: E731
            row[f"{name}_us"] = median_us(run, on_gpu)
            row[f"{name}_graph_us"] = graph_us(run, repeat, on_gpu)
        row["graph_speedup"] = row["unfused_graph_us"] / row["fused_graph_us"]
        row["ok"] = row["diff_unfused"] == 0.0
    return run_guarded({"tokens": num_tokens, "qk_norm": norm, "dtype": str(dtype)},
                       measure, _format_row)


def _format_row(row: dict) -> str:
    head = f"{row['tokens']:>6} {'yes' if row['qk_norm'] else 'no':<7}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:80]}"
    return (f"{head} {row['diff_unfused']:9.2e} {row['diff_torch']:9.2e} "
            f"{row['fused_us']:9.1f} {row['unfused_us']:9.1f} {row['fused_graph_us']:10.2f} "
            f"{row['unfused_graph_us']:10.2f} {row['graph_speedup']:7.2f}x "
            f"{'ok' if row['ok'] else 'MISMATCH'}")


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n# {title}")
    print(f"{'tokens':>6} {'qk_norm':<7} {'d_unfsd':>9} {'d_torch':>9} {'fused':>9} "
          f"{'unfused':>9} {'fused_grph':>10} {'unfsd_grph':>10} {'speedup':>8} status")
    for row in rows:
        print(_format_row(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                        help="comma-separated token counts (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=50, help="calls per timed CUDA graph")
    parser.add_argument("--out", default=os.environ.get("OUT", "."),
                        help="folder for prepare_qkv.json")
    args = parser.parse_args()
    on_gpu = gpu_or_smoke(parser, args.smoke)
    from atom_rollout.kernels.triton import TritonOps  # after TRITON_INTERPRET is chosen
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    shape = QWEN3_06B if not args.smoke else SMOKE
    tokens = [int(t) for t in args.tokens.split(",")] if not args.smoke else SMOKE_TOKENS
    torch.manual_seed(0)
    ops = {"triton": TritonOps(), "torch": TorchOps()}
    rows = [run_case(ops, shape, t, norm, dtype, args.repeat, device, on_gpu)
            for norm in (True, False) for t in tokens]
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)"
    print_table(rows, f"prepare_qkv fused vs unfused Triton on {device_name}, {shape}, "
                      f"{dtype} (median us; graph = per call in a graph of {args.repeat})")
    out = Path(args.out) / "prepare_qkv.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "dtype": str(dtype), "smoke": args.smoke,
                               "shape": shape.__dict__, "torch": torch.__version__,
                               "rows": json_safe(rows)}, indent=1))
    print(f"wrote {out}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
