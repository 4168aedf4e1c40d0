"""Do speculative samples have the plain engine's output-length distribution?

    python scripts/spec_length_check.py MODEL_DIR_WITH_MTP [--k 3] [--n 4] [--reps 4]
        [--prompts 64] [--temperature 1.0] [--max-tokens 128]

A check of exactness at scale, next to the tiny-vocabulary chi-square tests: the same
prompts sampled (ending at EOS) by an engine without speculation and by one with k
drafts per step; an exact sampler must give the same distribution of output lengths
and of stop reasons. Every prompt gets its own seeds, different between the engines
and repetitions, so the samples are independent. Prints both summaries and the
difference of the mean lengths in standard errors; writes JSON to $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import load_prompts, seeded  # noqa: E402

from atom_rollout import RolloutEngine, SamplingParams  # noqa: E402

BINS = [0, 8, 16, 32, 64, 127, 100_000]


def sample_lengths(args, k: int, prompts) -> dict:
    engine = RolloutEngine(args.model_dir, show_progress=False, num_speculative_tokens=k,
                           max_num_seqs=256, gpu_memory_utilization=0.4)
    lengths, stops = [], 0
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens)
    for rep in range(args.reps):
        first_seed = (2 * rep + (k > 0)) * len(prompts)  # disjoint across engines and reps
        for out in engine.generate_batch(prompts, seeded(params, len(prompts), first_seed)):
            lengths += [len(s.token_ids) for s in out.samples]
            stops += sum(s.finish_reason == "stop" for s in out.samples)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    lengths = np.array(lengths)
    return {"samples": len(lengths), "mean_length": float(lengths.mean()),
            "sem": float(lengths.std(ddof=1) / np.sqrt(len(lengths))),
            "stop_fraction": stops / len(lengths),
            "histogram": dict(zip([f"{a}-{b - 1}" for a, b in zip(BINS, BINS[1:])],
                                  np.histogram(lengths, bins=BINS)[0].tolist()))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    pool, source = load_prompts(args.model_dir, None, "{a}{op}{b}=")
    if pool is None:
        raise SystemExit(f"{args.model_dir}: needs a tokenizer (arithmetic prompts)")
    prompts = pool[:args.prompts]
    report = {"prompts": source, "k": args.k, "temperature": args.temperature,
              "plain": sample_lengths(args, 0, prompts),
              "spec": sample_lengths(args, args.k, prompts)}
    plain, spec = report["plain"], report["spec"]
    report["difference_in_sem"] = (spec["mean_length"] - plain["mean_length"]) / np.hypot(
        plain["sem"], spec["sem"])
    for name in ("plain", "spec"):
        print(name, json.dumps(report[name]))
    print(f"mean length difference: {report['difference_in_sem']:+.2f} standard errors")
    with open(os.path.join(os.environ.get("OUT", "."), "spec_length_check.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
