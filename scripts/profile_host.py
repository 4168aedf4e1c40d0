"""Host (Python) time per decode step, with the model's math stubbed out.

The engine runs on CPU with a stub model whose forward and LM head cost
nothing, so what is left is the bookkeeping a GPU step cannot overlap:
scheduling, input preparation, sampling tensors, the sampler's op dispatch
(over a 64-token stub vocabulary), the device->host read and postprocessing.
Decode-only steps of nano-vllm-like requests (prompts of ~500 tokens, one
sample each, temperature 0.6, ignore_eos, block_size 16). Times are this
thread's CPU time (--wall for wall clock), best of --repeat runs; "forward" is
the stub plus the runner's eager-forward glue, "other" what no phase covers
(EngineCore.step itself, counting computed tokens, the timers).

  PYTHONPATH=. python scripts/profile_host.py                 # batch 1, 64, 256
  PYTHONPATH=. python scripts/profile_host.py --batch 256 --cprofile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import tempfile
import time
from collections import defaultdict

import torch

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.bench.models import config_dir

# CPU time of this thread: other processes sharing the cores do not inflate it.
clock = time.thread_time

PHASES = ("schedule", "prepare", "forward", "sampling_tensors", "sample", "to_host",
          "postprocess")


class StubModel:
    """Stands in for the decoder: free forward, fixed logits over a small vocabulary."""

    def __init__(self, vocab: int, max_rows: int):
        self.logits = torch.randn(max_rows, vocab, generator=torch.Generator().manual_seed(0))

    def __call__(self, ops, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor, as_float32: bool = True) -> torch.Tensor:
        return self.logits[:hidden.shape[0]]


class PhaseTimer:
    """Wraps methods so each call adds its time (minus nested `exclude` phases) to a phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False

    def wrap(self, owner, name: str, phase: str, exclude: tuple[str, ...] = ()) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.enabled:
                return inner(*args, **kwargs)
            nested = {p: self.seconds[p] for p in exclude}
            start = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = clock() - start
                spent -= sum(self.seconds[p] - nested[p] for p in exclude)
                self.seconds[phase] += spent
        setattr(owner, name, timed)


def build_engine(batch: int, prompt_len: int, vocab: int, root: str) -> RolloutEngine:
    max_model_len = prompt_len + 4096
    num_blocks = max(-(-max_model_len // 16), batch * -(-(prompt_len + 600) // 16))
    engine = RolloutEngine(config_dir("tiny", root), device="cpu", dtype="bfloat16",
                           load_format="dummy", block_size=16, max_num_seqs=256,
                           max_num_batched_tokens=8192, max_model_len=max_model_len,
                           num_kv_blocks=num_blocks, kernel_backend="torch",
                           show_progress=False)
    engine.core.runner.model = StubModel(vocab, max(batch, 256))
    return engine


def add_requests(engine: RolloutEngine, batch: int, prompt_len: int, seed: int) -> None:
    """nano-vllm-like: one sample per prompt, temperature 0.6, its own params object."""
    rng = random.Random(seed)
    for i in range(batch):
        length = rng.randint(prompt_len - 100, prompt_len + 100)
        prompt = [rng.randrange(2, 2000) for _ in range(length)]
        params = SamplingParams(temperature=0.6, max_tokens=4000 + i, ignore_eos=True)
        engine.core.add_request(f"r{i}", prompt, params)


def run_prefill(engine: RolloutEngine) -> None:
    core = engine.core
    while core.scheduler.waiting or any(s.num_pending_tokens > 1 for s in core.scheduler.running):
        core.step()


def instrument(engine: RolloutEngine) -> PhaseTimer:
    timer, core, runner = PhaseTimer(), engine.core, engine.core.runner
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(runner, "_prepare", "prepare", exclude=("sampling_tensors",))
    timer.wrap(runner, "_eager_forward", "forward")
    timer.wrap(runner, "_sampling_tensors", "sampling_tensors")
    # built (and uploaded with the rest) in _prepare
    timer.wrap(runner.sampling_rows, "step", "sampling_tensors")
    timer.wrap(runner, "_sample", "sample", exclude=("sampling_tensors",))
    timer.wrap(runner, "_start_copy", "to_host")  # the read-back: started, then waited for
    timer.wrap(runner, "resolve", "to_host")
    timer.wrap(core, "_postprocess", "postprocess")
    return timer


def measure(batch: int, steps: int, warmup: int, prompt_len: int, vocab: int,
            profile: bool) -> tuple[dict[str, float], float]:
    with tempfile.TemporaryDirectory() as root:
        engine = build_engine(batch, prompt_len, vocab, root)
        add_requests(engine, batch, prompt_len, seed=batch)
        run_prefill(engine)
        core = engine.core
        timer = instrument(engine)
        for _ in range(warmup):
            core.step()
        assert len(core.scheduler.running) == batch and not core.scheduler.waiting
        profiler = cProfile.Profile() if profile else None
        timer.enabled = True
        if profiler:
            profiler.enable()
        start = clock()
        for _ in range(steps):
            core.step()
        total = clock() - start
        if profiler:
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
            print(stream.getvalue())
    per_step = {p: timer.seconds[p] / steps * 1e6 for p in PHASES}
    return per_step, total / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=500)
    parser.add_argument("--vocab", type=int, default=64, help="stub logits width")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--wall", action="store_true", help="wall clock, not thread CPU time")
    args = parser.parse_args()
    if args.wall:
        global clock
        clock = time.perf_counter
    torch.set_num_threads(1)
    header = f"{'batch':>5} {'total':>8} " + " ".join(f"{p:>16}" for p in PHASES) + f" {'other':>8}"
    kind = "wall" if args.wall else "thread CPU"
    print(f"host microseconds ({kind} time) per decode step, best of {args.repeat} runs\n"
          + header)
    for batch in args.batch:
        best = None
        for run in range(args.repeat):
            phases, total = measure(batch, args.steps, args.warmup, args.prompt_len,
                                    args.vocab, args.cprofile and run == 0)
            if best is None or total < best[1]:
                best = (phases, total)
        phases, total = best
        other = total - sum(phases.values())
        print(f"{batch:>5} {total:>8.1f} " + " ".join(f"{phases[p]:>16.1f}" for p in PHASES)
              + f" {other:>8.1f}")


if __name__ == "__main__":
    main()
