"""Prometheus metrics kept by the ingress: HTTP requests, latency, and the engine stats it gets back.

Engine replicas are separate processes, so their token and acceptance counts arrive here inside each
finished generation's stats, and the KV gauges are refreshed from the engine when /metrics is scraped.
With more than one ingress replica each one reports its own share.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROUTES = frozenset({
    "/generate", "/generate/batch", "/generate/stream", "/v1/completions", "/v1/chat/completions", "/v1/models",
    "/health", "/ping", "/metrics", "/docs", "/openapi.json",
})


class HelixMetrics:
    """One registry per ingress process (not the global one, which Ray's own metrics share)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helix_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("helix_time_to_first_token_seconds", "Time to the first generated token, as the "
                              "ingress sees it", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("helix_request_latency_seconds", "End-to-end generation latency", ["route"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("helix_generated_tokens", "Tokens generated", ["route"], registry=r)
        self.drafted = Counter("helix_draft_tokens", "Draft tokens proposed for verification", registry=r)
        self.accepted = Counter("helix_accepted_draft_tokens", "Draft tokens the target accepted", registry=r)
        self.kv_blocks = Gauge("helix_kv_blocks", "KV cache blocks of the engine replica last asked", ["state"],
                               registry=r)
        self.pool_requests = Counter("helix_pool_requests", "Requests admitted, by engine pool", ["pool"],
                                     registry=r)
        self.pool_healthy = Gauge("helix_pool_healthy", "1 if the engine pool answered its last probe", ["pool"],
                                  registry=r)
        self.pool_ongoing = Gauge("helix_pool_ongoing_requests", "Generations this ingress has open, by pool",
                                  ["pool"], registry=r)
        self.pool_device = Gauge("helix_pool_device_info", "1 per pool: the device its probed replica runs on",
                                 ["pool", "device", "requested", "fallback"], registry=r)

    def observe_generation(self, route: str, ttft_s: float | None, e2e_s: float, stats: dict[str, Any]) -> None:
        if ttft_s is not None:
            self.ttft.labels(route).observe(ttft_s)
        self.e2e.labels(route).observe(e2e_s)
        self.generated.labels(route).inc(stats.get("tokens_generated", 0))
        self.drafted.inc(stats.get("num_drafted", 0))
        self.accepted.inc(stats.get("num_accepted", 0))

    def set_kv_usage(self, kv: dict[str, int]) -> None:
        self.kv_blocks.labels("used").set(kv["used_blocks"])
        self.kv_blocks.labels("free").set(kv["free_blocks"])

    def set_pools(self, pools: dict[str, dict[str, Any]]) -> None:
        self.pool_device.clear()  # a pool's device labels change when it falls back or recovers
        for name, pool in pools.items():
            self.pool_healthy.labels(name).set(int(pool["healthy"]))
            self.pool_ongoing.labels(name).set(pool["ongoing_requests"])
            if "device" in pool:
                fallback = "cpu" if pool["device_fallback"] else ""
                self.pool_device.labels(name, pool["device"], pool["device_requested"], fallback).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCountMiddleware:
    """Pure ASGI (unlike BaseHTTPMiddleware it leaves streaming and disconnects alone)."""

    def __init__(self, app: ASGIApp, metrics: HelixMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
