"""The latency suite's batch-1 decode (``python -m atom_rollout.bench --suite latency``,
same engine settings and timing) for variants of the kernel backend's settings, on one
engine with its graphs recaptured per variant, alternating, so that the variants meet
the same machine. Also the batch-1 graph's replay time on the last step's inputs.

    python scripts/ab_latency.py --variants "shipped;pdl=False" [--model qwen3-0.6b]

A variant is ``attr=value,...`` set on the engine's KernelOps; a dotted attr reaches an
object it holds (``_split_k.STREAMING=SplitKConfig(16, 1024, 1, 4)`` sets a constant of
kernels/triton/split_k_linear.py); values are Python expressions that may name
SplitKConfig; "shipped" sets nothing. JSON to $OUT/ab_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch
from bench_util import replay_us

from atom_rollout.bench import workloads
from atom_rollout.bench.__main__ import build_engine, parse_args, time_latency
from atom_rollout.kernels.triton.split_k_linear import SplitKConfig


def settings_of(variant: str) -> dict:
    if variant == "shipped":
        return {}
    pairs = (item.split("=", 1) for item in re.split(r",(?![^()]*\))", variant))
    names = {"SplitKConfig": SplitKConfig}
    return {name.strip(): eval(value, names) for name, value in pairs}  # noqa: S307


def owner_of(ops, dotted: str) -> tuple[object, str]:
    """The object holding a (dotted) setting and the setting's last name."""
    *path, name = dotted.split(".")
    for part in path:
        ops = getattr(ops, part)
    return ops, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--variants", default="shipped")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engine, _ = build_engine(parse_args(["--model", args.model, "--suite", "latency"]))
    ops, graphs = engine.core.runner.ops, engine.core.runner.graphs
    shipped = {name: getattr(*owner_of(ops, name)) for v in args.variants.split(";")
               for name in settings_of(v)}
    workload = workloads.latency(engine.core.vocab_size)
    rows = []
    for _ in range(args.repeats):
        for variant in args.variants.split(";"):
            for name, value in {**shipped, **settings_of(variant)}.items():
                setattr(*owner_of(ops, name), value)
            graphs.recapture()
            ms = time_latency(engine, workload)["ms_per_token"]
            graph = replay_us(graphs.graphs[1, 1, None])  # on the last step's inputs
            rows.append({"variant": variant, "ms_per_token": ms, "graph_replay_us": graph})
            print(f"{args.model} {variant:40s} {ms:.4f} ms/token, graph {graph:.0f} us",
                  flush=True)
    report = {"device": torch.cuda.get_device_name(), "model": args.model, "rows": rows}
    with open(os.path.join(os.environ.get("OUT", "."), "ab_latency.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
