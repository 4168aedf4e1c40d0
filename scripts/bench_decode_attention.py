"""Decode attention tile sweep: the Triton paged attention kernel at decode shape
(one query per sequence, Qwen3-0.6B heads: 16 q / 8 kv, head_dim 128, bf16,
block_size 16, pages scattered over the cache), context lengths uniform in
[100, 2048] (the middle of the nano-vllm workload) or in [1024, 2048] (its tail,
where the long sequences remain).

    python scripts/bench_decode_attention.py [--batches 256,64,16] [--full]

Per batch and length range: the engine's default choice (its number of splits as
chosen for a graph with max_context_len 4096), then every (block_n, warps, stages,
splits) (--full) or every (block_n, splits), with time per call in a CUDA graph and
KV bytes read per second. Writes $OUT/decode_attention.json (or --out).
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

from bench_util import graph_us, json_safe  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 16


def decode_inputs(batch: int, shortest: int, device, longest_first: bool = False) -> tuple:
    from atom_rollout.kernels import AttentionMetadata
    ctx = torch.randint(shortest, 2049, (batch,))
    if longest_first:
        ctx = ctx.sort(descending=True).values
    pages = (ctx + PAGE - 1) // PAGE
    total = int(pages.sum())
    order = torch.randperm(total)
    tables = torch.full((batch, int(pages.max())), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages.tolist()):
        tables[b, :n] = order[start:start + n]
        start += n
    cache_shape = (total, PAGE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn(cache_shape, device=device, dtype=torch.bfloat16)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        context_lens=ctx.to(torch.int32).to(device), block_tables=tables.to(device),
        max_query_len=1, max_context_len=4096)
    query = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    kv_bytes = int(ctx.sum()) * KV_HEADS * HEAD_DIM * 2 * 2
    return query, k_cache, v_cache, meta, kv_bytes


def sweep(batch: int, shortest: int, full: bool, device, longest_first: bool) -> list[dict]:
    from atom_rollout.kernels.triton import TritonOps, attention as attn
    ops = TritonOps()
    query, k_cache, v_cache, meta, kv_bytes = decode_inputs(batch, shortest, device,
                                                             longest_first)
    scale = HEAD_DIM ** -0.5
    expected = ops.attention(query, k_cache, v_cache, meta, scale).float()
    default_us = graph_us(lambda: ops.attention(query, k_cache, v_cache, meta, scale), 20, True)
    chosen = attn.choose_num_splits(meta, attn.tile_config(1, 2), KV_HEADS,
                                    ops._programs_to_fill(device))
    case = {"batch": batch, "lengths": f"{shortest}-2048"}
    rows = [{**case, "config": f"default/{chosen}", "us": default_us,
             "GBps": kv_bytes / default_us / 1e3, "diff": 0.0}]
    grid = (itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), (1, 2, 4)) if full else
            itertools.product((64, 128), (4,), (3,), (1, 2, 4, 8, 16)))
    for block_n, warps, stages, splits in grid:
        config = attn.TileConfig(1, 16, block_n, warps, stages)
        run = lambda c=config, s=splits: attn.paged_attention(  # noqa: E731
            query, k_cache, v_cache, meta, scale, s, c)
        try:
            diff = (run().float() - expected).abs().max().item()
            us = graph_us(run, 20, True)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
            rows.append({**case, "config": f"{block_n}/{warps}/{stages}/{splits}",
                         "error": str(exc)[:120]})
            continue
        rows.append({**case, "config": f"{block_n}/{warps}/{stages}/{splits}",
                     "us": us, "GBps": kv_bytes / us / 1e3, "diff": diff})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,128,64,32,16")
    parser.add_argument("--full", action="store_true", help="sweep warps and stages too")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--no-order", action="store_true",
                        help="sequences in batch order, not longest context first")
    parser.add_argument("--longest-first-inputs", action="store_true",
                        help="hand the batch over already sorted by context length")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.no_order:
        from atom_rollout.kernels.triton import attention
        attention.ORDER_MIN_SEQS = 1 << 30
    torch.manual_seed(0)
    device = torch.device("cuda")
    results = []
    print(f"# decode attention on {torch.cuda.get_device_name()} "
          "(block_n/warps/stages/splits; us per call in a graph; KV GB/s)")
    for batch, shortest in itertools.product((int(b) for b in args.batches.split(",")),
                                             (100, 1024)):
        rows = sweep(batch, shortest, args.full, device, args.longest_first_inputs)
        results += rows
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        default = rows[0]
        print(f"batch {batch}, lengths {shortest}-2048: {default['config']} {default['us']:.1f} "
              f"us {default['GBps']:.0f} GB/s; best:")
        for r in ok[:4]:
            print(f"  {r['config']:<14} {r['us']:8.1f} us {r['GBps']:6.0f} GB/s "
                  f"diff {r['diff']:.1e}")
    name = "decode_attention" + ("_no_order" if args.no_order else "")
    out = Path(args.out) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                               "rows": json_safe(results)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
