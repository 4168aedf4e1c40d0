"""python -m atom_rollout.bench: rollout throughput and latency vs transformers.

Prints a table and writes JSON. Default: the built-in tiny model on CPU with a
GRPO-shaped workload (16 prompts x n=8) and transformers' generate on the same.
On a GPU, --suite full runs nano-vllm's workload, GRPO 64x16, batch-1 decode
latency and score() throughput, plus generate on a reduced workload and the
memory-bandwidth floor of a decode step.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ..engine import RolloutEngine
from . import workloads
from .floor import copy_bandwidth, decode_floor_ms
from .hf_baseline import time_hf_generate
from .models import SHAPES, config_dir, random_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atom-rollout bench", description=__doc__)
    parser.add_argument("--model", default="tiny",
                        help=f"a model directory or a random-weight shape: {', '.join(SHAPES)}")
    parser.add_argument("--suite", default="grpo-small",
                        choices=["grpo-small", "full", "latency"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernel-backend", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--sync", action="store_true",
                        help="no async scheduling (each step read back before the next)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    return parser.parse_args(argv)


def build_engine(args) -> tuple[RolloutEngine, str]:
    """Real-shape models get random weights on the device (no checkpoint written);
    the tiny one is saved so transformers can load the same weights."""
    big = args.model in SHAPES and args.model != "tiny"
    model_dir = (config_dir(args.model) if big else
                 random_model_dir(args.model) if args.model in SHAPES else args.model)
    engine = RolloutEngine(model_dir, dtype=args.dtype, device=args.device, show_progress=False,
                           kernel_backend=args.kernel_backend, enforce_eager=args.enforce_eager,
                           load_format="dummy" if big else "auto",
                           max_num_seqs=args.max_num_seqs, max_model_len=4096 if big else None,
                           async_scheduling=False if args.sync else None)
    return engine, model_dir


def _sync(engine: RolloutEngine) -> None:
    if engine.core.device.type == "cuda":
        torch.cuda.synchronize()


def time_generate(engine: RolloutEngine, workload: workloads.Workload) -> dict:
    """Steady state: the timed run follows a cold run of the same workload (Triton compiles
    a kernel variant on its first launch; the cold run's rate is reported too). The prefix
    cache is reset before each run, so the second run recomputes every prompt."""
    cold_seconds, _ = _timed_batch(engine, workload)
    seconds, outs = _timed_batch(engine, workload)
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    return {"workload": workload.name, "engine": "atom-rollout", "output_tokens": tokens,
            "seconds": seconds, "output_tok_per_s": tokens / seconds,
            "cold_output_tok_per_s": tokens / cold_seconds}


def _timed_batch(engine: RolloutEngine, workload: workloads.Workload):
    engine.reset_prefix_cache()
    _sync(engine)
    start = time.perf_counter()
    outs = engine.generate_batch(workload.prompts, workload.params)
    _sync(engine)
    return time.perf_counter() - start, outs


def time_latency(engine: RolloutEngine, workload: workloads.Workload) -> dict:
    params = workload.params[0]
    one = type(params)(temperature=0.0, max_tokens=1, ignore_eos=True)

    def timed(p) -> float:
        engine.reset_prefix_cache()
        _sync(engine)
        start = time.perf_counter()
        engine.generate_batch(workload.prompts, p)
        return time.perf_counter() - start
    timed(params)  # warm-up
    per_token = min((timed(params) - timed(one)) / (params.max_tokens - 1) for _ in range(3))
    return {"workload": workload.name, "engine": "atom-rollout", "ms_per_token": per_token * 1e3}


def time_score(engine: RolloutEngine, prompts, responses, name: str) -> dict:
    engine.score(prompts[:1], responses[:1])
    _sync(engine)
    start = time.perf_counter()
    engine.score(prompts, responses)
    seconds = time.perf_counter() - start
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return {"workload": name, "engine": "atom-rollout score()", "tokens": tokens,
            "seconds": seconds, "tok_per_s": tokens / seconds}


def run_suite(args, engine: RolloutEngine, model_dir: str) -> list[dict]:
    vocab = engine.core.vocab_size
    if args.suite == "grpo-small":
        small = workloads.grpo(vocab, 16, 8, 64, 128)
        return [time_generate(engine, small)] + _hf(args, model_dir, engine, small)
    results = [time_latency(engine, workloads.latency(vocab))]
    if args.suite == "latency":
        return results
    reduced = workloads.grpo(vocab, 16, 4, 256, 128)
    results += [time_generate(engine, workloads.nano_vllm(vocab)),
                time_generate(engine, workloads.grpo(vocab, 64, 16, 512, 1024)),
                time_score(engine, *workloads.score_pairs(vocab, 256, 512, 1024),
                           "score 256 x (512 + 1024)"),
                time_generate(engine, reduced)]
    return results + _hf(args, model_dir, engine, reduced)


def _hf(args, model_dir: str, engine: RolloutEngine, workload) -> list[dict]:
    if args.no_hf:
        return []
    result = time_hf_generate(model_dir, workload, engine.core.device, engine.core.dtype,
                              random_init=engine.config.load_format == "dummy")
    return [{"workload": workload.name, **result}]


def main(argv=None) -> dict:
    args = parse_args(argv)
    engine, model_dir = build_engine(args)
    results = run_suite(args, engine, model_dir)
    report = {"model": args.model, "machine": _machine(engine), "dtype": str(engine.core.dtype),
              "async_scheduling": engine.core.async_scheduling,
              "kernel_backend": engine.core.ops.name, "cuda_graphs": engine.core.runner.graphs
              is not None, "date": time.strftime("%Y-%m-%d"), "results": results}
    if engine.core.device.type == "cuda":
        bandwidth = copy_bandwidth(engine.core.device)
        report["copy_bandwidth_GBps"] = bandwidth / 1e9
        report["decode_floor_ms_batch1"] = decode_floor_ms(engine.core.model, 256, bandwidth)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    _print_table(report)
    return report


def _machine(engine: RolloutEngine) -> str:
    if engine.core.device.type == "cuda":
        return torch.cuda.get_device_name(engine.core.device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _print_table(report: dict) -> None:
    print(f"\nmodel {report['model']} | {report['machine']} | {report['dtype']} | "
          f"kernels {report['kernel_backend']} | cuda graphs {report['cuda_graphs']} | "
          f"async scheduling {report['async_scheduling']}")
    if "copy_bandwidth_GBps" in report:
        print(f"copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; batch-1 decode floor "
              f"{report['decode_floor_ms_batch1']:.3f} ms/token")
    print(f"{'workload':<40}{'engine':<24}{'result':>24}")
    for r in report["results"]:
        if "ms_per_token" in r:
            value = f"{r['ms_per_token']:.3f} ms/token"
        elif "tok_per_s" in r:
            value = f"{r['tok_per_s']:.0f} tok/s scored"
        else:
            value = f"{r['output_tok_per_s']:.0f} out tok/s"
            if "cold_output_tok_per_s" in r:
                value += f" (cold {r['cold_output_tok_per_s']:.0f})"
        print(f"{r['workload']:<40}{r['engine']:<24}{value:>24}")


if __name__ == "__main__":
    main()
