"""Decode speed with and without MTP speculation, and draft acceptance per position.

    python scripts/bench_speculative.py MODEL_DIR_WITH_MTP [--k 3] [--batches 1,16,64]

For each batch size and temperature (0 and 1): output tokens per second of the same
prompts through an engine without speculation and one with k drafts per step, the
speedup, and the acceptance of each draft position. Prints a table; writes JSON to $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from atom_rollout import RolloutEngine, SamplingParams


def timed(engine: RolloutEngine, prompts, params) -> float:
    engine.generate_batch(prompts[:1], params)  # warm-up
    if engine.core.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = engine.generate_batch(prompts, params)
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    plain = RolloutEngine(args.model_dir, device=args.device, show_progress=False)
    spec = RolloutEngine(args.model_dir, device=args.device, show_progress=False,
                         num_speculative_tokens=args.k)
    vocab = plain.core.vocab_size
    rows = []
    for batch in map(int, args.batches.split(",")):
        prompt_len = min(32, plain.core.max_model_len // 4)
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature,
                                    max_tokens=min(args.max_tokens,
                                                   plain.core.max_model_len - prompt_len - 1),
                                    ignore_eos=True, seed=0)
            before = (spec.core.drafts_proposed, list(spec.core.drafts_accepted_at))
            base, fast = timed(plain, prompts, params), timed(spec, prompts, params)
            rounds = max(1, (spec.core.drafts_proposed - before[0]) // args.k)
            accept = [(a - b) / rounds for a, b in zip(spec.core.drafts_accepted_at, before[1])]
            rows.append({"batch": batch, "temperature": temperature, "plain_tok_s": base,
                         "spec_tok_s": fast, "speedup": fast / base, "acceptance": accept})
    device = (torch.cuda.get_device_name() if plain.core.device.type == "cuda" else "cpu")
    report = {"device": device, "k": args.k, "rows": rows}
    with open(os.path.join(os.environ.get("OUT", "."), "speculative.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nMTP speculation, k={args.k}, {device}")
    print(f"{'batch':>6} {'temp':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8}  "
          "acceptance by position")
    for r in rows:
        print(f"{r['batch']:>6} {r['temperature']:>5.1f} {r['plain_tok_s']:>12.0f} "
              f"{r['spec_tok_s']:>11.0f} {r['speedup']:>7.2f}x  "
              + " ".join(f"{a:.2f}" for a in r["acceptance"]))


if __name__ == "__main__":
    main()
