"""Metrics and the one log line per generation request.

The ingress keeps prometheus-client metrics in its own registry, served at /metrics: HTTP requests,
latencies, and the engine stats that each finished generation carries back. Engine replicas are separate
processes: their live state (sequences running and waiting, K, KV blocks) is exported with Ray's metrics
API by `EngineMetrics` (Ray's Prometheus export, names prefixed `ray_`), and mirrored per pool into the
ingress's registry from the `info` probes. With more than one ingress replica each one reports its own share.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from helix_serve.serving.step_loop import StepSummary

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
K_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
RATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ROUTES = frozenset({
    "/generate", "/generate/batch", "/generate/stream", "/v1/completions", "/v1/chat/completions", "/v1/models",
    "/health", "/ping", "/metrics", "/docs", "/openapi.json",
})
GENERATION_ROUTES = frozenset({"/generate", "/generate/batch", "/generate/stream", "/v1/completions",
                               "/v1/chat/completions"})
REQUEST_ID_HEADER = b"x-request-id"  # Serve's proxy sets it and echoes it as the response's X-Request-ID
# A child of Serve's logger: its lines land in the replica's Serve log file, as JSON with `encoding: JSON`.
request_logger = logging.getLogger("ray.serve.helix")


class HelixMetrics:
    """One registry per ingress process (not the global one, which Ray's own metrics share)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helix_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("helix_time_to_first_token_seconds", "Time to the first generated token, as the "
                              "ingress sees it", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("helix_inter_token_latency_seconds", "Time between generated tokens after the first; "
                             "a chunk of n tokens counts n gaps of (time since the last chunk) / n", ["route"],
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("helix_request_latency_seconds", "End-to-end generation latency", ["route"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("helix_generated_tokens", "Tokens generated", ["route"], registry=r)
        self.drafted = Counter("helix_draft_tokens", "Draft tokens proposed for verification", registry=r)
        self.accepted = Counter("helix_accepted_draft_tokens", "Draft tokens the target accepted", registry=r)
        self.acceptance_rate = Gauge("helix_draft_acceptance_rate", "Accepted / drafted tokens of the generations "
                                     "this ingress finished", registry=r)
        self.request_acceptance = Histogram("helix_request_acceptance_rate", "Accepted / drafted tokens per "
                                            "speculative generation", buckets=RATE_BUCKETS, registry=r)
        self.proposer_drafted = Counter("helix_proposer_draft_tokens", "Draft tokens proposed, by proposer (draft: "
                                        "the draft model, eagle: an EAGLE head, ngram: prompt lookup, grammar: "
                                        "tokens a structured output's grammar forces)", ["proposer"], registry=r)
        self.proposer_accepted = Counter("helix_proposer_accepted_tokens", "Draft tokens accepted, by proposer",
                                         ["proposer"], registry=r)
        self.accepted_per_position = Counter("helix_accepted_tokens_per_position", "Accepted draft tokens by "
                                             "position in the draft (0 = first), as vLLM's "
                                             "spec_decode_num_accepted_tokens_per_pos", ["position"], registry=r)
        self.speculative_k = Histogram("helix_speculative_k", "K (draft tokens proposed) per verify step of one "
                                       "sequence", buckets=K_BUCKETS, registry=r)
        self.kv_blocks = Gauge("helix_kv_blocks", "KV cache blocks of the engine replica last asked (cached: "
                               "holding a prefix-cache hash, in use or free)", ["state"], registry=r)
        self._prefix_cache_metrics(r)
        self._engine_gauges(r)
        self._pool_gauges(r)
        self._num_drafted = self._num_accepted = 0

    def _prefix_cache_metrics(self, r: CollectorRegistry) -> None:
        """From the stats each finished generation carries: prompt tokens looked up, and reused."""
        self.prefix_queried = Counter("helix_prefix_cache_queried_tokens", "Prompt tokens of finished generations "
                                      "(each looked up in the prefix cache)", registry=r)
        self.prefix_hits = Counter("helix_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache "
                                   "instead of being computed", registry=r)
        self.prefix_hit_rate = Gauge("helix_prefix_cache_hit_rate", "Hit / queried prompt tokens of the "
                                     "generations this ingress finished", registry=r)
        self._num_queried = self._num_hits = 0

    def _engine_gauges(self, r: CollectorRegistry) -> None:
        """Per pool, from the last `info` a replica of it answered (Ray's own export has every replica)."""
        self.engine_running = Gauge("helix_engine_running_sequences", "Sequences the engine is stepping",
                                    ["pool"], registry=r)
        self.engine_waiting = Gauge("helix_engine_waiting_sequences", "Sequences queued for KV blocks or a batch "
                                    "slot", ["pool"], registry=r)
        self.engine_kv_blocks = Gauge("helix_engine_kv_blocks", "KV cache blocks by state", ["pool", "state"],
                                      registry=r)
        self.engine_mean_k = Gauge("helix_engine_mean_k", "Mean K of the sequences that speculated in the "
                                   "engine's last step (0 if none did)", ["pool"], registry=r)
        self.engine_prefix_hit_rate = Gauge("helix_engine_prefix_cache_hit_rate", "Hit / queried tokens of the "
                                            "replica's prefix cache since it started", ["pool"], registry=r)

    def _pool_gauges(self, r: CollectorRegistry) -> None:
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
        num_drafted, num_accepted = stats.get("num_drafted", 0), stats.get("num_accepted", 0)
        self.drafted.inc(num_drafted)
        self.accepted.inc(num_accepted)
        if num_drafted:
            self.request_acceptance.observe(num_accepted / num_drafted)
            self._num_drafted += num_drafted
            self._num_accepted += num_accepted
            self.acceptance_rate.set(self._num_accepted / self._num_drafted)
        for proposer, counts in stats.get("by_proposer", {}).items():
            self.proposer_drafted.labels(proposer).inc(counts["num_drafted"])
            self.proposer_accepted.labels(proposer).inc(counts["num_accepted"])
        for position, accepted in enumerate(stats.get("per_position_accepted", [])):
            if accepted:
                self.accepted_per_position.labels(str(position)).inc(accepted)
        self._observe_prefix_cache(stats)

    def _observe_prefix_cache(self, stats: dict[str, Any]) -> None:
        num_queried, num_hits = stats.get("num_prompt_tokens", 0), stats.get("num_cached_tokens", 0)
        self.prefix_queried.inc(num_queried)
        self.prefix_hits.inc(num_hits)
        self._num_queried += num_queried
        self._num_hits += num_hits
        if self._num_queried:
            self.prefix_hit_rate.set(self._num_hits / self._num_queried)

    def observe_tokens(self, route: str, gap_s: float, num_tokens: int) -> None:
        """A chunk of `num_tokens` that arrived `gap_s` after the previous one."""
        for _ in range(num_tokens):
            self.itl.labels(route).observe(gap_s / num_tokens)

    def set_kv_usage(self, kv: dict[str, int]) -> None:
        self.kv_blocks.labels("used").set(kv["used_blocks"])
        self.kv_blocks.labels("free").set(kv["free_blocks"])
        if "cached_blocks" in kv:
            self.kv_blocks.labels("cached").set(kv["cached_blocks"])

    def set_pools(self, pools: dict[str, dict[str, Any]]) -> None:
        self.pool_device.clear()  # a pool's device labels change when it falls back or recovers
        for name, pool in pools.items():
            self.pool_healthy.labels(name).set(int(pool["healthy"]))
            self.pool_ongoing.labels(name).set(pool["ongoing_requests"])
            if "device" in pool:
                fallback = "cpu" if pool["device_fallback"] else ""
                self.pool_device.labels(name, pool["device"], pool["device_requested"], fallback).set(1)
            self._set_engine_state(name, pool)

    def _set_engine_state(self, name: str, pool: dict[str, Any]) -> None:
        kv = pool.get("kv_cache") or {}
        if "num_running" in kv:
            self.engine_running.labels(name).set(kv["num_running"])
            self.engine_waiting.labels(name).set(kv["num_waiting"])
            self.engine_kv_blocks.labels(name, "used").set(kv["used_blocks"])
            self.engine_kv_blocks.labels(name, "free").set(kv["free_blocks"])
            if "cached_blocks" in kv:
                self.engine_kv_blocks.labels(name, "cached").set(kv["cached_blocks"])
            if kv.get("prefix_cache_queried_tokens"):
                self.engine_prefix_hit_rate.labels(name).set(prefix_hit_rate(kv))
        if "last_step" in pool:
            self.engine_mean_k.labels(name).set(pool["last_step"]["mean_k"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


def prefix_hit_rate(kv: dict[str, int]) -> float:
    """Hit / queried tokens of an engine's prefix cache, from its `kv_usage` counters."""
    queried = kv.get("prefix_cache_queried_tokens", 0)
    return kv.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0


class EngineMetrics:
    """An engine replica's live state in Ray's metrics export (tagged with pool, deployment and replica)."""

    def __init__(self, pool_name: str, k_max: int):
        from ray.serve import metrics  # NOTE: imported here so the ingress never needs Ray's metrics module

        tags = ("pool",)
        self.running = metrics.Gauge("helix_engine_running_sequences", "Sequences the engine is stepping", tags)
        self.waiting = metrics.Gauge("helix_engine_waiting_sequences", "Sequences queued for KV blocks or a "
                                     "batch slot", tags)
        self.kv_blocks = metrics.Gauge("helix_engine_kv_blocks", "KV cache blocks by state", (*tags, "state"))
        self.mean_k = metrics.Gauge("helix_engine_mean_k", "Mean K of the sequences that speculated in the last "
                                    "step (0 if none did)", tags)
        self.prefix_hit_rate = metrics.Gauge("helix_engine_prefix_cache_hit_rate", "Hit / queried tokens of the "
                                             "prefix cache since the replica started", tags)
        by_proposer = (*tags, "proposer")
        self.k = metrics.Histogram("helix_engine_speculative_k", "K chosen per verify step of one sequence, by "
                                   "proposer", [float(k) for k in range(1, max(k_max, 1) + 1)], by_proposer)
        self.steps = metrics.Counter("helix_engine_steps", "Engine steps that produced output", tags)
        self.generated = metrics.Counter("helix_engine_generated_tokens", "Tokens the engine emitted", tags)
        self.drafted = metrics.Counter("helix_engine_draft_tokens", "Draft tokens proposed, by proposer",
                                       by_proposer)
        self.accepted = metrics.Counter("helix_engine_accepted_draft_tokens", "Draft tokens accepted, by proposer",
                                        by_proposer)
        for metric in (self.running, self.waiting, self.kv_blocks, self.mean_k, self.prefix_hit_rate, self.k,
                       self.steps, self.generated, self.drafted, self.accepted):
            metric.set_default_tags({"pool": pool_name})

    def set_kv_usage(self, kv: dict[str, int]) -> None:
        self.running.set(kv["num_running"])
        self.waiting.set(kv["num_waiting"])
        self.kv_blocks.set(kv["used_blocks"], {"state": "used"})
        self.kv_blocks.set(kv["free_blocks"], {"state": "free"})
        if "cached_blocks" in kv:
            self.kv_blocks.set(kv["cached_blocks"], {"state": "cached"})
            self.prefix_hit_rate.set(prefix_hit_rate(kv))

    def record_step(self, step: StepSummary) -> None:
        self.set_kv_usage(step.kv)
        self.mean_k.set(step.mean_k)
        self.steps.inc()
        if step.num_generated:
            self.generated.inc(step.num_generated)
        for proposer, k, accepted in step.speculated:
            tags = {"proposer": proposer}
            self.k.observe(k, tags)
            self.drafted.inc(k, tags)
            if accepted:
                self.accepted.inc(accepted, tags)


# ---- the per-request record and log line ---------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request as the ingress saw it; the engine streams it opened add their results."""

    request_id: str
    path: str
    started: float
    status_code: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    num_prompt_tokens: int = 0
    tokens_generated: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    ttft_s: float | None = None  # the first token of any of its generations

    def add_generation(self, pool: str, num_prompt_tokens: int, finish_reason: str | None, ttft_s: float | None,
                       stats: dict[str, Any]) -> None:
        self.pools.append(pool)
        self.finish_reasons.append(finish_reason or "none")
        self.num_prompt_tokens += num_prompt_tokens
        self.tokens_generated += stats.get("tokens_generated", 0)
        self.num_drafted += stats.get("num_drafted", 0)
        self.num_accepted += stats.get("num_accepted", 0)
        if ttft_s is not None and (self.ttft_s is None or ttft_s < self.ttft_s):
            self.ttft_s = ttft_s

    def fields(self, e2e_s: float) -> dict[str, Any]:
        rate = self.num_accepted / self.num_drafted if self.num_drafted else None
        return {
            "request_id": self.request_id, "path": self.path, "status_code": self.status_code,
            "finish_reason": ",".join(self.finish_reasons) or None, "pool": ",".join(sorted(set(self.pools))) or None,
            "num_prompt_tokens": self.num_prompt_tokens, "tokens_generated": self.tokens_generated,
            "num_drafted": self.num_drafted, "num_accepted": self.num_accepted, "acceptance_rate": rate,
            "ttft_s": self.ttft_s, "e2e_s": e2e_s,
        }


CURRENT_REQUEST: ContextVar[RequestRecord | None] = ContextVar("helix_request", default=None)


def log_request(record: RequestRecord, e2e_s: float) -> None:
    """One line: readable `key=value` text, and the same fields as JSON keys under `encoding: JSON`."""
    fields = record.fields(e2e_s)
    text = " ".join(f"{key}={_format(value)}" for key, value in fields.items())
    request_logger.info("request finished %s", text, extra=fields)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def ensure_request_id(scope: Scope) -> str:
    """The request's X-Request-ID; one is added if missing, so the handlers and the log use the same."""
    for key, value in scope["headers"]:
        if key == REQUEST_ID_HEADER:
            return value.decode("latin-1")
    request_id = uuid.uuid4().hex
    scope["headers"] = [*scope["headers"], (REQUEST_ID_HEADER, request_id.encode())]
    return request_id


class RequestObserverMiddleware:
    """Counts every request by route and status, and logs one line per generation request once its reply
    (streamed or not) has ended. Pure ASGI (unlike BaseHTTPMiddleware it leaves streaming and disconnects
    alone)."""

    def __init__(self, app: ASGIApp, metrics: HelixMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
        record = RequestRecord(ensure_request_id(scope), route, time.perf_counter())
        token = CURRENT_REQUEST.set(record)

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._count(record, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        except asyncio.CancelledError:  # the client left before the reply ended
            self._count(record, 499)
            raise
        except Exception:  # Starlette's outermost handler answers 500
            self._count(record, 500)
            raise
        finally:
            CURRENT_REQUEST.reset(token)
            if route in GENERATION_ROUTES:
                log_request(record, time.perf_counter() - record.started)

    def _count(self, record: RequestRecord, status_code: int) -> None:
        if record.status_code is None:
            record.status_code = status_code
            self.metrics.requests.labels(record.path, str(status_code)).inc()
