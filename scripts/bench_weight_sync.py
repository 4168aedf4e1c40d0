"""Benchmark the weight-sync transport: trainer on GPU 0 -> engine on GPU 1 over NCCL.

Models are named bf16 tensors with the real parameter shapes of Qwen3-0.6B and
Qwen3-8B. Per model, all timed on the receiver's host clock after a barrier:
  raw_big      one NCCL broadcast of the update's total bytes (the baseline)
  raw_buckets  the same bytes as bucket-sized broadcasts
  e2e          WeightSender.send -> WeightReceiver.receive -> apply (copy every tensor
               into a preallocated destination of the same shape, as the engine will)
  e2e_overlap  the same, applying each bucket as it lands (receive's on_bucket hook)
  engine       into a RolloutEngine (name mapping onto fused parameters, NaN check,
               version, cache reset): receive_weights(), which writes each bucket as it
               lands and undoes it on failure; "staged" = receive all, then update_weights
and the parts: pack (sender, alone), wire (receive, header published -> last bucket
in), apply (receiver, alone). Medians over --iters after --warmup.

    python scripts/bench_weight_sync.py                 # 2 GPUs, NCCL
    python scripts/bench_weight_sync.py --smoke         # CPU, Gloo, tiny model
Writes $OUT/weight_sync.json (OUT defaults to the current directory).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atom_rollout.weight_sync import (WeightReceiver, WeightSender,  # noqa: E402
                                      pack_bucket, plan_buckets)

MODELS = {
    "qwen3-0.6b": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                       inter=3072, vocab=151936, tied=True),
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128,
                     inter=12288, vocab=151936, tied=False),
    "tiny": dict(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, inter=384,
                 vocab=2048, tied=True),  # atom_rollout.bench.models' "tiny"
}


def qwen3_shapes(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 inter: int, vocab: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "self_attn.q_norm.weight", (head_dim,)),
                   (p + "self_attn.k_norm.weight", (head_dim,)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def random_tensors(shapes, device: torch.device, seed: int):
    """Deterministic per (seed, order), so the receiver can regenerate and verify."""
    g = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes:
        yield name, torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(
            generator=g)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


class Timer:
    """Runs `step` warmup + iters times, each after a group barrier, on both ranks."""

    def __init__(self, endpoint, device: torch.device, warmup: int, iters: int):
        self.group = endpoint._group  # the transport's own group: same comm as updates
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, step) -> list[float]:
        samples = []
        for i in range(self.warmup + self.iters):
            sync(self.device)
            self.group.barrier(time.monotonic() + 60)
            t0 = time.perf_counter()
            step()
            sync(self.device)
            if i >= self.warmup:
                samples.append(time.perf_counter() - t0)
        return samples


def raw_broadcast(group, buf: torch.Tensor, chunk: int | None) -> None:
    deadline = time.monotonic() + 120
    chunks = [buf] if chunk is None else list(buf.split(chunk))
    group.finish([group.broadcast(c, deadline) for c in chunks], deadline)


def trainer(args, port: int, results) -> None:
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if args.smoke:
        torch.set_num_threads(1)  # two CPU processes must not fight over OpenMP spinners
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sender = WeightSender("127.0.0.1", port, 2, backend=args.backend,
                          bucket_bytes=args.bucket_mib * 2**20, device=device, timeout_s=120)
    timer = Timer(sender, device, args.warmup, args.iters)
    out = {}
    for model in args.models:
        named = list(random_tensors(qwen3_shapes(**MODELS[model]), device, seed=0))
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
        timer(lambda: raw_broadcast(sender._group, raw, None))
        timer(lambda: raw_broadcast(sender._group, raw, sender.bucket_bytes))
        del raw
        out[model] = {"pack_ms": median_ms(timer(lambda: pack_only(sender, named))),
                      "send_ms": median_ms(timer(lambda: sender.send(named, version=1)))}
        timer(lambda: sender.send(named, version=2))  # e2e_overlap
        sender.send(named, version=3)  # verified by the receiver
        timer(lambda: sender.send(named, version=4))  # into a real engine, staged
        timer(lambda: sender.send(named, version=5))  # into a real engine, streamed
        del named
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.put(("trainer", out))
    sender.close()


def pack_only(sender: WeightSender, named) -> None:
    plan = plan_buckets(named, sender.bucket_bytes)
    tensors = [t for _, t in named]
    staging = torch.empty(sender.bucket_bytes, dtype=torch.uint8, device=sender.device)
    for i, spec in enumerate(plan.buckets):
        if len(plan.members(i)) > 1:  # single-tensor buckets are sent in place
            pack_bucket(plan, i, tensors, out=staging[:spec.nbytes].view(spec.dtype))


def engine(args, port: int, results) -> None:
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 1)
    if args.smoke:
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    recv = WeightReceiver("127.0.0.1", port, 1, 2, backend=args.backend, device=device,
                          timeout_s=120)
    timer = Timer(recv, device, args.warmup, args.iters)
    out = {}
    for model in args.models:
        shapes = qwen3_shapes(**MODELS[model])
        out[model] = engine_model(recv, timer, shapes, device, args.bucket_mib * 2**20, model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.put(("engine", out))
    recv.close()


def engine_model(recv: WeightReceiver, timer: Timer, shapes, device,
                 bucket_bytes: int, model: str) -> dict:
    dest = {n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in shapes}
    nbytes = sum(t.numel() * t.element_size() for t in dest.values())
    raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
    r = {"bytes": nbytes, "tensors": len(shapes)}
    r["raw_big_ms"] = median_ms(timer(lambda: raw_broadcast(recv._group, raw, None)))
    r["raw_buckets_ms"] = median_ms(timer(lambda: raw_broadcast(recv._group, raw,
                                                                bucket_bytes)))
    del raw
    timer(lambda: None)  # the trainer's pack-only step
    parts = {"apply": [], "header": [], "wire": []}

    def e2e() -> None:
        update = recv.receive()
        t0 = time.perf_counter()
        apply(update.named_tensors, dest)
        sync(device)
        parts["apply"].append(time.perf_counter() - t0)
        parts["header"].append(update.header_wait_s)
        parts["wire"].append(update.wire_s)
        r["buckets"] = update.num_buckets

    r["e2e_ms"] = median_ms(timer(e2e))
    for k, v in parts.items():
        r[k + "_ms"] = median_ms(v[-timer.iters:])
    r["e2e_overlap_ms"] = median_ms(timer(
        lambda: recv.receive(on_bucket=lambda i, views: apply(views, dest))))
    update = recv.receive()
    apply(update.named_tensors, dest)
    r["verified"] = verify(dest, shapes, device)
    del dest
    r.update(engine_apply(recv, timer, model, device))
    return r


def engine_apply(recv: WeightReceiver, timer: Timer, model: str, device) -> dict:
    """End to end into a RolloutEngine: receive, then engine.update_weights (name
    mapping onto fused params, shape and NaN checks, version bump, cache reset)."""
    from atom_rollout import RolloutEngine
    from atom_rollout.bench.models import config_dir
    engine = RolloutEngine(config_dir(model), load_format="dummy", device=str(device),
                           dtype="bfloat16", enforce_eager=True, max_model_len=1024,
                           num_kv_blocks=128, show_progress=False)
    applies = []

    def receive_and_update() -> None:
        update = recv.receive()
        t0 = time.perf_counter()
        engine.update_weights(update.named_tensors, version=update.version)
        sync(device)
        applies.append(time.perf_counter() - t0)

    out = {"e2e_engine_staged_ms": median_ms(timer(receive_and_update)),
           "engine_apply_ms": median_ms(applies[-timer.iters:])}
    engine.core.weight_broadcast.receiver = recv  # the group this benchmark already joined
    out["e2e_engine_ms"] = median_ms(timer(lambda: engine.receive_weights()))
    out["engine_version"] = engine.weight_version
    out["engine_verified"] = engine_holds(engine, qwen3_shapes(**MODELS[model]), device)
    engine.core.weight_broadcast.receiver = None
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def engine_holds(engine, shapes, device) -> bool:
    weights = engine.core.weight_map
    return all(torch.equal(weights.targets[weights.resolve(n)].view(), t)
               for n, t in random_tensors(shapes, device, seed=0))


def apply(views: list[tuple[str, torch.Tensor]], dest: dict) -> None:
    torch._foreach_copy_([dest[n] for n, _ in views], [v for _, v in views])


def verify(dest: dict, shapes, device) -> bool:
    return all(torch.equal(dest[n], t) for n, t in random_tensors(shapes, device, seed=0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(trainer_out: dict, engine_out: dict) -> dict:
    rows = {}
    for model, e in engine_out.items():
        gb = e["bytes"] / 1e9
        row = dict(e, **trainer_out[model])
        for k in ("raw_big", "raw_buckets", "e2e", "e2e_overlap", "wire"):
            row[k + "_gbps"] = gb / (row[k + "_ms"] / 1e3)
        row["e2e_pct_of_raw"] = 100 * row["raw_big_ms"] / row["e2e_ms"]
        row["e2e_overlap_pct_of_raw"] = 100 * row["raw_big_ms"] / row["e2e_overlap_ms"]
        row["e2e_engine_pct_of_raw"] = 100 * row["raw_big_ms"] / row["e2e_engine_ms"]
        row["e2e_engine_staged_pct_of_raw"] = (100 * row["raw_big_ms"]
                                               / row["e2e_engine_staged_ms"])
        rows[model] = row
    return rows


def print_table(rows: dict) -> None:
    cols = [("model", "{}"), ("GB", "{:.2f}"), ("raw ms", "{:.2f}"), ("raw GB/s", "{:.0f}"),
            ("rawbkt ms", "{:.2f}"), ("pack ms", "{:.2f}"), ("wire ms", "{:.2f}"),
            ("apply ms", "{:.2f}"), ("e2e ms", "{:.2f}"), ("e2e %", "{:.0f}"),
            ("ovl ms", "{:.2f}"), ("ovl %", "{:.0f}"), ("staged ms", "{:.2f}"),
            ("stg apply", "{:.2f}"), ("engine ms", "{:.2f}"), ("engine %", "{:.0f}"),
            ("ok", "{}")]
    print("  ".join(f"{c:>10}" for c, _ in cols))
    for model, r in rows.items():
        vals = [model, r["bytes"] / 1e9, r["raw_big_ms"], r["raw_big_gbps"],
                r["raw_buckets_ms"], r["pack_ms"], r["wire_ms"], r["apply_ms"], r["e2e_ms"],
                r["e2e_pct_of_raw"], r["e2e_overlap_ms"], r["e2e_overlap_pct_of_raw"],
                r["e2e_engine_staged_ms"], r["engine_apply_ms"], r["e2e_engine_ms"],
                r["e2e_engine_pct_of_raw"], r["verified"] and r["engine_verified"]]
        print("  ".join(f"{f.format(v):>10}" for (_, f), v in zip(cols, vals)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU + Gloo, tiny model")
    ap.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    ap.add_argument("--bucket-mib", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    args.backend = "gloo" if args.smoke else "nccl"
    args.models = (args.models or ("tiny" if args.smoke else "qwen3-0.6b,qwen3-8b")).split(",")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.iters = args.iters if args.iters is not None else (2 if args.smoke else 10)
    if not args.smoke and torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs (or --smoke for CPU)")
    rows = run(args)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"backend": args.backend, "bucket_mib": args.bucket_mib, "warmup": args.warmup,
            "iters": args.iters, "torch": torch.__version__,
            "devices": [torch.cuda.get_device_name(i) for i in range(2)]
            if not args.smoke else ["cpu"]}
    (out_dir / "weight_sync.json").write_text(json.dumps({"meta": meta, "models": rows},
                                                         indent=2))
    print(f"\n{args.backend}, {args.bucket_mib} MiB buckets, median of {args.iters} "
          f"(e2e % = raw one-buffer broadcast time / e2e time; ovl = apply per bucket)")
    print_table(rows)


def run(args) -> dict:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=f, args=(args, port, results), daemon=True)
             for f in (trainer, engine)]
    for p in procs:
        p.start()
    got = {}
    while len(got) < len(procs):
        try:
            role, out = results.get(timeout=5)
            got[role] = out
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                sys.exit(f"a benchmark process failed: exit codes "
                         f"{[p.exitcode for p in procs]}")
    for p in procs:
        p.join(60)
    return summarize(got["trainer"], got["engine"])


if __name__ == "__main__":
    main()
