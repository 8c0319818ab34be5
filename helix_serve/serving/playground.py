"""The playground page: one prompt streamed with speculation on and off, side by side.

Static files shipped in the package (no build step, no CDN), served by a small router the ingress includes.
"""

# NOTE: no `from __future__ import annotations`: FastAPI must resolve the route signatures at runtime.
from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC = files("helix_serve") / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}  # an allowlist: no path handling
# Everything the page loads comes from this origin; nothing inline, so the policy can be this strict.
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff"}

playground_router = APIRouter(include_in_schema=False)


def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@playground_router.get("/")
async def page() -> Response:
    return Response(_read("playground.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@playground_router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_read(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=SECURITY_HEADERS)
