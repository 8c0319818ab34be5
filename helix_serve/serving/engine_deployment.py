"""The engine deployment: one LLMEngine per replica, fed by `@serve.batch`, driven by a StepLoop."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.serving.app_config import BatchingConfig, HelixAppArgs
from helix_serve.serving.protocol import EngineChunk, EngineRequest
from helix_serve.serving.step_loop import DuplicateRequestError, StepLoop

logger = logging.getLogger(__name__)
DEFAULT_BATCHING = BatchingConfig()


@serve.deployment(
    name="HelixEngine",
    ray_actor_options={"num_cpus": 1},
    # Each streaming request holds a slot for its whole generation, so allow a full engine batch and more.
    max_ongoing_requests=64,
    user_config=DEFAULT_BATCHING.model_dump(),
    health_check_period_s=10,
)
class HelixEngine:
    def __init__(self, args: dict[str, Any]):
        self.args = HelixAppArgs(**args)
        torch.set_num_threads(self.args.torch_threads)
        engine = LLMEngine(self.args.engine_config())
        self.loop = StepLoop(engine)
        logger.info("engine ready on %s (draft: %s)", engine.device, engine.has_draft)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        batching = BatchingConfig(**(user_config or {}))
        self._admit.set_max_batch_size(batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=DEFAULT_BATCHING.max_batch_size,
                 batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s)
    async def _admit(self, requests: list[EngineRequest]) -> list[None]:
        # Returns as soon as the batch is queued in the engine: the next batch need not wait for this one
        # to finish generating (a @serve.batch call never takes new requests while it runs).
        await self.loop.admit(requests)
        return [None] * len(requests)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream one request: the admission chunk, then one chunk per engine step until finished."""
        try:
            queue = self.loop.open(request.request_id)
        except DuplicateRequestError as exc:
            yield EngineChunk(request.request_id, finished=True, error=str(exc), status_code=409)
            return
        try:
            await self._admit(request)
            while True:
                chunk = await queue.get()
                yield chunk
                if chunk.finished:
                    return
        finally:  # also runs on cancellation (client disconnect): frees the sequence's KV blocks
            self.loop.close(request.request_id)

    async def info(self) -> dict[str, Any]:
        """Model, device and KV pool usage, read on the engine thread."""
        engine = self.loop.engine
        kv = await self.loop.run_on_engine(engine.kv_usage)
        return {
            "target_model": self.args.target_model, "draft_model": self.args.draft_model,
            "has_draft": engine.has_draft, "device": str(engine.device), "max_model_len": engine.max_model_len,
            "kv_cache": kv,
        }

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError("the engine step loop has stopped")
