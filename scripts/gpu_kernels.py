"""Check every TritonOps op against TorchOps at realistic shapes and time both.

    python scripts/gpu_kernels.py                 # H100/H200: Qwen3-0.6B and Qwen3-8B shapes
    TRITON_INTERPRET=1 python scripts/gpu_kernels.py --smoke   # tiny shapes, CPU is fine

Prints one line per case as it goes and a table last; writes JSON to
$OUT/kernels.json (or --out). Exits 1 when any case mismatches or fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_rollout.kernels import AttentionMetadata, TorchOps  # noqa: E402
from bench_util import gpu_or_smoke, json_safe, median_us, run_guarded  # noqa: E402


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int


MODELS = [Model("qwen3-0.6b", 16, 8, 128, 1024, 3072), Model("qwen3-8b", 32, 8, 128, 4096, 12288)]
SMOKE_MODELS = [Model("tiny", 4, 2, 64, 128, 192)]
BLOCK_SIZE = 16
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}  # atol = rtol


@dataclass
class Case:
    op: str
    model: str
    shape: str
    # returns (run_triton, run_torch, compare, bytes_moved); compare() -> (max_abs_err, ok)
    build: Callable[[], tuple[Callable, Callable, Callable[[], float], int]]


def make_meta(query_lens: list[int], context_lens: list[int], device: torch.device):
    """Sequences on disjoint, shuffled blocks; returns (meta, num_blocks)."""
    per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(per_seq) + 1
    pool = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.full((len(context_lens), max(per_seq)), -1, dtype=torch.int32, device=device)
    slots, used = [], 0
    for b, (q_len, ctx, n) in enumerate(zip(query_lens, context_lens, per_seq)):
        tables[b, :n] = pool[used:used + n]
        used += n
        pos = torch.arange(ctx - q_len, ctx, device=device)
        slots.append(tables[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    starts = torch.tensor([0] + query_lens, device=device).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(torch.cat(slots), starts,
                             torch.tensor(context_lens, dtype=torch.int32, device=device),
                             tables, max(query_lens), max(context_lens))
    return meta, num_blocks


def max_err(got, expected) -> tuple[float, bool]:
    """Largest absolute error and whether every pair is close at the dtype's tolerance."""
    errors, close = [0.0], True
    for g, e in zip(got, expected):
        tol = TOL[e.dtype]
        errors.append((g.float() - e.float()).abs().max().item() if g.numel() else 0.0)
        close = close and torch.allclose(g.float(), e.float(), atol=tol, rtol=tol)
    return max(errors), close


def attention_case(ops, m: Model, query_lens, context_lens, dtype, device) -> Case:
    def build():
        meta, num_blocks = make_meta(query_lens, context_lens, device)
        shape = (num_blocks, BLOCK_SIZE, m.kv_heads, m.head_dim)
        k_cache = torch.randn(shape, dtype=dtype, device=device)
        v_cache = torch.randn(shape, dtype=dtype, device=device)
        query = torch.randn(sum(query_lens), m.heads, m.head_dim, dtype=dtype, device=device)
        args = (query, k_cache, v_cache, meta, m.head_dim ** -0.5)
        run_tri = lambda: ops["triton"].attention(*args)  # noqa: E731
        run_ref = lambda: ops["torch"].attention(*args)  # noqa: E731
        compare = lambda: max_err([run_tri()], [run_ref()])  # noqa: E731
        kv_bytes = 2 * sum(context_lens) * m.kv_heads * m.head_dim * k_cache.element_size()
        return run_tri, run_ref, compare, kv_bytes + 2 * query.numel() * query.element_size()
    b, t = len(query_lens), sum(query_lens)
    return Case("attention", m.name, f"B={b} T={t} q<={max(query_lens)} ctx<={max(context_lens)}",
                build)


def write_kv_case(ops, m: Model, num_tokens: int, dtype, device) -> Case:
    def build():
        meta, num_blocks = make_meta([num_tokens], [num_tokens], device)
        shape = (num_blocks, BLOCK_SIZE, m.kv_heads, m.head_dim)
        caches = {name: (torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(shape, dtype=dtype, device=device)) for name in ops}
        key, value = (torch.randn(num_tokens, m.kv_heads, m.head_dim, dtype=dtype,
                                  device=device) for _ in range(2))
        runs = {name: (lambda name=name: ops[name].write_kv(key, value, *caches[name],
                                                             meta.slot_mapping)) for name in ops}

        def compare():
            runs["triton"]()
            runs["torch"]()
            return max_err(caches["triton"], caches["torch"])
        return runs["triton"], runs["torch"], compare, 4 * key.numel() * key.element_size()
    return Case("write_kv", m.name, f"T={num_tokens}", build)


def rms_norm_case(ops, m: Model, num_tokens: int, residual: bool, dtype, device) -> Case:
    def build():
        x = torch.randn(num_tokens, m.hidden, dtype=dtype, device=device)
        res = torch.randn_like(x) if residual else None
        weight = torch.randn(m.hidden, dtype=dtype, device=device)
        run_tri = lambda: ops["triton"].rms_norm(x, weight, 1e-6, res)  # noqa: E731
        run_ref = lambda: ops["torch"].rms_norm(x, weight, 1e-6, res)  # noqa: E731

        def compare():
            got, expected = run_tri(), run_ref()
            return max_err(*((got, expected) if residual else ([got], [expected])))
        return run_tri, run_ref, compare, (4 if residual else 2) * x.numel() * x.element_size()
    return Case("rms_norm" + ("+residual" if residual else ""), m.name,
                f"T={num_tokens} hidden={m.hidden}", build)


