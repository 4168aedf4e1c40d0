"""`atom-rollout demo`: a short GRPO run on CPU with the built-in model (demo_model/, a
Qwen3-shaped char-level model warmed up on 2-digit addition by
scripts/make_demo_model.py), showing the reward rise."""
from __future__ import annotations

import argparse
import os
import statistics
import time

from .loop import TrainConfig, train
from .tasks import TaskConfig

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def demo_config(steps: int, out_dir: str | None, sync: str = "inprocess") -> TrainConfig:
    return TrainConfig(model_dir=DEMO_MODEL, steps=steps, prompts_per_step=32, n=8,
                       max_tokens=5, optimizer="adamw", lr=2e-4, warmup_steps=10, sync=sync,
                       device="cpu", tasks=TaskConfig(digits=2), out_dir=out_dir,
                       engine_options={"num_kv_blocks": 256})


def summarize(records: list[dict], window: int = 10) -> str:
    rewards = [r["reward_mean"] for r in records]
    window = max(1, min(window, len(rewards) // 2))
    first, last = statistics.mean(rewards[:window]), statistics.mean(rewards[-window:])
    worst = max(r["mismatch_max"] for r in records)
    return (f"reward (mean of {window} steps): first {first:.3f} -> last {last:.3f}; "
            f"max |trainer - rollout logprob| over the run {worst:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="atom-rollout demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out-dir", default=None, help="write metrics.jsonl/png here")
    parser.add_argument("--sync", default="inprocess", choices=["inprocess", "broadcast"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = train(demo_config(args.steps, args.out_dir, args.sync))
    print(summarize(records))
    print(f"{args.steps} GRPO steps in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
