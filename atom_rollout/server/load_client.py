"""A small HTTP load generator for /v1/completions (used by scripts/load_test.py and tests)."""
from __future__ import annotations

import asyncio
import itertools
import random
import time

import httpx


async def run_load(url: str, num_requests: int, concurrency: int, max_tokens: int = 8,
                   vocab_size: int = 64, prompt_len: int = 8, seed: int = 0) -> dict:
    """``num_requests`` completions from ``concurrency`` clients; every answer is checked."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(prompt_len)]
               for _ in range(num_requests)]
    counter = itertools.count()
    latencies, errors, tokens = [], [], [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        while (i := next(counter)) < num_requests:
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/completions", json={
                    "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 1.0})
                choice = response.json()["choices"][0] if response.status_code == 200 else None
                if choice is None or not choice["token_ids"]:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    tokens[0] += len(choice["token_ids"])
            except Exception as e:  # counted, not raised: the report says how many failed
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    latencies.sort()
    return {"requests": num_requests, "concurrency": concurrency, "errors": len(errors),
            "first_errors": errors[:3], "seconds": seconds,
            "requests_per_s": num_requests / seconds, "output_tokens": tokens[0],
            "output_tok_per_s": tokens[0] / seconds,
            "latency_p50_s": latencies[len(latencies) // 2],
            "latency_p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}
