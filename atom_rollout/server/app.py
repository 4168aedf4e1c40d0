"""The FastAPI app: OpenAI-compatible generation plus the RL endpoints."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..engine.async_engine import AsyncRolloutEngine
from .chat import create_chat_completion
from .completions import create_completion
from .errors import error_response, install_handlers
from .fanout import ClientDisconnected
from .rl_routes import rl_router
from .schemas import ChatRequest, CompletionRequest


def build_app(engine: AsyncRolloutEngine, model_name: str, owns_engine: bool = False) -> FastAPI:
    """``owns_engine``: shut the engine down when the app stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_engine:
            engine.shutdown()

    app = FastAPI(title="atom-rollout", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    install_handlers(app)
    app.include_router(rl_router())
    _openai_routes(app, engine, model_name)
    return app


def _openai_routes(app: FastAPI, engine: AsyncRolloutEngine, model: str) -> None:
    tokenizer = _optional_tokenizer(engine)

    @app.get("/health")
    async def health():
        if not engine.is_alive():
            return error_response(503, str(engine.client.error), "engine_dead")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": int(time.time()),
            "owned_by": "atom-rollout", "root": engine.config.model_dir,
            "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _disconnect_as_499(create_completion(engine, model, body, request,
                                                          tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _disconnect_as_499(create_chat_completion(engine, model, body, request))


async def _disconnect_as_499(awaitable):
    try:
        return await awaitable
    except ClientDisconnected:
        return JSONResponse({"error": {"message": "client disconnected", "code": 499}},
                            status_code=499)


def _optional_tokenizer(engine: AsyncRolloutEngine):
    try:
        return engine.tokenizer
    except ValueError:
        return None
