"""Run-to-run spread of a benchmark workload: one cold run, then --runs warm runs of
the same workload (prefix cache reset before each), out tok/s of each.

    PYTHONPATH=. python scripts/repeat_rollout.py [--model qwen3-0.6b] [--runs 4]
        [--workload nano-vllm|grpo] [--smoke]
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import torch

from atom_rollout import RolloutEngine
from atom_rollout.bench import workloads
from atom_rollout.bench.models import config_dir


def timed_run(engine: RolloutEngine, work) -> float:
    engine.reset_prefix_cache()
    if engine.core.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = engine.generate_batch(work.prompts, work.params)
    if engine.core.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(s.token_ids) for o in outs for s in o.samples) / (time.perf_counter() - start)


def _triton_cache_entries() -> set[str]:
    """Compiled-kernel metadata files in Triton's cache (one per compiled variant)."""
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    return set(glob.glob(os.path.join(cache, "*", "*.json")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--workload", default="nano-vllm", choices=["nano-vllm", "grpo"])
    parser.add_argument("--smoke", action="store_true", help="tiny model and workload, CPU")
    args = parser.parse_args()
    start = time.perf_counter()
    engine = RolloutEngine(config_dir("tiny" if args.smoke else args.model),
                           load_format="dummy", show_progress=False, max_model_len=4096,
                           device="cpu" if args.smoke else "auto")
    print(f"engine start-up {time.perf_counter() - start:.1f} s")
    vocab = engine.core.vocab_size
    work = workloads.generate_workload(args.workload, vocab, args.smoke)
    compiled = _triton_cache_entries()
    print(f"cold {timed_run(engine, work):,.0f} out tok/s")
    new = sorted(_triton_cache_entries() - compiled)
    print(f"Triton kernels compiled during the cold run: {len(new)} "
          + " ".join(name.rsplit("/", 1)[-1] for name in new))
    rates = [timed_run(engine, work) for _ in range(args.runs)]
    print("warm " + " ".join(f"{r:,.0f}" for r in rates)
          + f" out tok/s; median {statistics.median(rates):,.0f}, min {min(rates):,.0f}")


if __name__ == "__main__":
    main()
