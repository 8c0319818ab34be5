"""Routing across engine pools, against fake deployment handles: load spreading, retries, probes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import RayActorError

from helix_serve.serving import openai_format
from helix_serve.serving.engine_client import EngineClient, EngineRejectedError, EnginesUnavailableError
from helix_serve.serving.ingress import choice_requests
from helix_serve.serving.metrics import CURRENT_REQUEST, HelixMetrics, RequestRecord
from helix_serve.serving.pools import Pool, PoolRouter
from helix_serve.serving.protocol import EngineChunk, EngineRequest

TIMEOUT_S = 0.05
INFO = {"target_model": "t", "draft_model": "d", "eagle_head": None, "proposers": ["draft", "ngram"],
        "has_draft": True, "max_model_len": 64, "device": "cpu",
        "device_requested": "cpu", "device_fallback": None, "dtype": "float32", "dtype_requested": "auto",
        "quantization": "none", "quantization_requested": "auto", "int4_dense_rows": 0,
        "lm_head": "float32",
        "kv_cache": {"num_blocks": 8, "used_blocks": 1, "free_blocks": 7, "block_size": 4, "pool_bytes": 100,
                     "cached_blocks": 2, "prefix_cache_queried_tokens": 40, "prefix_cache_hit_tokens": 8}}


class FakeStream:
    """A DeploymentResponseGenerator: admission then a final chunk; `hang` never admits, `error` raises."""

    def __init__(self, request_id: str, behaviour: str):
        self.behaviour = behaviour
        self.cancelled = False
        self.chunks = [EngineChunk(request_id, num_prompt_tokens=3), EngineChunk(request_id, text="ok",
                                                                                 finished=True, stats={})]
        if behaviour == "reject":
            self.chunks = [EngineChunk(request_id, finished=True, error="too long", status_code=413)]

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> list[EngineChunk]:
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        if self.behaviour == "dead":
            raise RayActorError()
        if not self.chunks:
            raise StopAsyncIteration
        return [self.chunks.pop(0)]  # the replica's messages are lists of chunks

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A pool's DeploymentHandle with the `generate` and `info` methods the ingress calls."""

    def __init__(self, behaviour: str = "ok"):
        self.behaviour = behaviour
        self.streams: list[FakeStream] = []
        self.generate = SimpleNamespace(options=lambda stream: SimpleNamespace(remote=self._generate))
        self.info = SimpleNamespace(remote=self._info)

    def _generate(self, request: EngineRequest) -> FakeStream:
        self.streams.append(FakeStream(request.request_id, self.behaviour))
        return self.streams[-1]

    def _info(self) -> asyncio.Future:
        answer = asyncio.get_running_loop().create_future()
        if self.behaviour == "dead":
            answer.set_exception(RayActorError())
        elif self.behaviour != "hang":
            answer.set_result(INFO)
        return answer


def make_client(**pools: tuple[FakeHandle, float]) -> tuple[EngineClient, dict[str, Pool]]:
    by_name = {name: Pool(name, handle, capacity) for name, (handle, capacity) in pools.items()}
    router = PoolRouter(list(by_name.values()), probe_timeout_s=TIMEOUT_S, probe_interval_s=60)
    return EngineClient(router, HelixMetrics(), admission_timeout_s=TIMEOUT_S), by_name


def request(i: int = 0) -> EngineRequest:
    return EngineRequest(f"r{i}", {"max_tokens": 1}, prompt="hi")


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def test_sequential_requests_spread_by_capacity():
    client, pools = make_client(small=(FakeHandle(), 1.0), big=(FakeHandle(), 3.0))

    async def scenario() -> list[str]:
        return [(await client.open(request(i), "/generate")).pool_name for i in range(8)]

    assert run(scenario()) == ["small", "big", "big", "big", "small", "big", "big", "big"]
    assert {name: p.ongoing for name, p in pools.items()} == {"small": 2, "big": 6}  # streams never drained


def test_ongoing_requests_weighted_by_capacity_and_released_when_done():
    client, pools = make_client(a=(FakeHandle(), 1.0), b=(FakeHandle(), 2.0))

    async def scenario() -> list[str]:
        streams = [await client.open(request(i), "/generate") for i in range(3)]
        names = [s.pool_name for s in streams]
        for stream in streams:
            assert (await stream.collect()).text == "ok"
        return names

    assert run(scenario()) == ["a", "b", "b"]
    assert pools["a"].ongoing == pools["b"].ongoing == 0


