"""Time the fused Triton sampling pass against the torch sampler.

    python scripts/gpu_sampling.py                              # GPU: V = 151936
    TRITON_INTERPRET=1 python scripts/gpu_sampling.py --smoke   # tiny shapes, CPU is fine

Two row mixes per batch size: "plain" (T = 1, nothing else) and "mixed"
(greedy, T = 0.7 and min-p rows, one banned token per row, raw logprobs).
Each case reports how many tokens match the torch sampler, the largest
logprob difference on matching rows, and median times: fused eager, fused
replayed from a CUDA graph, torch eager and torch from a graph where it can be
captured. Prints a table; writes JSON to $OUT/sampling.json (or --out).
Exits 1 when a case has more mismatching tokens than a boundary tie explains.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import gpu_or_smoke, graph_us, json_safe, median_us, run_guarded  # noqa: E402

if "--smoke" in sys.argv and not torch.cuda.is_available():
    # before atom_rollout's imports: transformers imports triton, which must already
    # know it runs on the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from atom_rollout.sampler import SamplingTensors, sample  # noqa: E402

VOCAB = 151936
ROWS = (1, 64, 256)
SMOKE_VOCAB = 3000
SMOKE_ROWS = (1, 4)


def make_inputs(rows: int, vocab: int, mix: str, dtype: torch.dtype, device: torch.device):
    """(fused_sample args, fused kwargs, SamplingTensors) for one case."""
    logits = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    uniforms = torch.rand(rows, dtype=torch.float64, device=device).clamp(1e-12, 1 - 1e-12)
    if mix == "plain":
        temp = torch.ones(rows, device=device)
        min_p = torch.zeros(rows, device=device)
        banned, need_raw = None, False
    else:
        temp = torch.tensor([(1.0, 0.7, 0.0)[r % 3] for r in range(rows)], device=device)
        min_p = torch.tensor([(0.0, 0.05)[r % 2] for r in range(rows)], device=device)
        banned = torch.stack([torch.arange(rows, device=device),
                              torch.full((rows,), vocab - 1, device=device)])
        need_raw = True
    greedy = temp == 0
    use_min_p = bool(((min_p > 0) & ~greedy).any())
    st = SamplingTensors(
        temperature=temp, top_k=torch.zeros(rows, dtype=torch.int64, device=device),
        top_p=torch.ones(rows, device=device), min_p=min_p, uniforms=uniforms, banned=banned,
        use_sort=False, use_min_p=use_min_p, num_top_logprobs=0,
        all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()),
        need_raw=need_raw or bool(greedy.any()))
    return (logits, temp, min_p, uniforms, banned, need_raw), {"use_min_p": use_min_p}, st


def graph_time(fn: Callable, on_gpu: bool) -> float:
    """Median microseconds of replaying fn from a CUDA graph; nan when it can't be captured."""
    if not on_gpu:
        return math.nan
    try:
        return graph_us(fn, 1, on_gpu)
    except Exception as exc:  # the torch sampler builds a host tensor mid-capture
        print(f"  (no CUDA graph: {type(exc).__name__}: {str(exc)[:80]})", flush=True)
        torch.cuda.synchronize()
        return math.nan


def compare(fused, args, kwargs, st) -> tuple[int, float]:
    """(rows whose tokens differ from the torch sampler, max logprob error on the rest)."""
    tokens, logprobs, raw = fused(*args, **kwargs)
    ref = sample(args[0], st)
    same = tokens == ref.token_ids
    errors = [(logprobs - ref.logprobs)[same].abs().max().item() if same.any() else 0.0]
    if raw is not None:
        errors.append((raw - ref.raw_logprobs)[same].abs().max().item() if same.any() else 0.0)
    return int((~same).sum()), max(errors)


def run_case(fused, rows: int, vocab: int, mix: str, dtype, device, on_gpu: bool) -> dict:
    def measure(row: dict) -> None:
        args, kwargs, st = make_inputs(rows, vocab, mix, dtype, device)
        row["mismatches"], row["max_logprob_err"] = compare(fused, args, kwargs, st)
        run_fused = lambda: fused(*args, **kwargs)  # noqa: E731
        run_torch = lambda: sample(args[0], st)  # noqa: E731
        row["fused_us"] = median_us(run_fused, on_gpu)
        row["fused_graph_us"] = graph_time(run_fused, on_gpu)
        row["torch_us"] = median_us(run_torch, on_gpu)
        row["torch_graph_us"] = graph_time(run_torch, on_gpu)
        row["speedup"] = row["torch_us"] / row["fused_us"]
        logit_bytes = rows * vocab * torch.empty(0, dtype=dtype).element_size()
        row["fused_graph_gbps"] = logit_bytes / row["fused_graph_us"] / 1e3
        row["ok"] = row["mismatches"] <= max(1, rows // 50) and row["max_logprob_err"] < 1e-4
    return run_guarded({"rows": rows, "vocab": vocab, "mix": mix, "dtype": str(dtype)},
                       measure, _format_row)


def _format_row(row: dict) -> str:
    head = f"{row['rows']:>5} {row['vocab']:>7} {row['mix']:<6}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:80]}"
    return (f"{head} {row['mismatches']:>5} {row['max_logprob_err']:9.2e} "
            f"{row['fused_us']:10.1f} {row['fused_graph_us']:10.1f} {row['torch_us']:10.1f} "
            f"{row['torch_graph_us']:10.1f} {row['speedup']:7.1f}x "
            f"{row['fused_graph_gbps']:8.1f} {'ok' if row['ok'] else 'MISMATCH'}")


def print_table(rows: list[dict], device_name: str) -> None:
    print(f"\n# fused_sample vs atom_rollout.sampler.sample on {device_name} (median us; "
          "GB/s = logits bytes / fused graph time)")
    print(f"{'rows':>5} {'vocab':>7} {'mix':<6} {'diff':>5} {'lp_err':>9} {'fused':>10} "
          f"{'fused_grph':>10} {'torch':>10} {'torch_grph':>10} {'speedup':>8} {'GB/s':>8} status")
    for row in rows:
        print(_format_row(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="logits dtype (the engine samples from model-dtype logits, bf16 "
                             "on GPU; the README's numbers are float32)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."),
                        help="folder for sampling.json")
    args = parser.parse_args()
    on_gpu = gpu_or_smoke(parser, args.smoke)
    from atom_rollout.kernels.triton.sampling import fused_sample  # after TRITON_INTERPRET
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    vocab, batch_sizes = (SMOKE_VOCAB, SMOKE_ROWS) if args.smoke else (VOCAB, ROWS)
    torch.manual_seed(0)
    rows = [run_case(fused_sample, r, vocab, mix, dtype, device, on_gpu)
            for r in batch_sizes for mix in ("plain", "mixed")]
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)"
    print_table(rows, device_name)
    out = Path(args.out) / "sampling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "dtype": str(dtype), "smoke": args.smoke,
                               "torch": torch.__version__, "rows": json_safe(rows)}, indent=1))
    print(f"wrote {out}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