def rotary_case(ops, m: Model, num_tokens: int, dtype, device) -> Case:
    def build():
        max_pos = 8192
        inv_freq = 1e6 ** (-torch.arange(0, m.head_dim, 2, device=device).float() / m.head_dim)
        angles = torch.arange(max_pos, device=device).float()[:, None] * inv_freq
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
        positions = torch.randint(0, max_pos, (num_tokens,), device=device)
        q = torch.randn(num_tokens, m.heads, m.head_dim, dtype=dtype, device=device)
        k = torch.randn(num_tokens, m.kv_heads, m.head_dim, dtype=dtype, device=device)
        run_tri = lambda: ops["triton"].rotary(q, k, positions, cos_sin)  # noqa: E731
        run_ref = lambda: ops["torch"].rotary(q, k, positions, cos_sin)  # noqa: E731

        def compare():  # the triton op rotates in place, so it gets copies
            expected = run_ref()
            return max_err(ops["triton"].rotary(q.clone(), k.clone(), positions, cos_sin),
                           expected)
        return run_tri, run_ref, compare, 2 * (q.numel() + k.numel()) * q.element_size()
    return Case("rotary", m.name, f"T={num_tokens}", build)


def silu_case(ops, m: Model, num_tokens: int, dtype, device) -> Case:
    def build():
        x = torch.randn(num_tokens, 2 * m.intermediate, dtype=dtype, device=device)
        run_tri = lambda: ops["triton"].silu_and_mul(x)  # noqa: E731
        run_ref = lambda: ops["torch"].silu_and_mul(x)  # noqa: E731
        compare = lambda: max_err([run_tri()], [run_ref()])  # noqa: E731
        return run_tri, run_ref, compare, x.numel() * x.element_size() * 3 // 2
    return Case("silu_and_mul", m.name, f"T={num_tokens} inter={m.intermediate}", build)


def cases_for(ops, m: Model, smoke: bool, dtype, device) -> list[Case]:
    if smoke:
        decode = [(1, 40), (3, 70)]
        prefills = [([20], [20]), ([5, 1, 1], [30, 9, 200])]
        tokens = [8]
    else:
        decode = [(b, c) for b in (1, 16, 64, 256) for c in (512, 4096)]
        prefills = [([8192], [8192]), ([2048] * 4, [2048] * 4),
                    ([2048] + [1] * 64, [4096] + [2048] * 64)]  # chunk with prefix + decodes
        tokens = [256, 8192]
    cases = [attention_case(ops, m, [1] * b, [c] * b, dtype, device) for b, c in decode]
    cases += [attention_case(ops, m, q, c, dtype, device) for q, c in prefills]
    for t in tokens:
        cases += [write_kv_case(ops, m, t, dtype, device),
                  rms_norm_case(ops, m, t, False, dtype, device),
                  rms_norm_case(ops, m, t, True, dtype, device),
                  rotary_case(ops, m, t, dtype, device), silu_case(ops, m, t, dtype, device)]
    return cases


def bench(fn: Callable, on_gpu: bool) -> float:
    """Median milliseconds."""
    return median_us(fn, on_gpu, rep_ms=100) / 1e3

def run_case(case: Case, dtype, on_gpu: bool) -> dict:
    def measure(row: dict) -> None:
        run_tri, run_ref, compare, nbytes = case.build()
        row["max_abs_err"], row["ok"] = compare()
        row["triton_ms"] = bench(run_tri, on_gpu)
        row["torch_ms"] = _bench_or_nan(run_ref, on_gpu)
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        row["triton_gbps"] = nbytes / row["triton_ms"] / 1e6
    row = run_guarded({"op": case.op, "model": case.model, "shape": case.shape,
                       "dtype": str(dtype)}, measure, _format_row)
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def _bench_or_nan(fn: Callable, on_gpu: bool) -> float:
    try:
        return bench(fn, on_gpu)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return math.nan


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['op']:<18} {row['model']:<11} {row['shape']:<38} ERROR {row['error'][:60]}"
    status = "ok" if row["ok"] else "MISMATCH"
    return (f"{row['op']:<18} {row['model']:<11} {row['shape']:<38} {row['max_abs_err']:9.2e} "
            f"{row['triton_ms']:9.4f} {row['torch_ms']:9.4f} {row['speedup']:7.2f}x "
            f"{row['triton_gbps']:8.1f} {status}")


def print_table(rows: list[dict], device_name: str) -> None:
    print(f"\n# TritonOps vs TorchOps on {device_name} "
          "(median ms; GB/s = bytes moved / triton time)")
    print(f"{'op':<18} {'model':<11} {'shape':<38} {'max_err':>9} {'triton':>9} {'torch':>9} "
          f"{'speedup':>8} {'GB/s':>8} status")
    for row in rows:
        print(_format_row(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for kernels.json")
    args = parser.parse_args()
    on_gpu = gpu_or_smoke(parser, args.smoke)
    dtype = getattr(torch, args.dtype)
    if args.smoke and not on_gpu and dtype == torch.bfloat16:
        dtype = torch.float16  # the CPU interpreter's bf16 tl.dot is broken
    from atom_rollout.kernels.triton import TritonOps
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    ops = {"triton": TritonOps(), "torch": TorchOps()}
    models = SMOKE_MODELS if args.smoke else MODELS
    rows = [run_case(c, dtype, on_gpu) for m in models
            for c in cases_for(ops, m, args.smoke, dtype, device)]
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)"
    print_table(rows, device_name)
    out = Path(args.out) / "kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "dtype": str(dtype), "smoke": args.smoke,
                               "torch": torch.__version__, "rows": json_safe(rows)}, indent=1))
    print(f"wrote {out}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
