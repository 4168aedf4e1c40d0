"""Load test of `atom-rollout serve` on a tiny random model (CPU by default).

    python scripts/load_test.py [--requests 2000] [--concurrency 64] [--json load.json]

1. N completions from C concurrent HTTP clients: all must succeed, and afterwards every
   KV block must be free.
2. 100 in-flight requests whose clients hang up (time out): their blocks must be freed.
3. The engine core process is killed under load: pending requests must fail (503) within
   seconds.
Prints the results and writes JSON; exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx

from atom_rollout.bench.models import random_model_dir
from atom_rollout.server.load_client import run_load


def start_server(model_dir: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "atom_rollout.server", model_dir, "--port", "0"]
    for option in options:
        command += ["-o", option]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "http://" not in line:
        server.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return server, line.strip().split()[-1]


async def wait_all_free(http: httpx.AsyncClient, url: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = (await http.get(f"{url}/stats")).json()
        if stats["free_kv_blocks"] == stats["num_kv_blocks"] and stats["num_requests"] == 0:
            return {"all_blocks_free": True, **stats}
        if time.monotonic() > deadline:
            return {"all_blocks_free": False, **stats}
        await asyncio.sleep(0.05)


async def abort_in_flight(url: str, count: int, hang_up_after_s: float = 2.0) -> dict:
    """``count`` long requests whose clients give up (time out) while they run."""
    body = {"prompt": [1, 5, 6], "max_tokens": 1000, "ignore_eos": True}
    most_running = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=count + 1)) as http:
        async def give_up() -> bool:
            try:
                await http.post(f"{url}/v1/completions", json=body, timeout=hang_up_after_s)
            except httpx.ReadTimeout:
                return True
            return False

        async def watch() -> None:
            nonlocal most_running
            while True:
                stats = (await http.get(f"{url}/stats", timeout=10)).json()
                most_running = max(most_running, stats["num_requests"])
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        gave_up = await asyncio.gather(*(give_up() for _ in range(count)))
        watcher.cancel()
        after = await wait_all_free(http, url)
    return {"hung_up": sum(gave_up), "most_running_at_once": most_running,
            "all_blocks_free_after": after["all_blocks_free"]}


async def kill_under_load(url: str, count: int = 32) -> dict:
    body = {"prompt": [1, 5, 6], "max_tokens": 1000, "ignore_eos": True}
    limits = httpx.Limits(max_connections=count + 1)  # one more for /stats
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        pending = [asyncio.ensure_future(http.post(f"{url}/v1/completions", json=body))
                   for _ in range(count)]
        while (stats := (await http.get(f"{url}/stats")).json())["num_requests"] < count:
            await asyncio.sleep(0.02)
        os.kill(stats["pid"], signal.SIGKILL)
        start = time.monotonic()
        responses = await asyncio.gather(*pending)
        seconds = time.monotonic() - start
        health = await http.get(f"{url}/health")
    return {"pending": count, "failed_with_503": sum(r.status_code == 503 for r in responses),
            "seconds_to_fail_all": seconds, "health_status": health.status_code,
            "message": responses[0].json()["error"]["message"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model dir (default: built-in tiny)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", default="load_test.json")
    args = parser.parse_args(argv)
    model_dir = args.model or random_model_dir("tiny")
    server, url = start_server(model_dir, ["num_kv_blocks=2048", "max_model_len=2048",
                                           "max_num_seqs=128"])
    try:
        load = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_tokens,
                                    vocab_size=1000))
        load["after"] = asyncio.run(_stats_after(url))
        report = {"load": load, "abort": asyncio.run(abort_in_flight(url, 100)),
                  "kill": asyncio.run(kill_under_load(url))}
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(report, indent=2))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    ok = (load["errors"] == 0 and load["after"]["all_blocks_free"]
          and report["abort"]["all_blocks_free_after"]
          and report["abort"]["most_running_at_once"] >= 100
          and report["kill"]["failed_with_503"] == report["kill"]["pending"]
          and report["kill"]["seconds_to_fail_all"] < 5)
    print("PASS" if ok else "FAIL")
    if not ok:
        raise SystemExit(1)
    return report


async def _stats_after(url: str) -> dict:
    async with httpx.AsyncClient() as http:
        return await wait_all_free(http, url)


if __name__ == "__main__":
    main()
