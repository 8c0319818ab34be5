"""The ingress side of the engine: streams from a chosen engine pool, turned into results and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from helix_serve.serving.app_config import RoutingConfig
from helix_serve.serving.metrics import CURRENT_REQUEST, HelixMetrics
from helix_serve.serving.pools import Pool, PoolRouter
from helix_serve.serving.prefix_router import prefix_hashes, prompt_text
from helix_serve.serving.protocol import EngineChunk, EngineRequest, TokenLogprobs

# Failures that say "this pool cannot take a request now", not "this request is bad": try another pool.
POOL_UNAVAILABLE = (TimeoutError, RayActorError, BackPressureError, DeploymentUnavailableError,
                    ReplicaUnavailableError)


class EngineRejectedError(Exception):
    """The engine refused the request before generating (bad or oversized input): a 4xx."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class EnginesUnavailableError(EngineRejectedError):
    """No engine pool could admit the request: a 503."""

    def __init__(self, message: str):
        super().__init__(503, message)


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
    status_code: int | None = None  # with an error: 503 when the engine failed, not the request
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when the request asked


class EngineStream:
    """An admitted generation. Iterate `chunks()`; leaving early aborts the sequence in the engine."""

    def __init__(self, response: DeploymentResponseGenerator, admission: EngineChunk, route: str,
                 metrics: HelixMetrics, started: float, pool: Pool, choice: int = 0,
                 early: list[EngineChunk] | None = None):
        self.request_id = admission.request_id
        self.num_prompt_tokens = admission.num_prompt_tokens
        self._recorded_prompt_tokens = self.num_prompt_tokens if choice == 0 else 0  # once per prompt, as usage
        self.pool_name = pool.name
        self._pool: Pool | None = pool
        self._response = response
        self._early = early or []  # chunks that came in the admission's message
        self._route = route
        self._metrics = metrics
        self._started = started
        self._record = CURRENT_REQUEST.get()  # the HTTP request this generation belongs to, if any
        self._first_token_at: float | None = None
        self._last_token_at = started

    async def chunks(self) -> AsyncIterator[EngineChunk]:
        finished = False
        try:
            async for message in self._messages():
                self._observe_arrival(message)
                for chunk in message:
                    self._observe(chunk)
                    finished = chunk.finished
                    yield chunk
        finally:
            if not finished:  # client gone or error here: cancellation reaches the replica, which aborts
                self._response.cancel()
            self._release()

    async def _messages(self) -> AsyncIterator[list[EngineChunk]]:
        """The replica's messages (lists of chunks), starting with what came in the admission's."""
        if self._early:
            yield self._early
        async for message in self._response:
            yield message

    def _observe_arrival(self, message: list[EngineChunk]) -> None:
        """A message's tokens arrive together: the gap since the last ones is spread over them."""
        num_tokens = sum(len(chunk.token_ids) for chunk in message)
        if not num_tokens:
            return
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
        else:
            self._metrics.observe_tokens(self._route, now - self._last_token_at, num_tokens)
        self._last_token_at = now

    def _observe(self, chunk: EngineChunk) -> None:
        for k in chunk.step_ks:
            self._metrics.speculative_k.observe(k)
        if chunk.finished:
            now = time.perf_counter()
            ttft_s = None if self._first_token_at is None else self._first_token_at - self._started
            stats = chunk.stats or {}
            self._metrics.observe_generation(self._route, ttft_s, now - self._started, stats)
            if self._record is not None:
                self._record.add_generation(self.pool_name, self._recorded_prompt_tokens, chunk.finish_reason,
                                            ttft_s, stats)

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.ongoing -= 1
            self._pool = None

    async def collect(self) -> Generation:
        text, token_ids, logprobs, last = [], [], [], None
        async for chunk in self.chunks():
            text.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs or [])
            last = chunk
        if last is None or not last.finished:  # the replica went away mid-generation
            raise EnginesUnavailableError("the engine stream ended before the generation finished")
        return Generation(self.request_id, "".join(text), token_ids, last.finish_reason, last.error,
                          self.num_prompt_tokens, last.stats or {}, last.status_code, logprobs)


class EngineClient:
    """Opens generations on the least-loaded live pool, retrying on another before anything streamed."""

    def __init__(self, router: PoolRouter, metrics: HelixMetrics, admission_timeout_s: float):
        self._router = router
        self._metrics = metrics
        self._admission_timeout_s = admission_timeout_s

    @classmethod
    def for_pools(cls, engines: dict[str, DeploymentHandle], capacities: dict[str, float], routing: RoutingConfig,
                  metrics: HelixMetrics) -> EngineClient:
        pools = [Pool(name, handle, capacities[name]) for name, handle in engines.items()]
        return cls(PoolRouter(pools, routing.probe_timeout_s, routing.probe_interval_s), metrics,
                   routing.admission_timeout_s)

    async def open(self, request: EngineRequest, route: str) -> EngineStream:
        """Start a generation; raises EngineRejectedError before any output if the engine refuses it."""
        self._router.start_probing()
        tried: set[str] = set()
        failures: list[str] = []
        text = prompt_text(request) if len(self._router.pools) > 1 else None  # one pool: nothing to choose
        prefix = prefix_hashes(text) if text else []
        while (pool := self._router.pick(tried, prefix)) is not None:
            tried.add(pool.name)
            try:
                stream = await self._open_on(pool, request, route)
                self._router.affinity.record(prefix, pool.name)
                return stream
            except POOL_UNAVAILABLE as exc:
                pool.mark_down(exc)
                failures.append(f"{pool.name}: {type(exc).__name__}")
        raise EnginesUnavailableError(f"no engine pool could take the request ({'; '.join(failures)})")

    async def _open_on(self, pool: Pool, request: EngineRequest, route: str) -> EngineStream:
        started = time.perf_counter()
        response = pool.handle.generate.options(stream=True).remote(request)
        pool.ongoing += 1
        try:
            # NOTE: a pool with no running replica queues the call forever: the timeout moves it elsewhere.
            first: list[EngineChunk] = await asyncio.wait_for(response.__anext__(), self._admission_timeout_s)
        except BaseException:
            pool.ongoing -= 1
            response.cancel()
            raise
        admission = first[0]
        if admission.status_code is not None:
            pool.ongoing -= 1
            raise EngineRejectedError(admission.status_code, admission.error or "request rejected")
        pool.served += 1
        self._metrics.pool_requests.labels(pool.name).inc()
        return EngineStream(response, admission, route, self._metrics, started, pool, request.choice, first[1:])

    async def generate(self, request: EngineRequest, route: str) -> Generation:
        return await (await self.open(request, route)).collect()

    async def info(self) -> dict[str, Any]:
        """Probe every pool now: the engine-wide view, with each pool's own under `pools`."""
        self._router.start_probing()
        await self._router.probe_all()
        health = self._router.health()
        self._metrics.set_pools(health["pools"])
        return health
