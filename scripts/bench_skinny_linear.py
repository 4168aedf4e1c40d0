"""Small-batch decode projections: a chain of layers' projections as the engine runs
them (RMSNorm + qkv, o, RMSNorm + gate_up + SiLU-and-mul, down) with
  ref        Triton rms_norm / silu_and_mul + cuBLAS (F.linear), today's path;
  skinny     the fused Triton skinny linear (4 launches per layer instead of 7);
  skinny_pdl the same with programmatic dependent launch (Hopper+),
for Qwen3-0.6B (28 layers) and Qwen3-8B (36 layers) shapes, attention left out.

    python scripts/bench_skinny_linear.py            # GPU
    python scripts/bench_skinny_linear.py --smoke    # tiny shapes on CPU (interpreter)

Time per layer is from one CUDA graph holding the whole chain (weights of every layer
distinct, as in the model, so nothing stays in L2). Prints the table and writes
$OUT/skinny_linear.json (or --out). Exits 1 if a variant disagrees with ref.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import graph_us, gpu_or_smoke, json_safe, run_guarded  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    q_size: int
    kv_size: int
    intermediate: int
    layers: int


SHAPES = [Shape("0.6b", 1024, 2048, 1024, 3072, 28), Shape("8b", 4096, 4096, 1024, 12288, 36)]
SMOKE_SHAPES = [Shape("tiny", 64, 64, 32, 96, 2)]
ROWS = (1, 4, 8, 16)


def make_layers(shape: Shape, dtype, device) -> list[dict]:
    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(shape.hidden, device=device)).to(dtype)
    h = shape.hidden
    return [dict(qkv=w(shape.q_size + 2 * shape.kv_size, h), o=w(h, shape.q_size),
                 gate_up=w(2 * shape.intermediate, h), down=w(h, shape.intermediate),
                 norm1=norm(), norm2=norm()) for _ in range(shape.layers)]


def ref_chain(ops, layers, shape: Shape, x, residual):
    for layer in layers:
        h, residual = ops.rms_norm(x, layer["norm1"], 1e-6, residual)
        attn_out = F.linear(h, layer["qkv"])[:, :shape.q_size]  # stands in for attention
        x = F.linear(attn_out, layer["o"])
        h, residual = ops.rms_norm(x, layer["norm2"], 1e-6, residual)
        x = F.linear(ops.silu_and_mul(F.linear(h, layer["gate_up"])), layer["down"])
    return x, residual


def skinny_chain(sl, layers, shape: Shape, x, residual, pdl: int = 0, config=None):
    for layer in layers:
        qkv, residual = sl.skinny_linear(x, layer["qkv"], norm_weight=layer["norm1"],
                                         residual=residual, eps=1e-6, pdl=pdl, config=config)
        x = sl.skinny_linear(qkv[:, :shape.q_size], layer["o"], pdl=pdl, config=config)
        act, residual = sl.skinny_linear(x, layer["gate_up"], norm_weight=layer["norm2"],
                                         residual=residual, eps=1e-6, silu_mul=True, pdl=pdl,
                                         config=config)
        x = sl.skinny_linear(act, layer["down"], pdl=pdl, config=config)
    return x, residual


CONFIGS = {"16x256s4": (16, 256, 4, 4), "32x128s4": (32, 128, 4, 4),
           "64x256s3": (64, 256, 4, 3), "32x256w8": (32, 256, 8, 3)}
NAMES = ("ref", "skinny", "pdl_early", "pdl_late", *CONFIGS)


def projection_ops(ops, sl, shape: Shape, x, residual, act):
    """Per projection kind: (ref, skinny(config)) callables of one layer."""
    q_in = torch.zeros(x.shape[0], shape.q_size, device=x.device, dtype=x.dtype)
    return {
        "qkv": (lambda l: F.linear(ops.rms_norm(x, l["norm1"], 1e-6, residual)[0], l["qkv"]),
                lambda l, c: sl.skinny_linear(x, l["qkv"], norm_weight=l["norm1"],
                                              residual=residual, eps=1e-6, config=c)),
        "o": (lambda l: F.linear(q_in, l["o"]),
              lambda l, c: sl.skinny_linear(q_in, l["o"], config=c)),
        "gate_up": (lambda l: ops.silu_and_mul(F.linear(
                        ops.rms_norm(x, l["norm2"], 1e-6, residual)[0], l["gate_up"])),
                    lambda l, c: sl.skinny_linear(x, l["gate_up"], norm_weight=l["norm2"],
                                                  residual=residual, eps=1e-6, silu_mul=True,
                                                  config=c)),
        "down": (lambda l: F.linear(act, l["down"]),
                 lambda l, c: sl.skinny_linear(act, l["down"], config=c))}


def run_projections(shape: Shape, layers, rows: int, device) -> list[dict]:
    """Each projection kind alone, over all layers' weights: us per layer."""
    from atom_rollout.kernels.triton import TritonOps, skinny_linear as sl
    dtype = layers[0]["o"].dtype
    x = torch.randn(rows, shape.hidden, device=device).to(dtype)
    act = torch.randn(rows, shape.intermediate, device=device).to(dtype)
    table = []
    for kind, (ref, skinny) in projection_ops(TritonOps(), sl, shape, x, x.clone(),
                                              act).items():
        row = {"model": shape.name, "rows": rows, "kind": kind,
               "ref": graph_us(lambda: [ref(l) for l in layers], 1, True) / shape.layers}
        for name, cfg in {"default": None, **CONFIGS}.items():
            c = sl.SkinnyConfig(*cfg) if cfg else None
            row[name] = graph_us(lambda: [skinny(l, c) for l in layers], 1, True) / shape.layers
        print(" ".join(f"{v:>9.2f}" if isinstance(v, float) else f"{v:>9}" for v in row.values()),
              flush=True)
        table.append(row)
    return table


