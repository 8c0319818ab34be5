"""The ingress side of the engine: streams over a DeploymentHandle, turned into results and metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from helix_serve.serving.metrics import HelixMetrics
from helix_serve.serving.protocol import EngineChunk, EngineRequest


class EngineRejectedError(Exception):
    """The engine refused the request before generating (bad or oversized input): a 4xx."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(slots=True)
class Generation:
    """A finished generation, as the ingress collected it."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    error: str | None
    num_prompt_tokens: int
    stats: dict[str, Any] = field(default_factory=dict)


class EngineStream:
    """An admitted generation. Iterate `chunks()`; leaving early aborts the sequence in the engine."""

    def __init__(self, response: DeploymentResponseGenerator, admission: EngineChunk, route: str,
                 metrics: HelixMetrics, started: float):
        self.request_id = admission.request_id
        self.num_prompt_tokens = admission.num_prompt_tokens
        self._response = response
        self._route = route
        self._metrics = metrics
        self._started = started

    async def chunks(self) -> AsyncIterator[EngineChunk]:
        ttft_s: float | None = None
        finished = False
        try:
            async for chunk in self._response:
                if ttft_s is None and chunk.token_ids:
                    ttft_s = time.perf_counter() - self._started
                finished = chunk.finished
                if finished:
                    self._metrics.observe_generation(self._route, ttft_s, time.perf_counter() - self._started,
                                                     chunk.stats or {})
                yield chunk
        finally:
            if not finished:  # client gone or error here: cancellation reaches the replica, which aborts
                self._response.cancel()

    async def collect(self) -> Generation:
        text, token_ids, last = [], [], None
        async for chunk in self.chunks():
            text.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None and last.finished, "engine stream ended without a final chunk"
        return Generation(self.request_id, "".join(text), token_ids, last.finish_reason, last.error,
                          self.num_prompt_tokens, last.stats or {})


class EngineClient:
    def __init__(self, handle: DeploymentHandle, metrics: HelixMetrics):
        self._handle = handle
        self._metrics = metrics

    async def open(self, request: EngineRequest, route: str) -> EngineStream:
        """Start a generation; raises EngineRejectedError before any output if the engine refuses it."""
        started = time.perf_counter()
        response = self._handle.generate.options(stream=True).remote(request)
        try:
            admission: EngineChunk = await response.__anext__()
        except BaseException:
            response.cancel()
            raise
        if admission.status_code is not None:
            raise EngineRejectedError(admission.status_code, admission.error or "request rejected")
        return EngineStream(response, admission, route, self._metrics, started)

    async def generate(self, request: EngineRequest, route: str) -> Generation:
        return await (await self.open(request, route)).collect()

    async def info(self) -> dict[str, Any]:
        return await self._handle.info.remote()
