"""What a batch-1 decode step runs on the GPU besides its CUDA graph: the device timeline
of a few steady-state steps (torch.profiler), every op outside the graph replay with its
duration and the idle gap before it.

    python scripts/profile_step_timeline.py [--model qwen3-0.6b] [--batch 1]

Prints, per step, the graph's span and the ops between two replays; JSON to
$OUT/step_timeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from bench_util import traced

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.bench.models import config_dir

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(trace: dict) -> list[dict]:
    """GPU events sorted by start, each marked 'graph' when a cudaGraphLaunch issued it."""
    launches = {e["args"]["correlation"]: e["name"] for e in trace["traceEvents"]
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    events = [dict(name=e["name"], start=e["ts"], dur=e["dur"],
                   graph="Graph" in launches.get(e["args"].get("correlation"), ""))
              for e in trace["traceEvents"] if e.get("cat") in GPU_CATEGORIES]
    return sorted(events, key=lambda e: e["start"])


def steps(events: list[dict]) -> list[dict]:
    """Split at each graph replay: (graph span, the ops after it up to the next replay)."""
    out, current = [], None
    for event in events:
        if event["graph"]:
            if current is None or current["outside"]:
                current = dict(graph_start=event["start"], graph_end=0.0, outside=[])
                out.append(current)
            current["graph_end"] = max(current["graph_end"], event["start"] + event["dur"])
        elif current is not None:
            current["outside"].append(event)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    engine = RolloutEngine(config_dir(args.model), load_format="dummy", show_progress=False,
                           max_model_len=1024, gpu_memory_utilization=0.5)
    prompts = [[5 + i] * 128 for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    engine.generate_batch(prompts, params)
    trace = traced(lambda: engine.generate_batch(prompts, params))
    found = steps(device_events({"traceEvents": trace}))[4:-4]  # steady state only
    report = summarize(found)
    report["device"] = torch.cuda.get_device_name()
    with open(os.path.join(os.environ.get("OUT", "."), "step_timeline.json"), "w") as f:
        json.dump(report, f, indent=2)


def summarize(found: list[dict]) -> dict:
    periods = [b["graph_start"] - a["graph_start"] for a, b in zip(found, found[1:])]
    spans = [s["graph_end"] - s["graph_start"] for s in found]
    example = found[len(found) // 2]
    rows, last_end = [], example["graph_end"]
    for event in example["outside"]:
        rows.append(dict(name=event["name"][:70], us=event["dur"],
                         gap_before=event["start"] - last_end))
        last_end = event["start"] + event["dur"]
    print(f"step {statistics.median(periods):.1f} us, graph span {statistics.median(spans):.1f} us,"
          f" {len(example['outside'])} ops outside the graph:")
    for row in rows:
        print(f"  gap {row['gap_before']:6.1f}  {row['us']:6.1f} us  {row['name']}")
    return dict(step_us=statistics.median(periods), graph_span_us=statistics.median(spans),
                outside=rows)


if __name__ == "__main__":
    main()
