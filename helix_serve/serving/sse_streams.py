"""Server-Sent Event generators for the streaming routes (native and OpenAI formats).

Once a stream has started its status code is fixed, so failures become an error event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from helix_serve.serving import openai_format
from helix_serve.serving.engine_client import EngineStream
from helix_serve.serving.errors import GenerationFailedError
from helix_serve.serving.protocol import EngineChunk

logger = logging.getLogger(__name__)
DONE = {"data": "[DONE]"}
ENDED_EARLY = "the engine stream ended before the generation finished"
Event = dict[str, str]


class ChunkStream(Protocol):
    request_id: str
    num_prompt_tokens: int

    def chunks(self) -> AsyncIterator[EngineChunk]: ...


class StartedStream:
    """An EngineStream whose first output was read before the reply began."""

    def __init__(self, stream: EngineStream, rest: AsyncIterator[EngineChunk], first: EngineChunk):
        self.request_id, self.num_prompt_tokens = stream.request_id, stream.num_prompt_tokens
        self._rest, self._first = rest, first

    async def chunks(self) -> AsyncIterator[EngineChunk]:
        yield self._first
        async for chunk in self._rest:
            yield chunk


async def started(stream: EngineStream) -> StartedStream:
    """Wait for the first engine output, so a failure there (e.g. out of memory in the prefill) is still
    an HTTP status (503 for memory) rather than an error event in a 200 stream."""
    chunks = stream.chunks()
    try:
        first = await anext(chunks)
    except BaseException:  # client gone (cancelled) or engine unreachable: abort the sequence
        await chunks.aclose()
        raise
    if first.finished and first.error:
        await chunks.aclose()
        raise GenerationFailedError(first.error, first.status_code)
    return StartedStream(stream, chunks, first)


def _event(payload: dict[str, Any], event: str | None = None) -> Event:
    message = {"data": json.dumps(payload)}
    return {**message, "event": event} if event else message


async def native_events(stream: ChunkStream) -> AsyncIterator[Event]:
    """`chunk` events per accepted chunk, then `final` with the stats (or `error`), then `[DONE]`."""
    finished = False
    try:
        async for chunk in stream.chunks():
            finished = chunk.finished
            if chunk.token_ids or chunk.text:
                yield _event({"text": chunk.text, "token_ids": chunk.token_ids, "num_accepted": chunk.num_accepted,
                              "num_drafted": chunk.num_drafted}, "chunk")
            if chunk.finished and chunk.error:
                yield _event({"error": chunk.error, "finish_reason": chunk.finish_reason}, "error")
            elif chunk.finished:
                yield _event({"request_id": stream.request_id, "finish_reason": chunk.finish_reason,
                              "num_prompt_tokens": stream.num_prompt_tokens, **(chunk.stats or {})}, "final")
        if not finished:  # the replica went away mid-generation
            yield _event({"error": ENDED_EARLY}, "error")
    except Exception as exc:  # noqa: BLE001 - reported to the client in-band
        logger.exception("stream %s failed", stream.request_id)
        yield _event({"error": f"{type(exc).__name__}: {exc}"}, "error")
    yield DONE


ChunkBuilder = Callable[..., dict[str, Any]]  # (text, finish_reason, usage=None) -> one OpenAI chunk


async def openai_events(stream: ChunkStream, build: ChunkBuilder, include_usage: bool,
                        preamble: list[dict[str, Any]] = ()) -> AsyncIterator[Event]:
    """OpenAI chunks (`data: {...}`) ending in `data: [DONE]`; a failure mid-stream is an error object."""
    num_tokens = num_cached = 0
    finished = False
    try:
        for payload in preamble:
            yield _event(payload)
        async for chunk in stream.chunks():
            finished = chunk.finished
            num_tokens += len(chunk.token_ids)
            if chunk.finished and chunk.stats:
                num_cached = chunk.stats.get("num_cached_tokens", 0)
            if chunk.finished and chunk.error:
                yield _event(openai_format.error_body(chunk.error, "server_error", 500))
                break
            reason = openai_format.finish_reason(chunk.finish_reason) if chunk.finished else None
            if chunk.text or reason:
                yield _event(build(chunk.text, reason))
        else:
            if not finished:  # the replica went away mid-generation
                yield _event(openai_format.error_body(ENDED_EARLY, "server_error", 503))
            elif include_usage:
                yield _event(build("", None, openai_format.usage(stream.num_prompt_tokens, num_tokens, num_cached)))
    except Exception as exc:  # noqa: BLE001 - reported to the client in-band
        logger.exception("stream %s failed", stream.request_id)
        yield _event(openai_format.error_body(f"{type(exc).__name__}: {exc}", "server_error", 500))
    yield DONE
