"""The engine core in its own process: same results as in-process, streaming, abort,
pause/resume, utility calls, crash handling and no orphan processes."""
import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from atom_rollout import SamplingParams
from atom_rollout.engine.async_engine import AsyncRolloutEngine, EngineDeadError

OPTIONS = dict(num_kv_blocks=512, max_num_seqs=128)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(llama):
    engine = AsyncRolloutEngine(llama[0], **OPTIONS)
    yield engine
    engine.shutdown()


async def _wait_for(engine, predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await engine.stats()
        if predicate(stats):
            return stats
        assert time.monotonic() < deadline, f"timed out waiting; stats: {stats}"
        await asyncio.sleep(0.02)


def _all_free(stats):
    return stats["free_kv_blocks"] == stats["num_kv_blocks"] and stats["num_requests"] == 0


def test_same_samples_as_in_process(engine, llama_engine):
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    params = SamplingParams(n=3, max_tokens=12, seed=11, logprobs=2, return_raw_logprobs=True)
    expected = llama_engine.generate_batch(prompts, params)

    async def both():
        return await asyncio.gather(*(engine.generate(p, params) for p in prompts))
    for want, got in zip(expected, run(both())):
        assert got.prompt_token_ids == want.prompt_token_ids
        for w, g in zip(want.samples, got.samples):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
            assert g.raw_logprobs == pytest.approx(w.raw_logprobs, abs=1e-5)
            assert [t for t, _ in g.top_logprobs[0]] == [t for t, _ in w.top_logprobs[0]]
            assert g.version_spans == w.version_spans


def test_stream_deltas_add_up_to_generate(engine):
    params = SamplingParams(n=2, max_tokens=9, seed=5, ignore_eos=True)

    async def go():
        tokens, reasons, num_deltas = {0: [], 1: []}, {}, 0
        async for delta in engine.stream([1, 4, 4], params):
            tokens[delta.sample_index] += delta.token_ids
            num_deltas += 1
            if delta.finished:
                reasons[delta.sample_index] = delta.finish_reason
        return tokens, reasons, num_deltas, await engine.generate([1, 4, 4], params)
    tokens, reasons, num_deltas, whole = run(go())
    assert num_deltas >= 9  # token by token, not one lump
    assert [tokens[j] for j in range(2)] == [s.token_ids for s in whole.samples]
    assert reasons == {0: "length", 1: "length"}


def test_score_matches_in_process(engine, llama_engine):
    prompt, response = [1, 5, 6, 7], [8, 9, 10, 11, 12]
    expected = llama_engine.score([prompt], [response], temperature=0.7)[0]
    got = run(engine.score(prompt, response, temperature=0.7))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_leaving_a_stream_early_aborts_it(engine):
    async def go():
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        async for _ in engine.stream([1, 2, 3], params):
            break
        return await _wait_for(engine, _all_free)
    run(go())


def test_abort_100_in_flight_requests_frees_their_blocks(engine):
    # as long as the checkpoint allows (256 positions): the requests must still be
    # running when the poll below sees all of them, also on a loaded machine
    params = SamplingParams(max_tokens=250, ignore_eos=True)

    async def go():
        ids = [f"victim-{i}" for i in range(100)]
        tasks = [asyncio.ensure_future(engine.generate([1, 3 + i % 50, 7], params, request_id=r))
                 for i, r in enumerate(ids)]
        await _wait_for(engine, lambda s: s["num_requests"] == 100
                        and s["free_kv_blocks"] < s["num_kv_blocks"])
        for r in ids:
            await engine.abort(r)
        outs = await asyncio.gather(*tasks)
        return outs, await _wait_for(engine, _all_free)
    outs, _ = run(go())
    assert all(o.samples[0].finish_reason == "abort" for o in outs)
    assert all(len(o.samples[0].token_ids) < 250 for o in outs)


def test_pause_keep_freezes_and_resume_continues(engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True, seed=2)

    async def go():
        reference = await engine.generate([1, 6], params)
        stream = engine.stream([1, 6], params)
        first = await stream.__anext__()
        await engine.pause("keep")
        late = asyncio.ensure_future(engine.generate([1, 8], SamplingParams(max_tokens=3)))
        frozen = await _wait_for(engine, lambda s: s["num_held_requests"] == 1)
        await asyncio.sleep(0.3)
        assert (await engine.stats())["free_kv_blocks"] == frozen["free_kv_blocks"]
        assert not late.done()
        await engine.resume()
        rest = [d async for d in stream]
        tokens = first.token_ids + [t for d in rest for t in d.token_ids]
        return reference, tokens, rest[-1], await late
    reference, tokens, last, late = run(go())
    assert tokens == reference.samples[0].token_ids and last.finish_reason == "length"
    assert late.samples[0].finish_reason in ("stop", "length")


def test_pause_abort_ends_in_flight_and_holds_new_requests(engine):
    async def go():
        running = asyncio.ensure_future(
            engine.generate([1, 5], SamplingParams(max_tokens=200, ignore_eos=True)))
        await _wait_for(engine, lambda s: s["num_requests"] == 1)
        await engine.pause("abort")
        aborted = await running
        held = asyncio.ensure_future(engine.generate([1, 5], SamplingParams(max_tokens=4)))
        await _wait_for(engine, lambda s: s["num_held_requests"] == 1)
        await engine.resume()
        return aborted, await held
    aborted, held = run(go())
    assert aborted.samples[0].finish_reason == "abort"
    assert held.samples[0].finish_reason in ("stop", "length")


def test_pause_wait_returns_once_in_flight_requests_finished(engine):
    async def go():
        running = asyncio.ensure_future(
            engine.generate([1, 5], SamplingParams(max_tokens=200, ignore_eos=True)))
        # A loaded machine may finish the request before a poll sees it in flight.
        await _wait_for(engine, lambda s: s["num_requests"] == 1 or running.done())
        await engine.pause("wait")
        assert (await engine.stats())["num_requests"] == 0  # drained before pause returned
        held = asyncio.ensure_future(engine.generate([1, 5], SamplingParams(max_tokens=2)))
        await _wait_for(engine, lambda s: s["num_held_requests"] == 1)
        await engine.resume()
        return await running, await held
    finished, held = run(go())
    assert finished.samples[0].finish_reason == "length"
    assert len(finished.samples[0].token_ids) == 200


def test_utility_calls_and_their_errors(engine, llama):
    async def go():
        with pytest.raises(AttributeError, match="no_such_method"):
            await engine.call("no_such_method")
        with pytest.raises(ValueError, match="mode"):
            await engine.pause("sometimes")
        assert await engine.call("max_model_len") == engine.max_model_len
        version = await engine.update_weights(llama[1].named_parameters())
        out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=3))
        await engine.reset_prefix_cache()
        return version, out, await engine.weight_version()
    version, out, current = run(go())
    assert version == current >= 1
    assert out.samples[0].weight_version == version


