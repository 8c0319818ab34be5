"""Exception handlers: every client mistake becomes a 4xx with a readable message (OpenAI shape on /v1)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from helix_serve.serving import openai_format
from helix_serve.serving.engine_client import EngineRejectedError


class OpenAIError(Exception):
    """An error on an OpenAI route, rendered as `{"error": {...}}`."""

    def __init__(self, status_code: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.error_type, self.param = status_code, message, error_type, param


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _error(request: Request, status_code: int, message: str, error_type: str, param: str | None = None):
    if _is_openai(request):
        return JSONResponse(openai_format.error_body(message, error_type, status_code, param), status_code)
    return JSONResponse({"detail": message}, status_code)


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
    status = 400 if _is_openai(request) else 422
    return _error(request, status, validation_message(exc), "invalid_request_error")


async def _on_rejected(request: Request, exc: EngineRejectedError) -> JSONResponse:
    return _error(request, exc.status_code, exc.message, "invalid_request_error")


async def _on_openai(request: Request, exc: OpenAIError) -> JSONResponse:
    return _error(request, exc.status_code, exc.message, exc.error_type, exc.param)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(EngineRejectedError, _on_rejected)
    app.add_exception_handler(OpenAIError, _on_openai)
