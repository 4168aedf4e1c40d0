"""Errors as OpenAI-style JSON: 400 names the bad field, 503 when the engine is gone."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..engine.protocol import EngineDeadError


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, kind: str, param: str | None = None):
    return JSONResponse(error_body(status, message, kind, param), status_code=status)


def exception_body(e: Exception) -> tuple[int, dict]:
    """Status and body for an exception raised while serving a request."""
    if isinstance(e, ValueError):
        return 400, error_body(400, str(e), "invalid_request_error", str(e).split(":")[0])
    if isinstance(e, EngineDeadError):
        return 503, error_body(503, str(e), "engine_dead")
    if isinstance(e, (AttributeError, NotImplementedError)):
        return 501, error_body(501, str(e), "not_implemented")
    return 500, error_body(500, f"{type(e).__name__}: {e}", "internal_error")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = [_describe(error) for error in exc.errors()]
        field = problems[0][0] if problems else None
        message = "; ".join(f"{name}: {msg}" for name, msg in problems)
        return error_response(400, message, "invalid_request_error", field)

    for kind in (Exception, ValueError, EngineDeadError, AttributeError, NotImplementedError):
        @app.exception_handler(kind)
        async def engine_error(request: Request, exc: Exception):
            status, body = exception_body(exc)
            return JSONResponse(body, status_code=status)


def _describe(error: dict) -> tuple[str, str]:
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return "body", f"malformed JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    return ".".join(location) or "body", error.get("msg", "invalid")
