"""python -m atom_rollout.bench: rollout throughput vs transformers' generate.

Prints a table and writes JSON. Default: the built-in tiny model on CPU with a
GRPO-shaped workload (16 prompts x n=8).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ..engine import RolloutEngine
from .hf_baseline import time_hf_generate
from .models import SHAPES, random_model_dir
from .workloads import Workload, grpo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atom-rollout bench", description=__doc__)
    parser.add_argument("--model", default="tiny",
                        help=f"a model directory or a random-weight shape: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    return parser.parse_args(argv)


def time_engine(engine: RolloutEngine, workload: Workload) -> dict:
    engine.generate_batch(workload.prompts[:2], workload.params[:2])  # warm-up
    start = time.perf_counter()
    outs = engine.generate_batch(workload.prompts, workload.params)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    return {"engine": "atom-rollout", "output_tokens": tokens, "seconds": seconds,
            "output_tok_per_s": tokens / seconds}


def main(argv=None) -> dict:
    args = parse_args(argv)
    model_dir = random_model_dir(args.model) if args.model in SHAPES else args.model
    engine = RolloutEngine(model_dir, dtype=args.dtype, device=args.device, show_progress=False)
    vocab = engine.core.vocab_size
    workload = grpo(vocab, args.prompts, args.n, args.prompt_len, args.output_len)
    results = [time_engine(engine, workload)]
    if not args.no_hf:
        results.append(time_hf_generate(model_dir, workload, engine.core.device,
                                        engine.core.dtype))
    report = {"model": args.model, "workload": workload.name, "machine": _machine(engine),
              "dtype": str(engine.core.dtype), "kernel_backend": engine.core.ops.name,
              "date": time.strftime("%Y-%m-%d"), "results": results}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    _print_table(report)
    return report


def _machine(engine: RolloutEngine) -> str:
    if engine.core.device.type == "cuda":
        return torch.cuda.get_device_name(engine.core.device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _print_table(report: dict) -> None:
    print(f"\n{report['workload']} | model {report['model']} | {report['machine']} | "
          f"{report['dtype']} | kernels {report['kernel_backend']}")
    print(f"{'engine':<24}{'out tokens':>12}{'seconds':>10}{'out tok/s':>12}")
    for r in report["results"]:
        print(f"{r['engine']:<24}{r['output_tokens']:>12}{r['seconds']:>10.2f}"
              f"{r['output_tok_per_s']:>12.1f}")


if __name__ == "__main__":
    main()