def run_case(shape: Shape, layers, rows: int, on_gpu: bool, device) -> dict:
    from atom_rollout.kernels.triton import TritonOps, skinny_linear as sl
    ops = TritonOps()
    dtype = layers[0]["o"].dtype
    x = torch.randn(rows, shape.hidden, device=device).to(dtype)
    residual = torch.randn(rows, shape.hidden, device=device).to(dtype)
    variants = {"ref": lambda: ref_chain(ops, layers, shape, x, residual),
                "skinny": lambda: skinny_chain(sl, layers, shape, x, residual)}
    if on_gpu and torch.cuda.get_device_capability()[0] >= 9:
        variants["pdl_early"] = lambda: skinny_chain(sl, layers, shape, x, residual, 1)
        variants["pdl_late"] = lambda: skinny_chain(sl, layers, shape, x, residual, 2)
    if on_gpu:
        for name, cfg in CONFIGS.items():
            variants[name] = lambda c=sl.SkinnyConfig(*cfg): skinny_chain(
                sl, layers, shape, x, residual, config=c)

    def measure(row: dict) -> None:
        expected = torch.cat(variants["ref"](), dim=-1).float()
        scale = expected.abs().max().item()
        for name, chain in variants.items():
            got = torch.cat(chain(), dim=-1).float()
            row[f"{name}_rel_diff"] = (got - expected).abs().max().item() / scale
            row[f"{name}_us_per_layer"] = graph_us(chain, 1, on_gpu) / shape.layers
        row["ok"] = all(row[f"{n}_rel_diff"] < 5e-2 for n in variants)
    return run_guarded({"model": shape.name, "rows": rows}, measure, _format_row)


def _format_row(row: dict) -> str:
    head = f"{row['model']:>5} {row['rows']:>4}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:90]}"
    cells = [f"{row.get(f'{n}_us_per_layer', float('nan')):9.2f}" for n in NAMES]
    diff = max(v for k, v in row.items() if k.endswith("_rel_diff"))
    return f"{head} {' '.join(cells)} {diff:9.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    on_gpu = gpu_or_smoke(parser, args.smoke)
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float16  # the interpreter's bf16 dot is wrong
    torch.manual_seed(0)
    rows, projections = [], []
    for shape in SMOKE_SHAPES if args.smoke else SHAPES:
        layers = make_layers(shape, dtype, device)
        rows += [run_case(shape, layers, m, on_gpu, device) for m in ROWS]
        if on_gpu:
            print("model rows kind ref default " + " ".join(CONFIGS))
            projections += [r for m in (1, 8) for r in run_projections(shape, layers, m, device)]
        del layers
    name = torch.cuda.get_device_name() if on_gpu else "cpu (triton interpreter)"
    print(f"\n# decode projections per layer on {name}, {dtype}: us per layer in one CUDA "
          "graph of all layers; max |diff| / max |ref|")
    print(f"{'model':>5} {'rows':>4} " + " ".join(f"{n:>9}" for n in NAMES) + " max_diff")
    for row in rows:
        print(_format_row(row))
    out = Path(args.out) / "skinny_linear.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "rows": json_safe(rows),
                                           "projections": projections}, indent=1))
    return 0 if all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
