"""Small helpers shared by the GPU scripts in this folder."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def json_safe(rows: list[dict]) -> list[dict]:
    """NaN -> None, so the rows serialise as strict JSON."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in rows]


def gpu_or_smoke(parser: argparse.ArgumentParser, smoke: bool) -> bool:
    """True on a CUDA machine; without one only --smoke may run, on Triton's CPU
    interpreter (chosen here, before triton is imported)."""
    if torch.cuda.is_available():
        return True
    if not smoke:
        parser.error("no CUDA device: only --smoke runs on CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return False


def run_guarded(row: dict, measure: Callable[[dict], None],
                format_row: Callable[[dict], str]) -> dict:
    """Fill one result row with measure(row) and print it. A failure is recorded in the
    row (ok=False, error) with its traceback, so one broken case does not hide the others."""
    try:
        measure(row)
    except Exception as exc:  # noqa: BLE001 - reported in the row and on stderr
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    print(format_row(row), flush=True)
    return row


def median_us(fn: Callable, on_gpu: bool, rep_ms: int = 200) -> float:
    """Median microseconds of eager calls: triton's do_bench on a GPU, three timed calls
    after one warm-up on CPU."""
    if on_gpu:
        import triton.testing
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def graph_us(fn: Callable, repeat: int, on_gpu: bool) -> float:
    """Median microseconds per call of a CUDA graph holding `repeat` calls; nan off GPU."""
    if not on_gpu:
        return math.nan
    fn()  # compile outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / repeat)
    return statistics.median(times)


def replay_us(graph: torch.cuda.CUDAGraph, replays: int = 200) -> float:
    """Mean microseconds per replay of an already captured graph, back to back."""
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays * 1e3


def best_generate_seconds(engine, prompts: list[list[int]], params, repeat: int = 3) -> float:
    """Fastest wall time of ``engine.generate_batch(prompts, params)`` over ``repeat`` calls
    after one warm-up call, the GPU synchronised around each."""
    engine.generate_batch(prompts, params)
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate_batch(prompts, params)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def traced(run: Callable[[], object]) -> list[dict]:
    """The chrome-trace events (host and device) of run() under torch.profiler."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        return json.load(f)["traceEvents"]
