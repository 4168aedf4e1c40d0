"""The receiver's share of a weight update on one GPU, without the wire.

Buckets are packed on the engine's GPU as a receiver would hold them (512 MiB, bf16,
Qwen3 shapes), then written into a RolloutEngine (dummy weights) three ways:
  streamed  StreamedUpdate as receive_weights drives it: plan hook, one apply per bucket,
            commit (host issue time and total time to the device finishing)
  staged    update_weights over all views (the path for a receive that must not stop
            generation)
  copy      a bare multi-tensor copy into same-shaped buffers (the floor)
Prints a table and writes $OUT/weight_apply.json.

    python scripts/bench_weight_apply.py [--models qwen3-0.6b,qwen3-8b]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atom_rollout import RolloutEngine  # noqa: E402
from atom_rollout.bench.models import config_dir  # noqa: E402
from atom_rollout.engine.streamed_update import StreamedUpdate  # noqa: E402
from atom_rollout.weight_sync import plan_buckets, pack_bucket, unpack_bucket  # noqa: E402
from bench_weight_sync import MODELS, qwen3_shapes, random_tensors  # noqa: E402


def timed(fn, iters: int) -> tuple[float, float]:
    """Median (host issue ms, total ms until the GPU is idle)."""
    issue, total = [], []
    for _ in range(iters + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        issue.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return (1e3 * statistics.median(issue[2:]), 1e3 * statistics.median(total[2:]))


def bench_model(model: str, bucket_bytes: int, iters: int) -> dict:
    device = torch.device("cuda")
    named = list(random_tensors(qwen3_shapes(**MODELS[model]), device, seed=0))
    plan = plan_buckets(named, bucket_bytes)
    tensors = [t for _, t in named]
    flats = [pack_bucket(plan, i, tensors).clone() for i in range(len(plan.buckets))]
    del tensors, named
    views = [unpack_bucket(plan, i, f) for i, f in enumerate(flats)]
    engine = RolloutEngine(config_dir(model), load_format="dummy", dtype="bfloat16",
                           enforce_eager=True, max_model_len=1024, num_kv_blocks=128,
                           show_progress=False)
    streamed = StreamedUpdate(engine.core.weight_map)

    def stream() -> None:
        streamed.begin()(plan)
        for i, v in enumerate(views):
            streamed.apply_bucket(i, list(v))
        streamed.commit()

    all_views = [nv for v in views for nv in v]
    dest = [torch.empty_like(v) for _, v in all_views]
    row = {"bytes": sum(f.numel() for f in flats), "buckets": len(flats),
           "tensors": len(all_views)}
    row["streamed_issue_ms"], row["streamed_ms"] = timed(stream, iters)
    row["staged_issue_ms"], row["staged_ms"] = timed(
        lambda: engine.update_weights(all_views), iters)
    row["copy_issue_ms"], row["copy_ms"] = timed(
        lambda: torch._foreach_copy_(dest, [v for _, v in all_views]), iters)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    ap.add_argument("--bucket-mib", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for model in args.models.split(","):
        rows[model] = bench_model(model, args.bucket_mib * 2**20, args.iters)
        torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(), "bucket_mib": args.bucket_mib,
              "models": rows}
    Path(os.environ.get("OUT", "."), "weight_apply.json").write_text(json.dumps(report, indent=1))
    print(f"{report['device']}, {args.bucket_mib} MiB buckets, median of {args.iters}")
    keys = ["streamed_issue_ms", "streamed_ms", "staged_issue_ms", "staged_ms",
            "copy_issue_ms", "copy_ms"]
    print(f"{'model':>12} " + " ".join(f"{k[:-3]:>14}" for k in keys))
    for model, r in rows.items():
        print(f"{model:>12} " + " ".join(f"{r[k]:>14.2f}" for k in keys))


if __name__ == "__main__":
    main()
