"""Small-batch decode attention: split keys merged by a second kernel (before 2026-11-27)
against merged in place by each tile's last program, with several least keys per split,
and unsplit; time per call in a CUDA graph of 20 back-to-back calls, bf16.

    python scripts/bench_split_merge.py [--batches 1,4,16,64] [--contexts 160,400,1000,4000]

Heads: Qwen3-0.6B (16 q / 8 kv, head_dim 128) and SmolLM2-135M (9 / 3, 64); one query
per sequence, and 4 (a k = 3 verify step). The split count is what the engine picks for
a graph captured with max_context_len 40960 (`choose_num_splits`). Writes
$OUT/split_merge.json. GPU only (`--smoke`: the CPU interpreter, tiny sizes, no timing).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import gpu_or_smoke, graph_us  # noqa: E402

PAGE = 16
HEADS = {"qwen3-0.6b": (16, 8, 128), "smollm2": (9, 3, 64)}


def inputs(batch: int, q_len: int, ctx: int, heads: tuple, device, dtype) -> tuple:
    from atom_rollout.kernels import AttentionMetadata
    num_heads, kv_heads, head_dim = heads
    pages = -(-ctx // PAGE)
    tables = torch.randperm(batch * pages, dtype=torch.int32).view(batch, pages)
    cache_shape = (batch * pages, PAGE, kv_heads, head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch * q_len, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32,
                                     device=device),
        context_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        block_tables=tables.to(device), max_query_len=q_len, max_context_len=40960)
    query = torch.randn(batch * q_len, num_heads, head_dim, device=device, dtype=dtype)
    return (query, torch.randn(cache_shape, device=device, dtype=dtype),
            torch.randn(cache_shape, device=device, dtype=dtype), meta)


def variants(ops, attn, args: tuple) -> dict:
    """name -> zero-argument call; the split count is the engine's for these inputs."""
    query, k_cache, v_cache, meta = args
    config = attn.tile_config(meta.max_query_len,
                              1 << (query.shape[1] // k_cache.shape[2] - 1).bit_length())
    splits = attn.choose_num_splits(meta, config, k_cache.shape[2],
                                    ops._programs_to_fill(query.device))
    counts = torch.zeros(4096, dtype=torch.int32, device=query.device)
    scale = query.shape[-1] ** -0.5
    calls = {"second kernel": lambda: attn.paged_attention(*args, scale, splits),
             "unsplit": lambda: attn.paged_attention(*args, scale, 1)}
    for least in (64, 128, 256, 512):
        calls[f"in place >={least}"] = (
            lambda n=least: attn.paged_attention(*args, scale, splits, split_counts=counts,
                                                 min_keys_per_split=n))
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--contexts", default="160,400,1000,4000")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    on_gpu = gpu_or_smoke(parser, args.smoke)
    from atom_rollout.kernels.triton import TritonOps, attention as attn
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    batches, contexts = ([1], [70, 300]) if args.smoke else (
        [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")])
    ops, rows = TritonOps(), []
    for model, q_len, batch, ctx in itertools.product(HEADS, (1, 4), batches, contexts):
        case = inputs(batch, q_len, ctx, HEADS[model], device, dtype)
        calls = variants(ops, attn, case)
        expected = calls["second kernel"]().float()
        row = {"model": model, "q_len": q_len, "batch": batch, "context": ctx}
        for name, call in calls.items():
            row[name] = {"us": graph_us(call, 20, on_gpu),
                         "max_diff": (call().float() - expected).abs().max().item()}
        rows.append(row)
        print(f"{model:10} q{q_len} b{batch:<3} ctx {ctx:5}: " + "  ".join(
            f"{name} {v['us']:.1f}" for name, v in row.items() if isinstance(v, dict)),
            flush=True)
    worst = max(v["max_diff"] for r in rows for v in r.values() if isinstance(v, dict))
    print(f"largest difference from the second-kernel merge: {worst:.2e}")
    out = Path(os.environ.get("OUT", ".")) / "split_merge.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name() if on_gpu else "cpu",
                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
