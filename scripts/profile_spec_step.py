"""Where a speculative decode step's time goes: host vs GPU, and the GPU by kernel.

    python scripts/profile_spec_step.py MODEL_DIR_WITH_MTP [--k 3] [--batches 1,64]
        [--temperatures 0,1] [--top 12] [--stop-at-eos]

For each (batch, temperature): the prompts of bench_speculative.py through a speculative
engine (and a plain one for reference), a warm run, then a profiled run: wall time per
engine step, GPU kernel time per step (torch.profiler), tokens per step, and the kernels
that take the most GPU time per step. Prints a table; writes JSON to $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import batch_prompts, load_prompts, seeded  # noqa: E402

from atom_rollout import RolloutEngine, SamplingParams  # noqa: E402


def profiled_run(engine: RolloutEngine, prompts, params, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    # warm: graphs of every size this run meets
    engine.generate_batch(prompts, seeded(params, len(prompts)))
    steps = []
    core_step = engine.core.step

    def counted():
        steps.append(1)
        return core_step()
    engine.core.step = counted
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        outs = engine.generate_batch(prompts, seeded(params, len(prompts)))
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    engine.core.step = core_step
    tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
    by_kernel = defaultdict(float)
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            by_kernel[event.key[:70]] += event.self_device_time_total
    n = len(steps)
    gpu_us = sum(by_kernel.values()) / n
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {"steps": n, "tokens_per_step": tokens / n, "wall_us_per_step": wall / n * 1e6,
            "gpu_us_per_step": gpu_us, "tok_s": tokens / wall,
            "top_kernels_us_per_step": [(name, t / n) for name, t in ranked]}


def timed_run(engine: RolloutEngine, prompts, params) -> dict:
    """Without the profiler: wall per step and, per speculative graph step, the GPU time
    of its replay (CUDA events), so that wall - graph is time the GPU waited for the
    host (chained steps overlap the host's work with the replay before); also how many
    graph steps were chained and how long the host waited in resolve (for the GPU)."""
    runner = engine.core.runner
    graphs, fused = runner.graphs, runner.fused_speculation
    pairs, steps, chained, waits = [], [], [], []
    inner, core_step, chain, resolve = graphs.run_tail, engine.core.step, fused.chain, \
        runner.resolve

    def run_tail(*args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(*args)
        end.record()
        pairs.append((start, end))
        return out

    def counted():
        steps.append(1)
        return core_step()

    def counted_chain(*args):
        chained.append(1)
        return chain(*args)

    def timed_resolve(launched):
        start = time.perf_counter()
        out = resolve(launched)
        waits.append(time.perf_counter() - start)
        return out
    graphs.run_tail, engine.core.step, fused.chain = run_tail, counted, counted_chain
    runner.resolve = timed_resolve
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate_batch(prompts, seeded(params, len(prompts)))
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    graphs.run_tail, engine.core.step, fused.chain = inner, core_step, chain
    del runner.resolve
    graph_ms = [a.elapsed_time(b) for a, b in pairs]
    return {"timed_wall_us_per_step": wall / len(steps) * 1e6, "graph_steps": len(pairs),
            "graph_us_per_graph_step": sum(graph_ms) / max(1, len(pairs)) * 1e3,
            "chained_steps": len(chained),
            "resolve_wait_us_per_step": sum(waits) / len(steps) * 1e6}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="sequences end at EOS (as rollouts do) instead of at --max-tokens")
    args = parser.parse_args(argv)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    pool, _ = load_prompts(args.model_dir, None, "{a}{op}{b}=")
    batches = [int(b) for b in args.batches.split(",")]
    report = {"device": torch.cuda.get_device_name(), "k": args.k, "cases": []}
    for k in (0, args.k):
        engine = RolloutEngine(args.model_dir, show_progress=False, num_speculative_tokens=k,
                               max_num_seqs=max(batches))
        for batch in batches:
            for temperature in map(float, args.temperatures.split(",")):
                params = SamplingParams(temperature=temperature, seed=0,
                                        ignore_eos=not args.stop_at_eos,
                                        max_tokens=args.max_tokens)
                prompts = batch_prompts(pool, batch, vocab, 32)
                case = profiled_run(engine, prompts, params, args.top)
                if k and engine.core.runner.graphs is not None:
                    case.update(timed_run(engine, prompts, params))
                case.update(k=k, batch=batch, temperature=temperature)
                report["cases"].append(case)
                _print(case)
        del engine
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "spec_step_profile.json"), "w") as f:
        json.dump(report, f, indent=2)


def _print(case: dict) -> None:
    print(f"\nk={case['k']} batch={case['batch']} t={case['temperature']}: "
          f"{case['tok_s']:.0f} tok/s, {case['tokens_per_step']:.2f} tok/step, "
          f"wall {case['wall_us_per_step']:.0f} us/step, GPU {case['gpu_us_per_step']:.0f}")
    if "graph_steps" in case:
        print(f"  unprofiled: wall {case['timed_wall_us_per_step']:.0f} us/step; "
              f"{case['graph_steps']} graph steps, {case['graph_us_per_graph_step']:.0f} us "
              f"of GPU each (replay); {case['chained_steps']} chained; host waited "
              f"{case['resolve_wait_us_per_step']:.0f} us/step in resolve")
    for name, us in case["top_kernels_us_per_step"]:
        print(f"  {us:8.1f} us  {name}")


if __name__ == "__main__":
    main()
