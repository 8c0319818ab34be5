"""Load spreading across engine pools (CPU, CUDA, DirectML deployments) as the ingress sees them.

A pool is one named deployment of the engine. The ingress sends each request to the live pool with the
least load, where load is the ingress's ongoing requests on that pool divided by the pool's capacity; ties
go to the pool that has served the fewest requests per capacity, so sequential traffic spreads in
proportion to capacity too. A pool is live once a probe (`info`) answers, and down after a probe or an
admission fails; down pools are tried last, so a pending or crashing pool costs one timeout, not an outage.

Prefix affinity (prefix_router.py): a request whose prompt starts like one sent to a pool before goes to that
pool (whose replicas hold the prefix; within the pool, the engine deployment's router finds the replica),
unless that pool has more than `POOL_IMBALANCE` ongoing requests per unit of capacity over the least loaded one.
So the ingress's choice of pool and Serve's choice of replica follow the same prefix instead of fighting.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from helix_serve.serving.prefix_router import PrefixAffinity

logger = logging.getLogger(__name__)
HEALTH_RANK = {True: 0, None: 1, False: 2}  # live pools first, then not yet probed, then down
SUMMED_KV_KEYS = ("num_blocks", "used_blocks", "free_blocks", "pool_bytes", "cached_blocks",
                  "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
POOL_IMBALANCE = 4.0  # ongoing requests per unit of capacity beyond which prefix affinity yields to load


@dataclass(slots=True)
class Pool:
    """One engine pool and what this ingress knows about it."""

    name: str
    handle: DeploymentHandle
    capacity: float
    ongoing: int = 0
    served: int = 0
    healthy: bool | None = None  # None until the first probe or request tells
    info: dict[str, Any] | None = None  # the last `info` a replica of this pool returned
    error: str | None = None  # why the pool was last marked down

    def order(self) -> tuple[int, float, float]:
        return HEALTH_RANK[self.healthy], self.ongoing / self.capacity, self.served / self.capacity

    def mark_down(self, error: BaseException) -> None:
        if self.healthy is not False:
            logger.warning("engine pool %s is unavailable: %s: %s", self.name, type(error).__name__, error)
        self.healthy, self.error = False, f"{type(error).__name__}: {error}"

    def mark_up(self, info: dict[str, Any]) -> None:
        if self.healthy is False:
            logger.info("engine pool %s is available again", self.name)
        self.healthy, self.info, self.error = True, info, None

    def summary(self) -> dict[str, Any]:
        state = {"healthy": bool(self.healthy), "capacity": self.capacity, "ongoing_requests": self.ongoing,
                 "requests_served": self.served, "error": self.error}
        return {**(self.info or {}), **state}


class PoolRouter:
    """Picks a pool per request and keeps pool health fresh with periodic `info` probes."""

    def __init__(self, pools: list[Pool], probe_timeout_s: float, probe_interval_s: float):
        assert pools, "at least one engine pool"
        self.pools = pools
        self.probe_timeout_s = probe_timeout_s
        self.probe_interval_s = probe_interval_s
        self._prober: asyncio.Task | None = None
        self.affinity = PrefixAffinity()

    def pick(self, exclude: set[str], prefix: list[bytes] = ()) -> Pool | None:
        """The preferred pool not yet tried for this request, or None when every pool was tried. `prefix`: the
        request's prompt prefix hashes (prefix_router.prefix_hashes)."""
        candidates = [p for p in self.pools if p.name not in exclude]
        if not candidates:
            return None
        least = min(candidates, key=Pool.order)
        holders = self.affinity.best(list(prefix), {p.name for p in candidates if p.healthy}) if prefix else set()
        if holders:
            holder = min((p for p in candidates if p.name in holders), key=Pool.order)
            if holder.ongoing / holder.capacity - least.ongoing / least.capacity <= POOL_IMBALANCE:
                return holder
        return least

    def start_probing(self) -> None:
        """Start the background probe loop (lazily: it needs the replica's running event loop)."""
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(p) for p in self.pools))

    def health(self) -> dict[str, Any]:
        """The engine-wide view from the last probes (models, devices, summed KV usage) plus each pool's."""
        live = [p.info for p in self.pools if p.healthy and p.info is not None]
        if not live:
            raise RuntimeError("no engine pool answered: " + "; ".join(f"{p.name}: {p.error}" for p in self.pools))
        first = live[0]
        # One replica per pool answers a probe: the KV sums cover those replicas, not every replica.
        kv = {key: sum(info["kv_cache"][key] for info in live) for key in SUMMED_KV_KEYS}
        return {
            "status": "ok" if len(live) == len(self.pools) else "degraded",
            **{key: first[key] for key in ("target_model", "draft_model", "eagle_head", "proposers", "has_draft",
                                           "max_model_len")},
            "device": ",".join(sorted({info["device"] for info in live})),
            "dtype": ",".join(sorted({info["dtype"] for info in live})),
            "dtype_requested": first["dtype_requested"],
            "quantization": first["quantization"], "quantization_requested": first["quantization_requested"],
            "int4_dense_rows": first["int4_dense_rows"], "lm_head": first["lm_head"],
            "kv_cache": {**first["kv_cache"], **kv},
            "pools": {p.name: p.summary() for p in self.pools},
        }

    async def _probe_forever(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.probe_interval_s)

    async def _probe(self, pool: Pool) -> None:
        response = pool.handle.info.remote()
        try:
            # NOTE: a pool with no running replica (pending, or failing to start) never answers: time out.
            pool.mark_up(await asyncio.wait_for(response, self.probe_timeout_s))
        except Exception as exc:  # noqa: BLE001 - any failure to answer means the pool is not serving
            response.cancel()
            pool.mark_down(exc)
