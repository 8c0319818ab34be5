"""The engine deployment: one LLMEngine per replica, fed by `@serve.batch`, driven by a StepLoop.

The class is bound once per engine pool of each served model (`HelixEngine.options(name=pool)`); each replica
loads its model's pair and picks its device from its pool's settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import serve

from helix_serve.config import EngineConfig
from helix_serve.device import DeviceUnavailableError, resolve_device
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.model.loader import load_model_pair
from helix_serve.serving import cpu_affinity
from helix_serve.serving.app_config import BatchingConfig, ModelArgs, PoolConfig
from helix_serve.serving.metrics import EngineMetrics
from helix_serve.serving.protocol import EngineChunk, EngineRequest
from helix_serve.serving.step_loop import DuplicateRequestError, StepLoop, StepSummary, batched

logger = logging.getLogger(__name__)
DEFAULT_BATCHING = BatchingConfig()


@dataclass(frozen=True, slots=True)
class PoolDevice:
    """The device a pool's replica runs on; `fallback_reason` says why it is not the one asked for."""

    device: torch.device
    requested: str
    fallback_reason: str | None = None


def select_device(pool_name: str, pool: PoolConfig) -> PoolDevice:
    """The pool's device (HELIX_DEVICE still overrides); CPU instead only when the pool says `fallback: cpu`."""
    try:
        return PoolDevice(resolve_device(pool.device), pool.device)
    except DeviceUnavailableError as exc:
        if pool.fallback != "cpu":
            raise DeviceUnavailableError(f"engine pool {pool_name!r}: {exc}. Install the device's support on "
                                         "this node, or set `fallback: cpu` on the pool to run on CPU") from exc
        logger.warning("engine pool %r: %s; running on CPU as the pool's `fallback: cpu` allows", pool_name, exc)
        return PoolDevice(torch.device("cpu"), pool.device, str(exc))


def pin_replica(pool_name: str, pool: PoolConfig, threads: int) -> list[int] | None:
    """Move this replica (every thread, before the model loads) onto its slice of the pool's `cpu_cores`; the slice,
    or None (no pinning, or the OS can't pin)."""
    if pool.cpu_cores is None:
        return None
    if not cpu_affinity.SUPPORTED:
        logger.warning("engine pool %r: cpu_cores ignored: this OS can't pin threads", pool_name)
        return None
    missing = sorted(set(pool.cpu_cores) - set(range(os.cpu_count() or 1)))
    if missing:
        raise ValueError(f"engine pool {pool_name!r}: cpu_cores {missing} do not exist on this node "
                         f"(cores 0-{(os.cpu_count() or 1) - 1})")
    cores = cpu_affinity.replica_cores(pool.cpu_cores, local_rank(pool_name, len(pool.cpu_cores) > threads), threads)
    try:
        cpu_affinity.move_process(cores)
    except OSError as exc:  # e.g. a core outside this container's cpuset
        raise ValueError(f"engine pool {pool_name!r}: cpu_cores {cores} can't be used on this node ({exc})") from exc
    return cores


def local_rank(pool_name: str, several_slices: bool) -> int:
    """This replica's rank among its deployment's replicas on this node (Ray Serve's replica rank); 0 where this
    Ray has none (then every replica of the pool on a node takes the first slice)."""
    rank = getattr(serve.get_replica_context(), "rank", None)
    value = getattr(rank, "local_rank", None)
    if isinstance(value, int) and value >= 0:
        return value
    if several_slices:
        logger.warning("engine pool %r: this Ray gives no per-node replica rank; taking the first slice of "
                       "cpu_cores", pool_name)
    return 0


def load_pair_for_pool(pool_name: str, pool: PoolConfig, placement: PoolDevice, config: EngineConfig):
    """Load the pair on the pool's device; if that fails (e.g. out of device memory), fail loudly, or load on
    CPU with a warning only when the pool says `fallback: cpu`. Returns (pair, the placement it ended on)."""
    try:
        return load_model_pair(config.target_model, config.draft_model, placement.device, config.dtype,
                               config.quantization, config.int4_dense_rows), placement
    except Exception as exc:
        if pool.fallback != "cpu" or placement.device.type == "cpu":
            raise
        reason = f"loading the pair on {placement.device} failed: {type(exc).__name__}: {exc}"
        logger.warning("engine pool %r: %s; running on CPU as the pool's `fallback: cpu` allows", pool_name, reason)
        cpu = PoolDevice(torch.device("cpu"), placement.requested, reason)
        return load_model_pair(config.target_model, config.draft_model, cpu.device, config.dtype,
                               config.quantization, config.int4_dense_rows), cpu


