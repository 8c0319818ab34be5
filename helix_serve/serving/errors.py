"""Exception handlers: every client mistake becomes a 4xx with a readable message (OpenAI shape on /v1)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from helix_serve.serving import openai_format
from helix_serve.serving.engine_client import EngineRejectedError


class OpenAIError(Exception):
    """An error on an OpenAI route, rendered as `{"error": {...}}`."""

    def __init__(self, status_code: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.error_type, self.param = status_code, message, error_type, param


OUT_OF_MEMORY = "out of memory"  # the engine's error message for a request that failed for lack of memory
RETRY_AFTER_S = "1"


class GenerationFailedError(Exception):
    """The engine ended a request with an error before the reply began: 503 if it ran out of memory or
    the engine itself failed (status 503: worth retrying), else 500."""

    def __init__(self, error: str | None, status_code: int | None = None):
        super().__init__(error)
        self.message = f"generation failed: {error}"
        self.out_of_memory = (error or "").startswith(OUT_OF_MEMORY)
        self.retryable = self.out_of_memory or status_code == 503


def _is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(path: str, status_code: int, message: str, error_type: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body a client of `path` expects (OpenAI's shape on /v1, FastAPI's `detail` elsewhere)."""
    if _is_openai(path):
        return JSONResponse(openai_format.error_body(message, error_type, status_code, param), status_code, headers)
    return JSONResponse({"detail": message}, status_code, headers)


def _error(request: Request, status_code: int, message: str, error_type: str, param: str | None = None):
    return error_response(request.url.path, status_code, message, error_type, param)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err["type"] == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    # 422 is FastAPI's convention on native routes; OpenAI clients expect 400 for a bad request.
    status = 400 if _is_openai(request.url.path) else 422
    return _error(request, status, validation_message(exc), "invalid_request_error")


async def _on_rejected(request: Request, exc: EngineRejectedError) -> JSONResponse:
    if exc.status_code >= 500:  # no pool could take it: a server condition, worth retrying
        return error_response(request.url.path, exc.status_code, exc.message, "server_error",
                              headers={"Retry-After": RETRY_AFTER_S})
    return _error(request, exc.status_code, exc.message, "invalid_request_error")


async def _on_generation_failed(request: Request, exc: GenerationFailedError) -> JSONResponse:
    if exc.retryable:
        return error_response(request.url.path, 503, exc.message, "server_error",
                              headers={"Retry-After": RETRY_AFTER_S})
    return _error(request, 500, exc.message, "server_error")


async def _on_openai(request: Request, exc: OpenAIError) -> JSONResponse:
    return _error(request, exc.status_code, exc.message, exc.error_type, exc.param)


async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own errors (a body it cannot parse, an unknown route or method), in the route's shape."""
    error_type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return error_response(request.url.path, exc.status_code, str(exc.detail), error_type, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(HTTPException, _on_http)
    app.add_exception_handler(EngineRejectedError, _on_rejected)
    app.add_exception_handler(OpenAIError, _on_openai)
    app.add_exception_handler(GenerationFailedError, _on_generation_failed)
