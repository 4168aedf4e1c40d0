"""Is the plain decode loop host-bound? generate_batch's wall time against max_tokens
(1, 129, 513; ignore_eos): the slope is the time per decode step, the intercept what one
call costs besides (intake, the eager prefill, output), set against the decode graph's
own replay time at the same batch.

    python scripts/bench_call_overhead.py [--model qwen3-0.6b | --config DIR/config.json]

Random weights of a named shape or of any config.json (for example SmolLM2's); prompts
of 32 tokens; batches 1, 16 and 64; best of 3. The replay runs on the inputs of the last
step (the longest contexts), so where attention weighs (large batches) it exceeds the
average step and the intercept means little there. Writes $OUT/call_overhead_<name>.json.
GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_rollout import RolloutEngine, SamplingParams  # noqa: E402
from atom_rollout.bench.models import config_dir  # noqa: E402
from bench_util import best_generate_seconds, replay_us  # noqa: E402

TOKENS = (1, 129, 513)


def model_dir(args) -> str:
    if not args.config:
        return config_dir(args.model)
    path = tempfile.mkdtemp(prefix="atom-rollout-")
    shutil.copy(args.config, os.path.join(path, "config.json"))
    return path


def call_ms(engine: RolloutEngine, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0)
    return best_generate_seconds(engine, prompts, params) * 1e3


def decode_graph(engine: RolloutEngine, batch: int) -> torch.cuda.CUDAGraph:
    """The engine's 1-token decode graph for ``batch`` sequences (the padded size)."""
    graphs = engine.core.runner.graphs
    return graphs.graphs[1, graphs.padded_size(batch), None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--config", default=None, help="a config.json (its MTP field ignored)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    engine = RolloutEngine(model_dir(args), load_format="dummy", show_progress=False,
                           gpu_memory_utilization=0.3, max_num_seqs=64)
    rows = []
    for batch in (1, 16, 64):
        prompts = [[5 + (i * 7 + j) % 1000 for j in range(32)] for i in range(batch)]
        ms = {tokens: call_ms(engine, prompts, tokens) for tokens in TOKENS}
        step_us = (ms[TOKENS[2]] - ms[TOKENS[1]]) / (TOKENS[2] - TOKENS[1]) * 1e3
        row = {"batch": batch, "call_ms": ms, "us_per_step": step_us,
               "graph_replay_us": replay_us(decode_graph(engine, batch), 100),
               "per_call_ms": ms[TOKENS[1]] - TOKENS[1] * step_us / 1e3}
        rows.append(row)
        print(f"batch {batch}: {step_us:.0f} us per decode step against "
              f"{row['graph_replay_us']:.0f} us of graph replay; {row['per_call_ms']:.1f} ms "
              f"per call besides", flush=True)
    name = Path(args.config).parent.name if args.config else args.model
    out = Path(os.environ.get("OUT", ".")) / f"call_overhead_{name}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