def test_a_requests_log_record_counts_each_prompt_once_as_usage_does():
    """OpenAI's n: every choice's stream reports its prompt's 3 tokens; the prompt was sent once."""
    client, _ = make_client(cpu=(FakeHandle(), 1.0))
    record = RequestRecord("req", "/v1/completions", 0.0)

    async def scenario() -> list:
        CURRENT_REQUEST.set(record)  # as the ingress's middleware does for each HTTP request
        requests = choice_requests("req", {"max_tokens": 1}, 4, [{"prompt": "a"}, {"prompt": "b"}])
        return [await client.generate(r, "/v1/completions") for r in requests]

    generations = run(scenario())
    usage = openai_format.completion("cmpl-req", "m", 0, generations, 4, False)["usage"]
    assert record.num_prompt_tokens == usage["prompt_tokens"] == 2 * 3
    assert len(record.finish_reasons) == 8


def test_pool_that_never_admits_is_retried_elsewhere_then_skipped():
    pending, live = FakeHandle("hang"), FakeHandle()
    client, pools = make_client(pending=(pending, 4.0), live=(live, 1.0))

    async def scenario() -> list[str]:
        return [(await client.open(request(i), "/generate")).pool_name for i in range(3)]

    assert run(scenario()) == ["live", "live", "live"]
    assert len(pending.streams) == 1 and pending.streams[0].cancelled  # tried once, then ranked last
    assert pools["pending"].healthy is False and pools["pending"].ongoing == 0
    assert "TimeoutError" in pools["pending"].error


def test_dead_replica_is_retried_before_anything_streamed():
    client, pools = make_client(dead=(FakeHandle("dead"), 1.0), live=(FakeHandle(), 1.0))
    generation = run(client.generate(request(), "/generate"))
    assert generation.text == "ok"
    assert pools["dead"].healthy is False and "RayActorError" in pools["dead"].error
    assert (pools["dead"].served, pools["live"].served) == (0, 1)


def test_rejection_is_the_requests_fault_and_not_retried():
    rejecting, other = FakeHandle("reject"), FakeHandle()
    client, pools = make_client(rejecting=(rejecting, 1.0), other=(other, 1.0))
    with pytest.raises(EngineRejectedError) as info:
        run(client.open(request(), "/generate"))
    assert info.value.status_code == 413 and not other.streams
    assert (pools["rejecting"].ongoing, pools["rejecting"].served) == (0, 0)


def test_no_pool_can_take_the_request_is_503():
    client, _ = make_client(a=(FakeHandle("hang"), 1.0), b=(FakeHandle("dead"), 1.0))
    with pytest.raises(EnginesUnavailableError) as info:
        run(client.open(request(), "/generate"))
    assert info.value.status_code == 503
    assert "a: TimeoutError" in info.value.message and "b: RayActorError" in info.value.message


def test_probes_mark_pending_pool_down_and_health_is_degraded():
    pending = FakeHandle("hang")
    client, pools = make_client(cpu=(FakeHandle(), 1.0), pending=(pending, 1.0))
    health = run(client.info())
    assert health["status"] == "degraded" and health["device"] == "cpu" and health["quantization"] == "none"
    assert health["proposers"] == ["draft", "ngram"] and health["eagle_head"] is None
    assert health["kv_cache"] == INFO["kv_cache"]  # only the live pool's replica counts
    assert health["pools"]["cpu"]["healthy"] and health["pools"]["cpu"]["device"] == "cpu"
    assert not health["pools"]["pending"]["healthy"] and "TimeoutError" in health["pools"]["pending"]["error"]
    pending.behaviour = "ok"  # its replica came up: the next probe brings the pool back
    health = run(client.info())
    assert health["status"] == "ok" and health["kv_cache"]["used_blocks"] == 2
    assert pools["pending"].healthy and pools["pending"].error is None


def test_health_without_any_live_pool_raises():
    client, _ = make_client(a=(FakeHandle("hang"), 1.0))
    with pytest.raises(RuntimeError, match="no engine pool answered"):
        run(client.info())
