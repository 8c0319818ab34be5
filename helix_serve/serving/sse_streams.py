"""Server-Sent Event generators for the streaming routes (native and OpenAI formats).

Once a stream has started its status code is fixed, so failures become an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from helix_serve.serving import openai_format
from helix_serve.serving.engine_client import EngineStream
from helix_serve.serving.errors import GenerationFailedError
from helix_serve.serving.protocol import EngineChunk, TokenLogprobs
from helix_serve.serving.schemas import TokenLogprob

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

    async def aclose(self) -> None:
        """Abort a stream that will not be read."""
        await self._rest.aclose()


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
                payload = {"text": chunk.text, "token_ids": chunk.token_ids, "num_accepted": chunk.num_accepted,
                           "num_drafted": chunk.num_drafted, "step_ks": chunk.step_ks}
                if chunk.logprobs is not None:
                    payload["logprobs"] = [TokenLogprob.of(lp).model_dump() for lp in chunk.logprobs]
                yield _event(payload, "chunk")
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


class ChunkShapes(Protocol):
    """How one OpenAI route writes its stream chunks (openai_format.CompletionChunks, ChatChunks)."""

    def opening(self, index: int) -> list[dict[str, Any]]: ...

    def choice(self, index: int, text: str, reason: str | None,
               logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]: ...

    def usage(self, chunk_usage: dict[str, Any]) -> dict[str, Any]: ...


async def merged(streams: list[ChunkStream]) -> AsyncIterator[tuple[int, EngineChunk]]:
    """(index, chunk) from all the streams as they come; leaving early closes (aborts) every stream."""
    if len(streams) == 1:
        async for chunk in streams[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, EngineChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: ChunkStream) -> None:
        try:
            async for chunk in stream.chunks():
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the reader
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                open_streams -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def openai_events(streams: list[ChunkStream], n: int, shapes: ChunkShapes,
                        include_usage: bool) -> AsyncIterator[Event]:
    """OpenAI chunks (`data: {...}`) of every choice, ending in `data: [DONE]`; a failure mid-stream is an
    error object and ends every choice. Streams come n per prompt (usage counts each prompt once)."""
    num_tokens = num_cached = 0
    finished = [False] * len(streams)
    try:
        for index in range(len(streams)):
            for payload in shapes.opening(index):
                yield _event(payload)
        async with aclosing(merged(streams)) as chunks:  # closed at once on a break: the other choices abort
            async for index, chunk in chunks:
                finished[index] = chunk.finished
                num_tokens += len(chunk.token_ids)
                if chunk.finished and chunk.stats and index % n == 0:
                    num_cached += chunk.stats.get("num_cached_tokens", 0)
                if chunk.finished and chunk.error:
                    yield _event(openai_format.error_body(chunk.error, "server_error", 500))
                    break
                reason = openai_format.finish_reason(chunk.finish_reason) if chunk.finished else None
                if chunk.text or reason or chunk.logprobs:
                    for payload in shapes.choice(index, chunk.text, reason, chunk.logprobs or []):
                        yield _event(payload)
            else:
                if not all(finished):  # a replica went away mid-generation
                    yield _event(openai_format.error_body(ENDED_EARLY, "server_error", 503))
                elif include_usage:
                    num_prompt = sum(s.num_prompt_tokens for s in streams[::n])
                    yield _event(shapes.usage(openai_format.usage(num_prompt, num_tokens, num_cached)))
    except Exception as exc:  # noqa: BLE001 - reported to the client in-band
        logger.exception("stream %s failed", streams[0].request_id)
        yield _event(openai_format.error_body(f"{type(exc).__name__}: {exc}", "server_error", 500))
    yield DONE
