"""Serving under load (a smaller run of scripts/load_test.py): every request completes,
every KV block is free afterwards, disconnects abort, a killed core fails requests fast."""
import asyncio
import os
import signal
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from server_util import running_server  # noqa: E402


@pytest.fixture(scope="module")
def served(served_checkpoint):
    from atom_rollout.engine.async_engine import AsyncRolloutEngine
    from atom_rollout.server import build_app
    engine = AsyncRolloutEngine(served_checkpoint, num_kv_blocks=512, max_num_seqs=64)
    with running_server(build_app(engine, "tiny")) as url:
        yield engine, url
    engine.shutdown()


def _stats(url):
    return httpx.get(f"{url}/stats").json()


def _wait_all_free(url, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _stats(url)
        if stats["free_kv_blocks"] == stats["num_kv_blocks"] and stats["num_requests"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_concurrent_clients_all_complete_and_free_every_block(served):
    from atom_rollout.server.load_client import run_load
    _, url = served
    report = asyncio.run(run_load(url, num_requests=300, concurrency=32, max_tokens=6,
                                  vocab_size=90))
    assert report["errors"] == 0, report["first_errors"]
    _wait_all_free(url)


def test_client_disconnects_abort_their_requests(served):
    _, url = served
    body = {"prompt": [1, 5, 6], "max_tokens": 200, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())  # one event, then hang up
    try:
        # 64 x 240 tokens take seconds even on an idle machine; the client leaves at 0.1 s
        response = httpx.post(f"{url}/v1/completions", timeout=0.1,
                              json={**body, "n": 64, "max_tokens": 240})
        pytest.fail(f"expected a timeout, got {response.status_code}: {response.text[:300]}")
    except httpx.ReadTimeout:
        pass
    _wait_all_free(url)


def test_killed_core_fails_pending_http_requests_quickly(served):
    engine, url = served

    async def go():
        async with httpx.AsyncClient(timeout=30) as http:
            pending = [asyncio.ensure_future(http.post(f"{url}/v1/completions", json={
                "prompt": [1, i + 3], "max_tokens": 240, "ignore_eos": True}))
                for i in range(16)]
            while (await http.get(f"{url}/stats")).json()["num_requests"] < 16:
                await asyncio.sleep(0.02)
            os.kill(engine.info.pid, signal.SIGKILL)
            start = time.monotonic()
            responses = await asyncio.gather(*pending)
            return responses, time.monotonic() - start, await http.get(f"{url}/health")
    responses, elapsed, health = asyncio.run(go())
    assert elapsed < 3
    assert all(r.status_code == 503 for r in responses)
    assert "engine core process died" in responses[0].json()["error"]["message"]
    assert health.status_code == 503
    after = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2]})
    assert after.status_code == 503
