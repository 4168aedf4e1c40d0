"""Where a batch-1 decode graph's time goes, kernel by kernel: the latency suite's engine
(``python -m atom_rollout.bench --suite latency``) under torch.profiler for a few
steady-state steps, each in-graph kernel charged with the time by which it moved the
graph's end (its end minus the previous kernel's end: with PDL kernels overlap, so
durations do not add up).

    python scripts/profile_graph_kernels.py [--model qwen3-8b] [--tokens 24]

Prints the totals per kernel name and, for one layer in the middle, each kernel's
median charge and duration over the layers; JSON to $OUT/graph_kernels.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

import torch
from bench_util import traced

from atom_rollout import SamplingParams
from atom_rollout.bench import workloads
from atom_rollout.bench.__main__ import build_engine, parse_args


def graph_kernels(engine, prompt: list[int], tokens: int) -> list[list[dict]]:
    """The in-graph kernels of each steady-state step (one graph launch), in start order."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.generate_batch([prompt], params)
    trace = traced(lambda: engine.generate_batch([prompt], params))
    launches = {e["args"]["correlation"] for e in trace
                if e.get("cat") == "cuda_runtime" and "Graph" in e["name"]
                and "correlation" in e.get("args", {})}
    by_launch = defaultdict(list)
    for e in trace:
        if e.get("cat") == "kernel" and e.get("args", {}).get("correlation") in launches:
            by_launch[e["args"]["correlation"]].append(
                dict(name=e["name"], start=e["ts"], dur=e["dur"]))
    replays = [sorted(k, key=lambda e: e["start"]) for _, k in sorted(by_launch.items())]
    return replays[4:-4]  # steady state only


def charges(step: list[dict]) -> list[tuple[str, float, float]]:
    """(name, us by which it moved the step's end, duration) per kernel."""
    out, end = [], step[0]["start"]
    for event in step:
        new_end = max(end, event["start"] + event["dur"])
        out.append((event["name"][:60], new_end - end, event["dur"]))
        end = new_end
    return out


def layer_period(names: list[str]) -> int:
    """The smallest period with which the kernel names repeat in the middle of a step."""
    middle = len(names) // 2
    for period in range(2, len(names) // 4):
        if all(names[middle + i] == names[middle + i + period] for i in range(period)):
            return period
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    engine, _ = build_engine(parse_args(["--model", args.model, "--suite", "latency"]))
    prompt = workloads.latency(engine.core.vocab_size).prompts[0]
    per_step = [charges(step) for step in graph_kernels(engine, prompt, args.tokens)]
    totals = defaultdict(lambda: [0.0, 0.0, 0])
    for step in per_step:
        for name, charge, dur in step:
            row = totals[name]
            row[0] += charge / len(per_step)
            row[1] += dur / len(per_step)
            row[2] += 1
    spans = [sum(c for _, c, _ in step) for step in per_step]
    print(f"{len(per_step)} steps, graph span median {statistics.median(spans):.1f} us")
    for name, (charge, dur, count) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"  {charge:8.1f} us charged {dur:8.1f} us run {count / len(per_step):5.0f}x"
              f"  {name}")
    layer = _middle_layer(per_step)
    print("one layer (median over the middle layers): charged / duration us")
    for name, charge, dur in layer:
        print(f"  {charge:6.2f} {dur:6.2f}  {name}")
    report = dict(device=torch.cuda.get_device_name(), model=args.model,
                  span_us=statistics.median(spans),
                  totals={k: dict(charged_us=v[0], run_us=v[1]) for k, v in totals.items()},
                  layer=[dict(name=n, charged_us=c, run_us=d) for n, c, d in layer])
    with open(os.path.join(os.environ.get("OUT", "."), "graph_kernels.json"), "w") as f:
        json.dump(report, f, indent=2)


def _middle_layer(per_step: list[list[tuple]]) -> list[tuple[str, float, float]]:
    step = per_step[len(per_step) // 2]
    period = layer_period([name for name, _, _ in step])
    starts = range(len(step) // 4, 3 * len(step) // 4 - period, period)
    return [(step[starts[0] + i][0],
             statistics.median(s[j + i][1] for s in per_step for j in starts),
             statistics.median(s[j + i][2] for s in per_step for j in starts))
            for i in range(period)]


if __name__ == "__main__":
    main()
