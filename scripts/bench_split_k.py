"""Few-row projections in our Triton kernel against cuBLAS, and PDL, for batch-1 decode.

    python scripts/bench_split_k.py [--rows 1,4,16] [--sweep] [--models qwen3-0.6b,qwen3-8b]

Part 1, per projection (Qwen3-0.6B's o_proj 2048 -> 1024 and gated down_proj
2 x 3072 -> 1024, each followed by the residual add and RMSNorm): a CUDA graph holding
28 of them with distinct weights (so weights stream from DRAM as in a model), time per
call for cuBLAS (``unfused_linear_add_rms_norm``) and for ``TritonOps.
linear_add_rms_norm`` (split K, the norm reduces); ``--sweep`` adds a grid of split-K
configs. Part 1b: one-row projections without a split (qkv_proj 1024 -> 4096,
gate_up_proj 1024 -> 6144), a grid of tiles against cuBLAS. Part 2: Qwen3-0.6B's
batch-1 decode graph (forward + LM head, random weights) replayed back to back, and the
engine's time per token, for cuBLAS / our kernels, each with and without programmatic
dependent launch (the same engine, graphs recaptured, alternating). GPU only; JSON to
$OUT/split_k.json.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atom_rollout.kernels.interface import unfused_linear_add_rms_norm  # noqa: E402
from bench_util import graph_us  # noqa: E402

LAYERS = 28
HIDDEN = 1024
STAGES = {"o_proj": (2048, False), "down_proj": (3072, True)}
WIDE = {"qkv_proj": 4096, "gate_up_proj": 6144}


def stage_inputs(rows: int, k: int, gated: bool) -> dict:
    new = dict(device="cuda", dtype=torch.bfloat16)
    return dict(x=torch.randn(rows, 2 * k if gated else k, **new),
                weights=[torch.randn(HIDDEN, k, **new) * k ** -0.5 for _ in range(LAYERS)],
                residual=torch.randn(rows, HIDDEN, **new),
                norm_weight=torch.randn(HIDDEN, **new), gated=gated)


def chain_us(ops, inputs: dict, config=None, shipped: bool = False) -> float:
    """us per projection + add + norm in a graph of LAYERS of them."""
    from atom_rollout.kernels.triton import pointwise, split_k_linear

    def run():
        for weight in inputs["weights"]:
            args = (inputs["x"], weight, inputs["residual"], inputs["norm_weight"], 1e-6)
            if config is None:
                link = ops.linear_add_rms_norm if shipped else partial(
                    unfused_linear_add_rms_norm, ops)
                link(*args, inputs["gated"])
                continue
            partials = split_k_linear.split_k_partials(inputs["x"], weight,
                                                       gated=inputs["gated"], config=config)
            pointwise.rms_norm_of_partials(partials, torch.bfloat16, inputs["norm_weight"],
                                           1e-6, inputs["residual"])
    return graph_us(run, 1, True) / LAYERS


def sweep_configs(k: int, sms: int):
    from atom_rollout.kernels.triton.split_k_linear import config_for
    for block_n, block_k, per_sm, warps in itertools.product(
            (16, 32, 64), (128, 256), (1, 2, 4), (4, 8)):
        yield config_for(HIDDEN, k, per_sm * sms, block_n, block_k, warps)


def projection_rows(ops, rows_list: list[int], sweep: bool) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for (stage, (k, gated)), rows in itertools.product(STAGES.items(), rows_list):
        inputs = stage_inputs(rows, k, gated)
        row = {"stage": stage, "rows": rows, "cublas_us": chain_us(ops, inputs),
               "shipped_us": chain_us(ops, inputs, shipped=True)}
        timings = {}
        for cfg in dict.fromkeys(sweep_configs(k, sms) if sweep else ()):
            timings[f"n{cfg.block_n}k{cfg.block_k}s{cfg.splits}w{cfg.num_warps}"] = \
                chain_us(ops, inputs, cfg)
        best = min(timings, key=timings.get, default=None)
        row.update(best=best, best_us=timings.get(best), configs=timings)
        print(f"{stage:9s} rows {rows:2d}: cuBLAS {row['cublas_us']:.2f} us, shipped "
              f"{row['shipped_us']:.2f} us, split-K sweep best {best} {row['best_us']}",
              flush=True)
        out.append(row)
    return out


def wide_rows() -> list[dict]:
    """One-row projections with enough output tiles not to split: cuBLAS vs one split."""
    from atom_rollout.kernels.triton.split_k_linear import SplitKConfig, split_k_partials
    out = []
    new = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, HIDDEN, **new)
    for stage, n_out in WIDE.items():
        weights = [torch.randn(n_out, HIDDEN, **new) for _ in range(LAYERS)]
        row = {"stage": stage, "rows": 1, "cublas_us": graph_us(
            lambda: [torch.nn.functional.linear(x, w) for w in weights], 1, True) / LAYERS}
        timings = {}
        for block_n, block_k, warps in itertools.product((4, 8, 16), (256, 512, 1024),
                                                         (2, 4, 8)):
            cfg = SplitKConfig(block_n, block_k, 1, warps)
            timings[f"n{block_n}k{block_k}w{warps}"] = graph_us(
                lambda: [split_k_partials(x, w, config=cfg, out_dtype=torch.bfloat16)
                         for w in weights], 1, True) / LAYERS
        best = min(timings, key=timings.get)
        row.update(best=best, best_us=timings[best], configs=timings)
        print(f"{stage:12s} rows 1: cuBLAS {row['cublas_us']:.2f} us, one split best {best} "
              f"{row['best_us']:.2f} us", flush=True)
        out.append(row)
    return out


MODEL_SETTINGS = {  # TritonOps attributes per variant of the decode graph
    "cublas": dict(split_k_max_rows=0, one_row_linear=False, pdl=False),
    "cublas+pdl": dict(split_k_max_rows=0, one_row_linear=False, pdl=True),
    "ours": dict(split_k_max_rows=16, one_row_linear=True, pdl=False),
    "ours+pdl": dict(split_k_max_rows=16, one_row_linear=True, pdl=True),
    "ours+pdl/4splits": dict(split_k_max_rows=16, one_row_linear=True, pdl=True,
                             max_attention_splits=4),
    "ours+pdl/8splits": dict(split_k_max_rows=16, one_row_linear=True, pdl=True,
                             max_attention_splits=8),
}
DEFAULT_SETTINGS = dict(split_k_max_rows=16, one_row_linear=True, pdl=True, max_attention_splits=32)


def model_rows(model: str, max_model_len: int, variants: list[str],
               repeats: int = 2) -> list[dict]:
    from atom_rollout import RolloutEngine
    from atom_rollout.bench.models import config_dir
    from bench_graph_replay import engine_us_per_token
    from bench_util import replay_us
    engine = RolloutEngine(config_dir(model), load_format="dummy", show_progress=False,
                           max_num_seqs=1, cuda_graph_max_batch=1, max_model_len=max_model_len,
                           gpu_memory_utilization=0.5)
    graphs = engine.core.runner.graphs
    out = []
    for _ in range(repeats):
        for name in variants:
            settings = {**DEFAULT_SETTINGS, **MODEL_SETTINGS[name]}
            for attr, value in settings.items():
                setattr(graphs.ops, attr, value)
            graphs.recapture()
            row = {"model": model, "max_model_len": max_model_len, "variant": name,
                   **settings,
                   "graph_replay_us": replay_us(graphs.graphs[1, 1, None]),
                   "engine_us_per_token": engine_us_per_token(engine)}
            print(f"{model} (max_model_len {max_model_len}) batch 1, {name:16s}: "
                  f"graph {row['graph_replay_us']:.0f} us, "
                  f"engine {row['engine_us_per_token']:.0f} us/token", flush=True)
            out.append(row)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--models", default="qwen3-0.6b", help="'' skips part 2")
    parser.add_argument("--max-model-lens", default="1024")
    parser.add_argument("--variants", default=",".join(MODEL_SETTINGS))
    parser.add_argument("--sweep", action="store_true", help="time a grid of split-K configs")
    args = parser.parse_args(argv)
    from atom_rollout.kernels.triton import TritonOps
    report = {"device": torch.cuda.get_device_name(),
              "projections": projection_rows(TritonOps(), [int(r) for r in args.rows.split(",")],
                                             args.sweep),
              "wide": wide_rows()}
    path = os.path.join(os.environ.get("OUT", "."), "split_k.json")
    report["model"] = []
    for model, length in itertools.product(filter(None, args.models.split(",")),
                                           args.max_model_lens.split(",")):
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        report["model"] += model_rows(model, int(length), args.variants.split(","))
        gc.collect()
        torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
