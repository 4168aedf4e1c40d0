"""The receiver's share of a weight update on one GPU, without the wire.

Buckets are packed on the engine's GPU as a receiver would hold them (bf16, Qwen3 shapes,
the sender's tapered plan), then written into a RolloutEngine (dummy weights) four ways:
  kernel    StreamedUpdate as receive_weights drives it, each bucket written by the
            one-pass Triton kernel (plan hook, one launch per bucket, commit)
  torch     the same with the multi-tensor torch path (max-abs reduction, undo copy,
            copy: the path before the kernel)
  staged    update_weights over all views (the path for a receive that must not stop
            generation)
  copy      a bare multi-tensor copy into same-shaped buffers (the floor)
For each: host issue time and total time until the device is idle (medians). For the
two streamed paths also the last bucket's own device time (the only write not hidden
behind the wire in receive_weights). Checks that the kernel path leaves exactly the
update's values in the model. Prints a table and writes $OUT/weight_apply.json.

    python scripts/bench_weight_apply.py [--models qwen3-0.6b,qwen3-8b] [--bucket-mib 512]
    python scripts/bench_weight_apply.py --smoke    # CPU, Triton interpreter, tiny model
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
from bench_util import gpu_or_smoke  # noqa: E402

KEYS = ["kernel_issue_ms", "kernel_ms", "kernel_last_ms", "torch_issue_ms", "torch_ms",
        "torch_last_ms", "staged_ms", "copy_ms"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LastBucket:
    """Device time of one span of work: CUDA events, or the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.samples: list[float] = []

    def start(self) -> None:
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[1].record()
        else:
            self.samples.append(1e3 * (time.perf_counter() - self._t0))

    def collect(self) -> None:  # after a sync
        if self.cuda:
            self.samples.append(self._events[0].elapsed_time(self._events[1]))

    def median(self, skip: int) -> float:
        return statistics.median(self.samples[skip:])


def timed(fn, iters: int, device: torch.device, span: LastBucket | None = None,
          warmup: int = 2) -> tuple[float, float]:
    """Median (host issue ms, total ms until the device is idle) after `warmup` runs."""
    issue, total = [], []
    for _ in range(iters + warmup):
        sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync(device)
        issue.append(t1 - t0)
        total.append(time.perf_counter() - t0)
        if span is not None:
            span.collect()
    return (1e3 * statistics.median(issue[warmup:]), 1e3 * statistics.median(total[warmup:]))


def streamed_runner(update, plan, views, span: LastBucket):
    def run() -> None:
        update.begin()(plan)
        for i, v in enumerate(views):
            if i == len(views) - 1:
                span.start()
            update.apply_bucket(i, list(v))
        span.stop()
        update.commit()
    return run


def exact(engine, named) -> bool:
    """Whether the model holds exactly `named` (regenerated: a streamed write leaves
    saved slices in the receive buffers, so they no longer hold the update)."""
    wm = engine.core.weight_map
    return all(torch.equal(wm.targets[wm.resolve(n)].view(), t) for n, t in named)


def bench_model(model: str, device: torch.device, bucket_bytes: int, tail_bytes: int | None,
                iters: int, warmup: int) -> dict:
    from atom_rollout import RolloutEngine
    from atom_rollout.bench.models import config_dir
    from atom_rollout.engine.streamed_update import StreamedUpdate
    from atom_rollout.weight_sync import pack_bucket, plan_buckets, unpack_bucket
    from bench_weight_sync import MODELS, qwen3_shapes, random_tensors

    shapes = qwen3_shapes(**MODELS[model])
    named = list(random_tensors(shapes, device, seed=0))
    plan = plan_buckets(named, bucket_bytes, tail_bytes)
    tensors = [t for _, t in named]
    flats = [pack_bucket(plan, i, tensors).clone() for i in range(len(plan.buckets))]
    del tensors, named  # an 8B update must fit three times over: buckets, model, copy
    views = [unpack_bucket(plan, i, f) for i, f in enumerate(flats)]
    engine = RolloutEngine(config_dir(model), load_format="dummy", dtype="bfloat16",
                           device=device.type, enforce_eager=True, max_model_len=1024,
                           num_kv_blocks=128, show_progress=False)
    wm = engine.core.weight_map
    all_views = [nv for v in views for nv in v]
    row = {"bytes": sum(f.numel() * f.element_size() for f in flats),
           "buckets": len(flats), "tensors": len(all_views),
           "bucket_mib": [round(b.nbytes / 2**20, 1) for b in plan.buckets]}
    for name, use_kernel in (("kernel", True), ("torch", False)):
        update, span = StreamedUpdate(wm, use_kernel=use_kernel), LastBucket(device)
        run = streamed_runner(update, plan, views, span)
        if use_kernel:  # first, while the buckets still hold the update
            run()
            row["kernel_exact"] = exact(engine, random_tensors(shapes, device, seed=0))
            row["kernel_buckets"] = sum(layout.table is not None for layout in update._layouts)
            span.samples.clear()
        row[f"{name}_issue_ms"], row[f"{name}_ms"] = timed(run, iters, device, span, warmup)
        row[f"{name}_last_ms"] = span.median(warmup)
    _, row["staged_ms"] = timed(lambda: engine.update_weights(all_views), iters, device,
                                warmup=warmup)
    dest = [torch.empty_like(v) for _, v in all_views]
    _, row["copy_ms"] = timed(
        lambda: torch._foreach_copy_(dest, [v for _, v in all_views]), iters, device,
        warmup=warmup)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None,
                    help="comma-separated (default qwen3-0.6b,qwen3-8b; tiny with --smoke)")
    ap.add_argument("--bucket-mib", type=float, default=None,
                    help="sender bucket size (default 512; 0.25 with --smoke)")
    ap.add_argument("--tail-mib", type=float, default=None,
                    help="plan_buckets tail_bytes (default: its own; = bucket: no tapering)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs (default 5; 1 smoke)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny model")
    args = ap.parse_args()
    on_gpu = gpu_or_smoke(ap, args.smoke)
    device = torch.device("cuda" if on_gpu else "cpu")
    models = (args.models or ("tiny" if args.smoke else "qwen3-0.6b,qwen3-8b")).split(",")
    bucket_mib = args.bucket_mib or (0.25 if args.smoke else 512)
    tail = int(args.tail_mib * 2**20) if args.tail_mib else None
    iters, warmup = (args.iters or (1 if args.smoke else 5)), (1 if args.smoke else 2)
    rows = {}
    for model in models:
        rows[model] = bench_model(model, device, int(bucket_mib * 2**20), tail, iters, warmup)
        if on_gpu:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)"
    report = {"device": name, "bucket_mib": bucket_mib, "tail_mib": args.tail_mib,
              "iters": iters, "models": rows}
    Path(os.environ.get("OUT", "."), "weight_apply.json").write_text(json.dumps(report, indent=1))
    print(f"{name}, {bucket_mib} MiB buckets, median of {iters}")
    print(f"{'model':>12} {'buckets':>8} " + " ".join(f"{k[:-3]:>12}" for k in KEYS)
          + "  kernel: buckets, exact")
    for model, r in rows.items():
        print(f"{model:>12} {r['buckets']:>8} " + " ".join(f"{r[k]:>12.2f}" for k in KEYS)
              + f"  {r['kernel_buckets']}/{r['buckets']}, {r['kernel_exact']}")
    if not all(r["kernel_exact"] for r in rows.values()):
        sys.exit("the kernel path did not write the update exactly")


if __name__ == "__main__":
    main()
