"""RL endpoints: weight updates (from disk or a WeightSender broadcast), prefix cache,
pause/resume around updates, weight version and engine stats."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .schemas import (InitWeightSyncRequest, PauseRequest, ReceiveWeightsRequest,
                      WeightsFromDiskRequest)


def rl_router() -> APIRouter:
    router = APIRouter()

    @router.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: WeightsFromDiskRequest, request: Request):
        engine = request.app.state.engine
        try:
            version = await engine.update_weights_from_disk(
                body.path, **body.model_dump(exclude={"path"}, exclude_none=True))
        except FileNotFoundError as e:
            raise ValueError(f"path: {e}") from None
        return {"weight_version": version}

    @router.post("/init_weight_sync")
    async def init_weight_sync(body: InitWeightSyncRequest, request: Request):
        await request.app.state.engine.init_weight_sync(**body.model_dump())
        return {"status": "ok"}

    @router.post("/update_weights")
    async def update_weights(request: Request, body: ReceiveWeightsRequest | None = None):
        """Receive one update broadcast by the trainer's WeightSender."""
        timeout_s = body.timeout_s if body is not None else None
        return {"weight_version": await request.app.state.engine.receive_weights(timeout_s)}

    @router.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request):
        await request.app.state.engine.reset_prefix_cache()
        return {"status": "ok"}

    @router.post("/pause")
    async def pause(request: Request, body: PauseRequest | None = None):
        mode = body.mode if body is not None else "abort"
        await request.app.state.engine.pause(mode)
        return {"status": "paused", "mode": mode}

    @router.post("/resume")
    async def resume(request: Request):
        await request.app.state.engine.resume()
        return {"status": "running"}

    @router.get("/weight_version")
    async def weight_version(request: Request):
        return {"weight_version": await request.app.state.engine.weight_version()}

    @router.get("/stats")
    async def stats(request: Request):
        return await request.app.state.engine.stats()

    return router
