"""Where a rollout workload's time goes, step by step, on the real engine.

Runs one benchmark workload (nano-vllm's or GRPO's, as in `python -m atom_rollout.bench`)
and records every engine step: batch size, tokens computed, decode or not, KV positions
read, wall time, and the step's span on the GPU stream (CUDA events around the runner:
wall - span is host time the GPU did not overlap; with async scheduling the span only
covers issuing the step, so use --sync for that split). Prints a table by step kind and
batch size with the KV bandwidth each reached; writes JSON.

    PYTHONPATH=. python scripts/profile_workload.py --model qwen3-0.6b --workload nano-vllm
    PYTHONPATH=. python scripts/profile_workload.py --smoke     # tiny model on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch

from atom_rollout import RolloutEngine
from atom_rollout.bench import workloads
from atom_rollout.bench.models import config_dir

BUCKETS = ((1, 7), (8, 31), (32, 127), (128, 100000))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--workload", default="nano-vllm", choices=["nano-vllm", "grpo"])
    parser.add_argument("--smoke", action="store_true", help="tiny model, small workload, CPU")
    parser.add_argument("--sync", action="store_true", help="no async scheduling")
    parser.add_argument("--kernels", action="store_true",
                        help="also run the workload once more under torch.profiler and "
                             "print GPU time by kernel family against the wall time")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."),
                                                       "profile_workload.json"))
    return parser.parse_args(argv)


class StepRecorder:
    """Wraps EngineCore.step and ModelRunner.run of one engine."""

    def __init__(self, engine: RolloutEngine):
        self.core, self.rows = engine.core, []
        self.cuda = self.core.device.type == "cuda"
        self._wrap_runner()
        self._wrap_step()

    def _wrap_runner(self) -> None:
        runner = self.core.runner
        runner.run = self._timed(runner.run)
        runner.launch = self._timed(runner.launch)  # async scheduling launches instead

    def _timed(self, inner):
        recorder = self

        def run(batch, *args, **kwargs):
            start = end = None
            if recorder.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            result = inner(batch, *args, **kwargs)
            if recorder.cuda:
                end.record()
            recorder.current = dict(
                seqs=len(batch.seqs), tokens=batch.num_tokens, decode=batch.is_decode,
                kv_positions=sum(s.num_computed_tokens + n for s, n in
                                 zip(batch.seqs, batch.num_new_tokens)),
                events=(start, end))
            return result
        return run

    def _wrap_step(self) -> None:
        core, recorder = self.core, self
        inner = core.step

        def step():
            recorder.current = None
            begin = time.perf_counter()
            finished = inner()
            wall = time.perf_counter() - begin
            if recorder.current is not None:
                recorder.rows.append({**recorder.current, "wall_s": wall})
            return finished
        core.step = step

    def finish(self) -> list[dict]:
        if self.cuda:
            torch.cuda.synchronize()
        for row in self.rows:
            start, end = row.pop("events")
            row["gpu_span_s"] = start.elapsed_time(end) / 1e3 if start is not None else row["wall_s"]
        return self.rows


def summarize(rows: list[dict], kv_bytes_per_position: int) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if not row["decode"]:
            groups["prefill/mixed"].append(row)
            continue
        low, high = next(b for b in BUCKETS if b[0] <= row["seqs"] <= b[1])
        groups[f"decode {low}-{high if high < 100000 else '+'}"].append(row)
    out = []
    for name, members in sorted(groups.items()):
        wall = sum(r["wall_s"] for r in members)
        span = sum(r["gpu_span_s"] for r in members)
        kv = sum(r["kv_positions"] for r in members) * kv_bytes_per_position
        out.append({"kind": name, "steps": len(members),
                    "tokens": sum(r["tokens"] for r in members), "wall_s": wall,
                    "gpu_span_s": span, "host_not_overlapped_s": wall - span,
                    "kv_GB": kv / 1e9, "kv_GBps_over_span": kv / span / 1e9 if span else 0.0})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.model = "tiny"
    model_dir = config_dir(args.model)
    engine = RolloutEngine(model_dir, load_format="dummy", show_progress=False,
                           max_model_len=4096, device="cpu" if args.smoke else "auto",
                           async_scheduling=False if args.sync else None)
    vocab = engine.core.vocab_size
    work = workloads.generate_workload(args.workload, vocab, args.smoke)
    engine.generate_batch(work.prompts, work.params)  # Triton compiles variants on first use
    engine.reset_prefix_cache()
    recorder = StepRecorder(engine)
    start = time.perf_counter()
    outs = engine.generate_batch(work.prompts, work.params)
    total = time.perf_counter() - start
    rows = recorder.finish()
    spec = engine.core.model.spec
    kv_per_position = (2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
                       * engine.core.dtype.itemsize)
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    table = summarize(rows, kv_per_position)
    report = {"model": args.model, "workload": work.name, "device": _device_name(engine),
              "total_s": total, "output_tokens": tokens, "out_tok_per_s": tokens / total,
              "steps": len(rows), "by_kind": table}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{work.name} | {report['device']} | {tokens} tokens in {total:.2f} s = "
          f"{tokens / total:,.0f} out tok/s, {len(rows)} steps")
    print(f"{'kind':<16}{'steps':>7}{'tokens':>9}{'wall s':>9}{'gpu s':>8}{'host s':>8}"
          f"{'KV GB':>9}{'KV GB/s':>9}")
    for r in table:
        print(f"{r['kind']:<16}{r['steps']:>7}{r['tokens']:>9}{r['wall_s']:>9.3f}"
              f"{r['gpu_span_s']:>8.3f}{r['host_not_overlapped_s']:>8.3f}{r['kv_GB']:>9.1f}"
              f"{r['kv_GBps_over_span']:>9.0f}")
    if args.kernels and engine.core.device.type == "cuda":
        report["kernels"] = kernel_families(engine, work)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


FAMILIES = (("attention", ("paged_attention", "merge_splits")),
            ("gemm", ("nvjet", "gemm", "cutlass", "cublas", "splitK")),
            ("sampler", ("chunk_stats", "kept_sum", "pick_kernel")),
            ("norm", ("rms_norm",)), ("prepare_qkv", ("prepare_qkv",)),
            ("silu", ("silu_and_mul",)), ("memcpy", ("Memcpy", "Memset")))


def kernel_families(engine: RolloutEngine, work) -> dict:
    """GPU time by kernel family over one more warm run, against its wall time."""
    from torch.profiler import ProfilerActivity, profile
    engine.reset_prefix_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.generate_batch(work.prompts, work.params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    by_family: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        family = next((f for f, keys in FAMILIES if any(k in event.key for k in keys)), "other")
        by_family[family] += event.self_device_time_total / 1e6
    busy = sum(by_family.values())
    print(f"kernels over one profiled run: wall {wall:.2f} s, GPU busy {busy:.2f} s")
    for family, seconds in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {family:<12}{seconds:8.3f} s")
    return {"wall_s": wall, "busy_s": busy, "by_family_s": dict(by_family)}


def _device_name(engine: RolloutEngine) -> str:
    if engine.core.device.type == "cuda":
        return torch.cuda.get_device_name(engine.core.device)
    return "cpu"


if __name__ == "__main__":
    main()
