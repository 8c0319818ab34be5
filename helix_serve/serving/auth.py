"""API-key authentication: a pure ASGI middleware (streaming and disconnects pass through untouched)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from helix_serve.serving.errors import error_response
from helix_serve.serving.security import Guard

# Default-deny: everything needs a key except these (the playground page and its assets, liveness, docs).
OPEN_PATHS = {"/", "/ping", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
OPEN_PREFIXES = ("/static/",)


def is_open(path: str, metrics_require_key: bool) -> bool:
    if path == "/metrics":
        return not metrics_require_key
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` names a configured key (when any are configured)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.guard.requires_keys and not self._authorized(scope):
            response = error_response(scope["path"], 401, "missing or invalid API key: send "
                                      "'Authorization: Bearer <key>'", "authentication_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if is_open(scope["path"], self.guard.config.metrics_require_key):
            return True
        token = bearer_token(scope)
        return token is not None and self.guard.accepts(token)
