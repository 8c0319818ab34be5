"""Prefix-aware routing without a cluster: the affinity memory (longest prefix, staleness, bounds, forgetting),
the Serve request router's ranks (affinity, imbalance fallback, replicas appearing and leaving) on stand-in
replicas, and the ingress's pool choice following the same prefix."""

from __future__ import annotations

import asyncio

from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import ReplicaID

from helix_serve.serving.pools import POOL_IMBALANCE, Pool, PoolRouter
from helix_serve.serving.prefix_router import (BLOCK_CHARS, PrefixAffinity, PrefixAffinityRouter, prefix_hashes,
                                               prompt_text)
from helix_serve.serving.protocol import EngineRequest

DEPLOYMENT = DeploymentID(name="HelixEngine", app_name="helix")
SYSTEM = "You are a helpful assistant who answers in full sentences. " * 4


def chat(*turns: str) -> EngineRequest:
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": roles[i % 2], "content": t}
                                                           for i, t in enumerate(turns)]
    return EngineRequest("r", {}, messages=messages)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_conversations_next_turn_extends_its_prefix_hashes():
    first = prefix_hashes(prompt_text(chat("What is the capital of France?")))
    second = prefix_hashes(prompt_text(chat("What is the capital of France?", "Paris.", "And of Spain?")))
    assert len(first) >= 3 and second[: len(first) - 1] == first[: len(first) - 1]
    other = prefix_hashes(prompt_text(chat("Something else entirely")))
    assert other[:4] == first[:4] and other[-1] not in first  # the shared system prompt, then its own text
    assert prefix_hashes("x" * (BLOCK_CHARS - 1)) == []  # no full block, nothing to route by
    assert prompt_text(EngineRequest("r", {}, prompt="plain")) == "plain"


def test_affinity_prefers_the_longest_fresh_prefix_and_forgets():
    clock = FakeClock()
    affinity = PrefixAffinity(ttl_s=10.0, max_entries=1000, clock=clock)
    short, long = prefix_hashes("a" * 200), prefix_hashes("a" * 200 + "b" * 200)
    affinity.record(short, "A")
    affinity.record(long, "B")  # B was sent the longer prompt: it now holds the shared blocks too
    assert affinity.best(long, {"A", "B"}) == {"B"}
    assert affinity.best(long, {"A"}) == set()  # the shared blocks went to B last: A is not known to hold them
    affinity.record(short, "A")
    assert affinity.matches(long, {"A", "B"}) == {"A": len(short), "B": len(long)}
    assert affinity.best(long, {"A", "B"}) == {"B"}
    clock.now = 11.0  # stale knowledge is ignored
    assert affinity.best(long, {"A", "B"}) == set()
    affinity.record(long, "B")
    affinity.forget("B")
    assert affinity.best(long, {"A", "B"}) == set()
    shared = PrefixAffinity(clock=clock)  # a remembered prefix under half the prompt does not count
    shared.record(short, "A")
    assert shared.best(prefix_hashes("a" * 200 + "b" * 200), {"A"}) == set()
    assert shared.best(prefix_hashes("a" * 200 + "b" * 150), {"A"}) == {"A"}
    few_words = prefix_hashes("the quick brown fox 1")  # one block in common: nothing worth following
    shared.record(few_words, "A")
    assert shared.best(prefix_hashes("the quick brown fox 2"), {"A"}) == set()
    bounded = PrefixAffinity(max_entries=3, clock=clock)
    bounded.record(long, "A")  # 6 blocks: only the last 3 recorded are kept, so no chain from the start
    assert len(bounded._seen) == 3 and bounded.best(long, {"A"}) == set()


class FakeReplica:
    def __init__(self, name: str, max_ongoing: int = 16):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = max_ongoing

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


class FakePending:
    def __init__(self, request: EngineRequest):
        self.args = [request]


def _router() -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    router.initialize_state(imbalance_threshold=4)
    return router


def _names(ranks) -> list[set[str]]:
    return [{r.replica_id.unique_id for r in rank} for rank in ranks]


def test_the_router_ranks_the_replica_holding_the_prefix_first_unless_load_is_imbalanced():
    async def scenario():
        router = _router()
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        turn1 = FakePending(chat("What is the capital of France?"))
        assert _names(await router.choose_replicas([a, b], turn1)) == [{"a", "b"}]  # nothing known: least loaded
        router.on_request_routed(turn1, a.replica_id, None)
        turn2 = FakePending(chat("What is the capital of France?", "Paris.", "And of Spain?"))
        assert _names(await router.choose_replicas([a, b], turn2)) == [{"a"}]
        router.on_request_routed(turn2, a.replica_id, None)
        cache = router.replica_queue_len_cache
        cache.update(a.replica_id, 9)
        cache.update(b.replica_id, 1)  # 8 more on a than b, over the threshold of 4: load wins
        assert _names(await router.choose_replicas([a, b], turn2)) == [{"a", "b"}]
        cache.update(a.replica_id, 5)
        assert _names(await router.choose_replicas([a, b], turn2)) == [{"a"}]
        c = FakeReplica("c")  # a replica appears: it holds nothing yet
        router.update_replicas([a, b, c])
        assert _names(await router.choose_replicas([a, b, c], turn2)) == [{"a"}]
        cache.update(a.replica_id, 16)  # a is full (max_ongoing_requests): the least loaded of all instead
        cache.update(b.replica_id, 14)
        cache.update(c.replica_id, 13)
        assert _names(await router.choose_replicas([a, b, c], turn2)) == [{"a", "b", "c"}]
        router.update_replicas([b, c])  # a leaves: what it held is forgotten, the next turn goes by load
        assert _names(await router.choose_replicas([b, c], turn2)) == [{"b", "c"}]
        assert _names(await router.choose_replicas([b], turn2)) == [{"b"}]
        no_prompt = FakePending(EngineRequest("r", {}))
        assert _names(await router.choose_replicas([b, c], no_prompt)) == [{"b", "c"}]

    asyncio.run(scenario())


def test_the_ingress_sends_a_prefix_to_the_pool_that_served_it_unless_that_pool_is_overloaded():
    cpu, cuda = Pool("cpu", None, 1.0, healthy=True), Pool("cuda", None, 1.0, healthy=True)
    router = PoolRouter([cpu, cuda], probe_timeout_s=1.0, probe_interval_s=10.0)
    prefix = prefix_hashes(prompt_text(chat("What is the capital of France?")))
    assert router.pick(set(), prefix) is cpu  # nothing known: least loaded (ties by name order)
    router.affinity.record(prefix, "cuda")
    cpu.ongoing = 0
    cuda.ongoing = 3
    assert router.pick(set(), prefix) is cuda
    cuda.ongoing = int(POOL_IMBALANCE) + 1
    assert router.pick(set(), prefix) is cpu
    assert router.pick({"cpu"}, prefix) is cuda  # retries still reach every pool
    cuda.ongoing, cuda.healthy = 0, False  # a pool that is down is no holder
    assert router.pick(set(), prefix) is cpu
