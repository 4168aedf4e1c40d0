"""Run the prompts of one HTTP request as engine requests: all at once, or merged streams.
Whatever ends the HTTP request early (error, client gone) cancels, hence aborts, the rest."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request

from ..engine.async_engine import AsyncRolloutEngine
from ..engine.outputs import RolloutOutput
from ..engine.protocol import SampleDelta
from ..sampler import SamplingParams


class ClientDisconnected(Exception):
    pass


async def generate_all(engine: AsyncRolloutEngine, prompts: list[list[int]],
                       params: SamplingParams) -> list[RolloutOutput]:
    tasks = [asyncio.ensure_future(engine.generate(ids, params)) for ids in prompts]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def stream_all(engine: AsyncRolloutEngine, prompts: list[list[int]],
                     params: SamplingParams) -> AsyncIterator[tuple[int, SampleDelta]]:
    """(prompt index, delta) pairs in arrival order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int]) -> None:
        try:
            async for delta in engine.stream(ids, params):
                queue.put_nowait((index, delta))
        except Exception as e:
            queue.put_nowait((index, e))
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, ids)) for i, ids in enumerate(prompts)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(request: Request, awaitable):
    """Await ``awaitable`` unless the HTTP client goes away first (then cancel it)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        raise ClientDisconnected()
    finally:
        work.cancel()
        watch.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
