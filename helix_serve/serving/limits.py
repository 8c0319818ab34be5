"""Request limits, enforced by a pure ASGI middleware before routing, so an oversized request never
reaches an engine: body size (413), prompt length and batch size (413), max_tokens and stop lists (422).

It checks the JSON fields generically (`prompt`, `prompts`, `messages`, `max_tokens`, `stop`, ...) where
their types are right; wrong types are left to the route's schema validation. A body that is not UTF-8, or
JSON that nests too deeply for the parser, is a 422 (400 on /v1).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helix_serve.serving.errors import error_response
from helix_serve.serving.security import Guard, RequestLimits


class ClientGone(Exception):
    """The client disconnected while sending its body."""


class Refused(Exception):
    """A body the ingress answers itself, with this status and message."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code, self.message = status_code, message


def _check_prompts(prompts: list[Any], limits: RequestLimits, max_batch_prompts: int, name: str) -> None:
    if len(prompts) > max_batch_prompts:
        raise Refused(413, f"{name}: {len(prompts)} prompts; at most {max_batch_prompts} per request")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
            raise Refused(413, f"{name}[{i}] is {len(prompt)} characters; at most {limits.max_prompt_chars}")


def _check_text(payload: dict[str, Any], limits: RequestLimits, max_batch_prompts: int) -> None:
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
        raise Refused(413, f"prompt is {len(prompt)} characters; at most {limits.max_prompt_chars}")
    for name in ("prompt", "prompts"):
        if isinstance(payload.get(name), list):
            _check_prompts(payload[name], limits, max_batch_prompts, name)
    messages = payload.get("messages")
    if isinstance(messages, list):
        size = sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict))
        if size > limits.max_prompt_chars:
            raise Refused(413, f"messages hold {size} characters; at most {limits.max_prompt_chars}")


def _content_chars(content: Any) -> int:
    """Characters of a chat message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _check_sampling(payload: dict[str, Any], limits: RequestLimits) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_tokens:
            raise Refused(422, f"{name} is {value}; at most {limits.max_tokens}")
    stop = payload.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop_strings:
        raise Refused(422, f"stop: {len(stops)} strings; at most {limits.max_stop_strings}")
    if any(isinstance(s, str) and len(s) > limits.max_stop_chars for s in stops):
        raise Refused(422, f"stop: strings must be at most {limits.max_stop_chars} characters")


def check_payload(payload: Any, limits: RequestLimits, max_batch_prompts: int) -> None:
    """Raise Refused if a request body asks for more than the limits allow."""
    if isinstance(payload, dict):
        _check_text(payload, limits, max_batch_prompts)
        _check_sampling(payload, limits)


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        size += len(message.get("body", b""))
        if size > max_bytes:
            raise Refused(413, f"request body is over {max_bytes} bytes")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class RequestLimitMiddleware:
    """Reads (at most max_body_bytes of) a POST body, checks it, then replays it to the app."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limits = self.guard.limits
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limits.max_body_bytes:
                raise Refused(413, f"request body is {declared} bytes; at most {limits.max_body_bytes}")
            body = await read_body(receive, limits.max_body_bytes)
            check_payload(_json_or_none(body), limits, self.guard.max_batch_prompts)
        except ClientGone:
            return
        except Refused as exc:
            # OpenAI clients expect 400 for a bad field, as the validation handler answers on /v1.
            status = 400 if exc.status_code == 422 and scope["path"].startswith("/v1/") else exc.status_code
            await error_response(scope["path"], status, exc.message, "invalid_request_error")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _json_or_none(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(422, f"the body is not valid UTF-8: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # malformed JSON: the route's validation answers it, with the parser's message
        return None
    except RecursionError:  # e.g. b"[" * 100_000: well under the size limit, too deep for any parser here
        raise Refused(422, "the body nests JSON arrays or objects too deeply") from None
    except ValueError as exc:  # valid JSON Python will not convert, e.g. an integer of over 4,300 digits
        raise Refused(422, f"the body is not valid JSON here: {exc}") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (so a later disconnect is still seen)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
