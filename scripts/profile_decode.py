"""Where a decode step's time goes: host-side Python (cProfile) and GPU kernels
(torch.profiler), for a model shape (random weights) or a model directory, optionally
with MTP speculation (--k, needs a checkpoint with an MTP head).

  python scripts/profile_decode.py --batch 1
  python scripts/profile_decode.py --model /tmp/smollm2 --k 3 --batch 1
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.bench.models import config_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=0, help="speculative tokens per step")
    args = parser.parse_args()
    if os.path.isdir(args.model):
        engine = RolloutEngine(args.model, max_model_len=4096, show_progress=False,
                               num_speculative_tokens=args.k)
    else:
        engine = RolloutEngine(config_dir(args.model), load_format="dummy",
                               max_model_len=4096, show_progress=False)
    prompts = [[5 + i] * args.prompt_len for i in range(args.batch)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.tokens,
                            ignore_eos=True)
    engine.generate_batch(prompts, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate_batch(prompts, params)
    print(f"{(time.perf_counter() - start) / args.tokens * 1e3:.3f} ms per output token, wall")
    profiler = cProfile.Profile()
    profiler.enable()
    engine.generate_batch(prompts, params)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(18)
    print(stream.getvalue()[-4000:])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate_batch(prompts, params)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))


if __name__ == "__main__":
    main()