def test_bad_requests_fail_before_reaching_the_core(engine):
    async def go():
        with pytest.raises(ValueError, match="prompt"):
            await engine.generate([1, 10_000])
        with pytest.raises(ValueError, match="prompt"):
            await engine.generate([1] * 300)
        with pytest.raises(ValueError, match="params"):
            await engine.generate([1], {"n": 2})
        return await engine.generate([1, 2], SamplingParams(max_tokens=2))
    assert len(run(go()).samples[0].token_ids) <= 2


def test_killed_core_fails_pending_calls_quickly(llama):
    engine = AsyncRolloutEngine(llama[0], **OPTIONS)

    async def go():
        tasks = [asyncio.ensure_future(engine.generate(
            [1, i + 3], SamplingParams(max_tokens=200, ignore_eos=True))) for i in range(8)]
        await _wait_for(engine, lambda s: s["num_requests"] == 8)
        os.kill(engine.info.pid, signal.SIGKILL)
        start = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        elapsed = time.monotonic() - start
        with pytest.raises(EngineDeadError):
            await engine.stats()
        with pytest.raises(EngineDeadError):
            await engine.generate([1, 2])
        return results, elapsed
    try:
        results, elapsed = run(go())
    finally:
        engine.shutdown()
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert "exit code -9" in str(results[0]) and elapsed < 3


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # exited, not reaped
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _gone(pid)


def test_garbage_collection_stops_the_core(llama):
    engine = AsyncRolloutEngine(llama[0], **OPTIONS)
    pid = engine.info.pid
    del engine
    gc.collect()
    assert _wait_gone(pid)


CHILD = textwrap.dedent("""
    import sys
    from atom_rollout.engine.async_engine import AsyncRolloutEngine
    if __name__ == "__main__":
        engine = AsyncRolloutEngine(sys.argv[1], num_kv_blocks=64)
        print(engine.info.pid, flush=True)
        if sys.argv[2] == "hang":
            sys.stdin.read()
""")


@pytest.mark.parametrize("how", ["exit", "killed"])
def test_no_orphan_core_when_the_parent_exits_or_is_killed(llama, tmp_path, how):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, str(script), llama[0],
                              "hang" if how == "killed" else "exit"],
                             stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": root})
    pid = int(child.stdout.readline())
    if how == "killed":
        child.kill()
    assert child.wait(timeout=30) in (0, -signal.SIGKILL)
    assert _wait_gone(pid)
