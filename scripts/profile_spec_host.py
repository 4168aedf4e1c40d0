"""Host (Python) time per speculative (MTP) step, with the model's math stubbed out.

Like profile_host.py, but for an engine with k MTP drafts: a CPU engine whose target
forward, LM head and MTP layer cost (almost) nothing, and whose verify steps go through
DecodeGraphs' static-buffer path (run eagerly on CPU) as on a GPU. What is left is the
bookkeeping the GPU cannot overlap. Requests: prompts of ~500 tokens, one sample each,
temperature 0.6, ignore_eos. The stub logits are one shared row plus per-row noise, so
drafts are partly accepted; the acceptance seen is printed with the times.

Phases (thread CPU time, best of --repeat runs): schedule, prepare (the runner's inputs),
forward (graph-path glue around the stub), verify (target logits, processing, rejection
sampling, the readback), catch_up (MTP rows of newly known tokens), draft (the k draft
draws and k - 1 chained MTP steps, the second readback), speculate (the runner's glue
around verify/propose), fused (the one-graph speculative step's host side, see
engine/fused_speculation.py), tail (its graph's work, run eagerly here: on a GPU one
replay), postprocess (EngineCore._postprocess), other (the rest).
"uploads" counts host->device copies a GPU run would make per step (on CPU they are
free, on a GPU each costs ~5-15 us of host time: pinning plus the copy launch).

  PYTHONPATH=. python scripts/profile_spec_host.py              # batch 1 and 64, k = 3
  PYTHONPATH=. python scripts/profile_spec_host.py --batch 1 --cprofile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
import time

import torch
from torch import nn

from atom_rollout import RolloutEngine
from atom_rollout.bench.models import config_dir
from atom_rollout.engine import fused_speculation, model_runner, speculation
from atom_rollout.engine.cuda_graphs import DecodeGraphs
from profile_host import PhaseTimer, add_requests

PHASES = ("schedule", "prepare", "forward", "verify", "catch_up", "draft", "speculate",
          "fused", "tail", "postprocess")


class StubTarget:
    """The decoder: free forward, logits = a shared row plus per-row noise."""

    def __init__(self, vocab: int, max_rows: int, noise: float):
        generator = torch.Generator().manual_seed(0)
        base = torch.randn(1, vocab, generator=generator) * 3
        self.logits = base + noise * torch.randn(max_rows, vocab, generator=generator)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(4096, 1)  # prompt ids reach 2000
        self.cos_sin = None

    def __call__(self, ops, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor, as_float32: bool = True) -> torch.Tensor:
        return self.logits[:hidden.shape[0]]


class StubMTPLayer(nn.Module):
    """The MTP layer: a module call that returns hidden rows without math."""

    def forward(self, ops, previous, embeds, positions, cos_sin, kv_cache, meta):
        return torch.zeros(embeds.shape[0], 1)


def build_engine(batch: int, k: int, prompt_len: int, vocab: int, noise: float,
                 root: str) -> RolloutEngine:
    path = config_dir("tiny", root)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(config_file, "w") as f:
        json.dump(config, f)
    max_model_len = prompt_len + 4096
    num_blocks = max(-(-max_model_len // 16), batch * -(-(prompt_len + 700) // 16))
    engine = RolloutEngine(path, device="cpu", dtype="bfloat16", load_format="dummy",
                           block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
                           max_model_len=max_model_len, num_kv_blocks=num_blocks,
                           kernel_backend="torch", show_progress=False,
                           num_speculative_tokens=k)
    core = engine.core
    stub = StubTarget(vocab, max(batch, 256) * (k + 1), noise)
    runner = core.runner
    runner.model = stub
    runner.speculator.model, runner.speculator.layer = stub, StubMTPLayer()
    # The GPU path: verify steps through DecodeGraphs' static buffers (eager on CPU).
    runner.graphs = DecodeGraphs(stub, core.ops, runner.kv_caches, max(batch, 1),
                                 core.max_model_len + 2 * k, 16, core.device,
                                 query_lens=(k + 1,), keep_hidden=True)
    return engine


def instrument(engine: RolloutEngine) -> PhaseTimer:
    timer, core = PhaseTimer(), engine.core
    runner, spec = core.runner, core.runner.speculator
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(runner, "_prepare", "prepare")
    timer.wrap(runner, "_graph_forward", "forward")
    timer.wrap(runner, "_eager_forward", "forward")
    timer.wrap(runner, "_speculate", "speculate", exclude=("verify", "catch_up", "draft"))
    timer.wrap(spec, "verify", "verify")
    timer.wrap(spec, "propose", "draft", exclude=("catch_up",))
    timer.wrap(spec, "_catch_up", "catch_up")
    for name in ("launch", "chain", "resolve"):
        timer.wrap(runner.fused_speculation, name, "fused", exclude=("tail",))
    timer.wrap(runner.graphs, "_forward", "tail")
    timer.wrap(core, "_postprocess", "postprocess")
    return timer


class UploadCounter:
    """Counts the host->device copies a GPU run would make (identity on CPU)."""

    def __init__(self, engine: RolloutEngine):
        self.count, self.enabled = 0, False
        runner = engine.core.runner
        for owner, name in ((runner, "_upload"), (runner.speculator, "_upload"),
                            (model_runner, "_upload_packed"), (speculation, "upload_packed"),
                            (fused_speculation, "upload_packed")):
            if hasattr(owner, name):
                self._wrap(owner, name)

    def _wrap(self, owner, name: str) -> None:
        inner = getattr(owner, name)

        def counted(host, *args, **kwargs):
            if self.enabled and (not isinstance(host, torch.Tensor) or host.device.type == "cpu"):
                self.count += 1
            return inner(host, *args, **kwargs)
        setattr(owner, name, counted)


def measure(batch: int, k: int, steps: int, warmup: int, prompt_len: int, vocab: int,
            noise: float, profile: bool) -> tuple[dict[str, float], float, float, float]:
    """Per step: phase times (us), total (us), emitted tokens, uploads."""
    with tempfile.TemporaryDirectory() as root:
        engine = build_engine(batch, k, prompt_len, vocab, noise, root)
        add_requests(engine, batch, prompt_len, seed=batch)
        core = engine.core
        running = core.scheduler.running
        while core.scheduler.waiting or any(not s.draft_tokens for s in running):
            core.step()
        for _ in range(warmup):
            core.step()
        assert len(running) == batch and all(s.draft_tokens for s in running)
        timer, uploads = instrument(engine), UploadCounter(engine)
        tokens_before = sum(s.num_tokens for s in running)
        profiler = cProfile.Profile() if profile else None
        timer.enabled = uploads.enabled = True
        if profiler:
            profiler.enable()
        start = time.thread_time()
        for _ in range(steps):
            core.step()
        total = time.thread_time() - start
        if profiler:
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "30")))
            print(stream.getvalue())
        emitted = (sum(s.num_tokens for s in running) - tokens_before) / steps
    per_step = {p: timer.seconds[p] / steps * 1e6 for p in PHASES}
    return per_step, total / steps * 1e6, emitted, uploads.count / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--vocab", type=int, default=64, help="stub logits width")
    parser.add_argument("--noise", type=float, default=2.5,
                        help="per-row logit noise: lower means more drafts accepted")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"host microseconds (thread CPU time) per speculative step, k={args.k}, "
          f"best of {args.repeat} runs")
    print(f"{'batch':>5} {'total':>8} " + " ".join(f"{p:>11}" for p in PHASES)
          + f" {'other':>8} {'tok/step':>8} {'us/token':>8} {'uploads':>7}")
    for batch in args.batch:
        best = None
        for run in range(args.repeat):
            result = measure(batch, args.k, args.steps, args.warmup, args.prompt_len,
                             args.vocab, args.noise, args.cprofile and run == 0)
            if best is None or result[1] < best[1]:
                best = result
        phases, total, emitted, uploads = best
        other = total - sum(phases.values())
        print(f"{batch:>5} {total:>8.1f} " + " ".join(f"{phases[p]:>11.1f}" for p in PHASES)
              + f" {other:>8.1f} {emitted:>8.2f} {total / emitted:>8.1f} {uploads:>7.1f}")


if __name__ == "__main__":
    main()