@serve.deployment(
    name="HelixEngine",
    ray_actor_options={"num_cpus": 1},
    # Each streaming request holds a slot for its whole generation, so allow a full engine batch and more.
    max_ongoing_requests=64,
    user_config=DEFAULT_BATCHING.model_dump(),
    health_check_period_s=10,
)
class HelixEngine:
    def __init__(self, model_args: dict[str, Any], pool_name: str, pool: dict[str, Any]):
        """model_args: the served model's fields (ModelArgs), pool: its PoolConfig, both as given in the YAML."""
        self.args = ModelArgs(**model_args)
        self.pool_name = pool_name
        torch.set_num_threads(self.args.torch_threads)
        pool = PoolConfig(**pool)
        self.cpu_cores = pin_replica(pool_name, pool, self.args.torch_threads)
        config = self.args.engine_config()
        pair, self.placement = load_pair_for_pool(pool_name, pool, select_device(pool_name, pool), config)
        engine = LLMEngine(config, pair)
        self.metrics = EngineMetrics(pool_name, config.k_max)  # Ray's metrics export, for the dashboard
        self.loop = StepLoop(engine, on_step=self.metrics.record_step,
                             stream_interval_s=DEFAULT_BATCHING.stream_interval_s)
        self.node_id = ray.get_runtime_context().get_node_id()
        logger.info("engine pool %s ready on %s (asked for %r) on node %s (draft: %s; on CPU cores %s)",
                    pool_name, engine.device, self.placement.requested, self.node_id, engine.has_draft,
                    self.cpu_cores or "any")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        batching = BatchingConfig(**(user_config or {}))
        self._admit.set_max_batch_size(batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.loop.stream_interval_s = batching.stream_interval_s

    @serve.batch(max_batch_size=DEFAULT_BATCHING.max_batch_size,
                 batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s)
    async def _admit(self, requests: list[EngineRequest]) -> list[None]:
        # Returns as soon as the batch is queued in the engine: the next batch need not wait for this one
        # to finish generating (a @serve.batch call never takes new requests while it runs).
        await self.loop.admit(requests)
        return [None] * len(requests)

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineChunk]]:
        """Stream one request as messages of chunks: the admission chunk, then one chunk per engine step, until
        finished."""
        try:
            queue = self.loop.open(request.request_id)
        except DuplicateRequestError as exc:
            yield [EngineChunk(request.request_id, finished=True, error=str(exc), status_code=409)]
            return
        try:
            await self._admit(request)
            async for message in batched(queue):
                yield message
        finally:  # also runs on cancellation (client disconnect): frees the sequence's KV blocks
            self.loop.close(request.request_id)

    async def info(self) -> dict[str, Any]:
        """Model, pool, device, node, KV pool usage (read on the engine thread) and the last step's K."""
        engine = self.loop.engine
        kv, thread_cores = await self.loop.run_on_engine(lambda: (engine.kv_usage(), cpu_affinity.current_cores()))
        self.metrics.set_kv_usage(kv)  # also after aborts and when idle, when no step reports
        last_step = self.loop.last_step or StepSummary([], kv)
        return {
            "target_model": self.args.target_model, "draft_model": self.args.draft_model,
            "eagle_head": self.args.eagle_head, "proposers": engine.proposers, "has_draft": engine.has_draft,
            "device": str(engine.device), "max_model_len": engine.max_model_len,
            "dtype": str(engine.pair.target.dtype).removeprefix("torch."), "dtype_requested": self.args.dtype,
            "quantization": engine.pair.target.quantization, "quantization_requested": self.args.quantization,
            "int4_dense_rows": engine.pair.target.int4_dense_rows, "lm_head": engine.pair.target.lm_head_format,
            "kv_cache": kv, "pool": self.pool_name, "device_requested": self.placement.requested,
            "device_fallback": self.placement.fallback_reason, "node_id": self.node_id,
            "engine_thread_cores": thread_cores,
            "last_step": last_step.info(),
        }

    async def check_health(self) -> None:
        await self.loop.check_health(timeout_s=20)  # under Serve's 30 s health-check timeout
