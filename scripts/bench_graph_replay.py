"""Batch-1 decode: the engine's time per token against back-to-back replays of its own
decode graph (forward + LM head, no host work or sampling between replays).

    python scripts/bench_graph_replay.py [--models qwen3-0.6b,qwen3-8b]

The difference is what the host, sampling and the prompt's prefill add per token; the
replay time is what kernels inside the graph cost, launch gaps included. Random weights
with the real shapes; prompt 128 tokens, 256 output tokens, best of 3. GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_rollout import RolloutEngine, SamplingParams  # noqa: E402
from atom_rollout.bench.models import config_dir  # noqa: E402
from bench_util import best_generate_seconds, replay_us  # noqa: E402

OUTPUT_TOKENS = 256


def engine_us_per_token(engine: RolloutEngine) -> float:
    prompt = [[5 + i % 1000 for i in range(128)]]
    params = SamplingParams(temperature=1.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True, seed=0)
    return best_generate_seconds(engine, prompt, params) / OUTPUT_TOKENS * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    args = parser.parse_args(argv)
    report = {"device": torch.cuda.get_device_name(), "rows": []}
    for name in args.models.split(","):
        engine = RolloutEngine(config_dir(name), load_format="dummy", show_progress=False,
                               max_num_seqs=1, cuda_graph_max_batch=1, max_model_len=1024,
                               gpu_memory_utilization=0.5)
        row = {"model": name, "engine_us_per_token": engine_us_per_token(engine),
               "graph_replay_us": replay_us(engine.core.runner.graphs.graphs[1, 1, None])}
        report["rows"].append(row)
        print(f"{name}: engine {row['engine_us_per_token']:.0f} us/token, decode graph "
              f"back to back {row['graph_replay_us']:.0f} us/replay", flush=True)
        del engine
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "graph_replay.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
