"""Decode speed with and without MTP speculation, and draft acceptance per position.

    python scripts/bench_speculative.py MODEL_DIR_WITH_MTP [--k 3] [--batches 1,16,64]
        [--eager-too] [--prompts-file FILE] [--single-prompts 8] [--stop-at-eos]
        [--seed-sets 4]

For each batch size and temperature (0 and 1): output tokens per second of the same
prompts through an engine without speculation and one with k drafts per step, the
speedup, and the acceptance of each draft position. On CUDA both engines replay CUDA
graphs (decode resp. verify steps); --eager-too also times both with enforce_eager.

Prompts: --prompts-file (one text prompt per line, or JSON lines each a list of token ids
or {"prompt": text} / {"prompt_ids": [...]}), else arithmetic problems
(atom_rollout.rl.tasks) through the model's tokenizer, else (no tokenizer) random token
ids, on which acceptance means little. Prompts repeat to fill a batch. Batch 1 runs
--single-prompts different prompts one after another and reports their tokens over
their summed time: one prompt's acceptance is one trajectory's (--single-prompts 1: the
first prompt alone, as before 2026-11-27). Sequences run to --max-tokens (ignore_eos)
unless --stop-at-eos, which ends them at EOS as rollouts end; sampled rows then run
--seed-sets sets of per-prompt seeds (each engine draws different outputs, whose
lengths differ: more draws average that out). Each batch (each prompt at
batch 1) is timed best of 2 after a short warm-up, the engines side by side taking turns
(since 2026-11-27; before, all of one engine's runs came before the other's, so the
machine's drift between the two phases reached the ratios). Prints a table; writes
JSON to $OUT.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time

import torch

from atom_rollout import RolloutEngine, SamplingParams

ENGINES = [("plain", 0, False), ("spec", None, False)]  # (name, k (None: --k), eager)


def seeded(params: SamplingParams, count: int, first_seed: int = 0) -> list[SamplingParams]:
    """params for each of count prompts, seeded first_seed, first_seed + 1, ...: rows
    sharing a seed share their noise, and a batch of t = 1 samples would then be one
    correlated draw instead of count independent ones."""
    return [dataclasses.replace(params, seed=first_seed + row) for row in range(count)]


def _best_runs(engines: dict, prompts, params, first_seed: int) -> dict:
    """{name: (tokens, seconds)} of each engine's best of 2 runs of the prompts; the
    engines take turns (plain, spec, plain, spec), so drift of the machine between runs
    reaches both alike."""
    warm = SamplingParams(temperature=params.temperature, max_tokens=min(8, params.max_tokens),
                          ignore_eos=True, seed=0)
    for engine in engines.values():
        engine.generate_batch(prompts, warm)  # compiles every kernel shape of this batch
    best = {name: (0, float("inf")) for name in engines}
    for _ in range(2):  # the first full run may still meet a new kernel shape
        for name, engine in engines.items():
            if engine.core.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs = engine.generate_batch(prompts, seeded(params, len(prompts), first_seed))
            run = (sum(len(s.token_ids) for o in outs for s in o.samples),
                   time.perf_counter() - start)
            best[name] = min(best[name], run, key=lambda r: r[1] / max(1, r[0]))
    return best


def load_prompts(model_dir: str, path: str | None,
                 template: str) -> tuple[list[list[int]] | None, str]:
    """Token-id prompts and where they came from; None when there is no source."""
    tokenizer = _tokenizer(model_dir)
    if path:
        return _file_prompts(path, tokenizer), f"file {os.path.basename(path)}"
    if tokenizer is None:
        return None, "random token ids (no tokenizer: acceptance is not meaningful)"
    from atom_rollout.rl.rollout import encode_prompt
    from atom_rollout.rl.tasks import TaskConfig, arithmetic_rows
    rows = arithmetic_rows(TaskConfig(num=256, template=template, seed=3))
    return [encode_prompt(tokenizer, row["prompt"]) for row in rows], "arithmetic (rl.tasks)"


def _tokenizer(model_dir: str):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(model_dir, n)) for n in names):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def _file_prompts(path: str, tokenizer) -> list[list[int]]:
    from atom_rollout.rl.rollout import encode_prompt
    prompts = []
    with open(path) as f:
        for line in filter(str.strip, f):
            item = json.loads(line) if path.endswith(".jsonl") else line.rstrip("\n")
            if isinstance(item, dict):
                item = item.get("prompt_ids", item.get("prompt"))
            if isinstance(item, str):
                if tokenizer is None:
                    raise SystemExit(f"{path}: text prompts need a tokenizer in the model dir")
                item = encode_prompt(tokenizer, item)
            prompts.append([int(t) for t in item])
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def batch_prompts(pool, batch: int, vocab: int, length: int) -> list[list[int]]:
    if pool is None:
        gen = torch.Generator().manual_seed(batch)
        return torch.randint(3, vocab, (batch, length), generator=gen).tolist()
    return [pool[i % len(pool)] for i in range(batch)]


def prompt_groups(pool, batch: int, vocab: int, single: int) -> list[list[list[int]]]:
    """One batch of prompts, or at batch 1 ``single`` one-prompt batches."""
    if batch != 1 or pool is None:
        return [batch_prompts(pool, batch, vocab, 32)]
    return [[pool[i % len(pool)]] for i in range(single)]


def bench_engines(args, specs, cases) -> dict[str, list[dict]]:
    """tok/s (and acceptance) of every engine over every (batch, temperature, prompts);
    the engines live side by side (each with its share of GPU memory) and take turns."""
    batch_max = max(batch for batch, _, _ in cases)
    engines = {name: RolloutEngine(args.model_dir, device=args.device, show_progress=False,
                                   num_speculative_tokens=k, enforce_eager=eager,
                                   max_num_seqs=batch_max,
                                   gpu_memory_utilization=0.9 * (index + 1) / len(specs))
               for index, (name, k, eager) in enumerate(specs)}
    results = {name: [] for name in engines}
    for batch, temperature, groups in cases:
        longest = max(len(p) for prompts in groups for p in prompts)
        model_len = next(iter(engines.values())).core.max_model_len
        params = SamplingParams(temperature=temperature, ignore_eos=not args.stop_at_eos,
                                max_tokens=min(args.max_tokens, model_len - longest - 1))
        before = {name: (e.core.drafts_proposed, list(e.core.drafts_accepted_at))
                  for name, e in engines.items()}
        sets = args.seed_sets if temperature > 0 and args.stop_at_eos else 1
        runs = [prompts for _ in range(sets) for prompts in groups]
        totals = {name: [0, 0.0] for name in engines}
        for index, prompts in enumerate(runs):
            for name, (tokens, seconds) in _best_runs(engines, prompts, params,
                                                      index * len(prompts)).items():
                totals[name][0] += tokens
                totals[name][1] += seconds
        for name, engine in engines.items():
            core, k = engine.core, max(1, engine.core.num_draft)
            rounds = max(1, (core.drafts_proposed - before[name][0]) // k)
            results[name].append({"tok_s": totals[name][0] / totals[name][1], "acceptance": [
                (a - b) / rounds for a, b in zip(core.drafts_accepted_at, before[name][1])]})
    del engines
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eager-too", action="store_true",
                        help="also time both engines with enforce_eager (no CUDA graphs)")
    parser.add_argument("--prompts-file", default=None)
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="sequences end at EOS (as rollouts do) instead of at --max-tokens")
    parser.add_argument("--seed-sets", type=int, default=4,
                        help="with --stop-at-eos, sampled rows run this many seed sets")
    parser.add_argument("--single-prompts", type=int, default=8,
                        help="batch 1: this many prompts, one after another")
    parser.add_argument("--template", default="{a}{op}{b}=",
                        help="arithmetic prompt template (rl.tasks) when no file is given")
    args = parser.parse_args(argv)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    pool, source = load_prompts(args.model_dir, args.prompts_file, args.template)
    cases = [(batch, temperature, prompt_groups(pool, batch, vocab, args.single_prompts))
             for batch in map(int, args.batches.split(",")) for temperature in (0.0, 1.0)]
    engines = ENGINES + ([("plain_eager", 0, True), ("spec_eager", None, True)]
                         if args.eager_too else [])
    timings = bench_engines(args, [(name, args.k if k is None else k, eager)
                                   for name, k, eager in engines], cases)
    rows = [_row(i, batch, temperature, timings) for i, (batch, temperature, _)
            in enumerate(cases)]
    device = torch.cuda.get_device_name() if _on_cuda(args.device) else "cpu"
    report = {"device": device, "k": args.k, "prompts": source, "rows": rows}
    with open(os.path.join(os.environ.get("OUT", "."), "speculative.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_table(report, args.eager_too)


def _row(i: int, batch: int, temperature: float, timings: dict) -> dict:
    row = {"batch": batch, "temperature": temperature,
           "plain_tok_s": timings["plain"][i]["tok_s"], "spec_tok_s": timings["spec"][i]["tok_s"],
           "acceptance": timings["spec"][i]["acceptance"]}
    row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
    if "spec_eager" in timings:
        row["plain_eager_tok_s"] = timings["plain_eager"][i]["tok_s"]
        row["spec_eager_tok_s"] = timings["spec_eager"][i]["tok_s"]
        row["speedup_eager"] = row["spec_eager_tok_s"] / row["plain_eager_tok_s"]
    return row


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def print_table(report: dict, eager_too: bool) -> None:
    print(f"\nMTP speculation, k={report['k']}, {report['device']}, prompts: {report['prompts']}")
    eager_head = f" {'plain eager':>12} {'spec eager':>11} {'speedup':>8}" if eager_too else ""
    print(f"{'batch':>6} {'temp':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8}"
          f"{eager_head}  acceptance by position")
    for r in report["rows"]:
        eager = (f" {r['plain_eager_tok_s']:>12.0f} {r['spec_eager_tok_s']:>11.0f} "
                 f"{r['speedup_eager']:>7.2f}x" if eager_too else "")
        print(f"{r['batch']:>6} {r['temperature']:>5.1f} {r['plain_tok_s']:>12.0f} "
              f"{r['spec_tok_s']:>11.0f} {r['speedup']:>7.2f}x{eager}  "
              + " ".join(f"{a:.2f}" for a in r["acceptance"]))


if __name__ == "__main__":
    main()
