"""Two engine replicas behind Helix's prefix-aware request router on a local cluster: every conversation's next
turn lands on the replica that served its history, so its prompt starts from that replica's prefix cache.

With Serve's default router (power of two choices over idle replicas: a coin flip) each next turn would find its
history on the other replica half of the time; 8 conversations all hitting by chance is a 1-in-256 event."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

from tests.serve_harness import CLUSTER, MODEL, app_args, build_test_app, wait_kv_free

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

ROUTER = {"request_router_class": "helix_serve.serving.prefix_router.PrefixAffinityRouter",
          "request_router_kwargs": {"imbalance_threshold": 4}}
ENGINE = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "request_router_config": ROUTER}
ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["rivers", "mountains", "castles", "harbours", "forests", "deserts", "glaciers", "islands"]


@pytest.fixture(scope="module")
def http(llama_pair):
    app = build_test_app(app_args(llama_pair), ENGINE)
    with CLUSTER.serving(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _complete(http: httpx.Client, prompt: str) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def test_each_conversations_next_turn_reuses_its_history_on_the_same_replica(http):
    histories = {}
    for topic in TOPICS:  # every conversation's first turn: distinct text from the first character
        prompt = f"{topic}: a long conversation about {topic}, the {topic} of the north and of the south. " * 3
        first = _complete(http, prompt)
        assert first["usage"]["prompt_tokens"] >= 48
        histories[topic] = prompt + first["choices"][0]["text"]
    cached = {}
    for topic, history in histories.items():
        second = _complete(http, history + f" Tell me more about {topic}.")
        cached[topic] = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert all(tokens >= 32 for tokens in cached.values()), cached  # >= 2 blocks of 16 reused, on every turn
    assert wait_kv_free(http) == 0


def test_the_routing_benchmark_chats_and_reports_against_a_real_server(http, tmp_path):
    """bench_routing's client and report on this module's server (its full run serves three configurations)."""
    spec = importlib.util.spec_from_file_location("bench_routing", ROOT / "scripts" / "bench_routing.py")
    sys.path.insert(0, str(ROOT / "scripts"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.MODEL = MODEL
    records: list[dict] = []
    for topic in TOPICS[:2]:  # the benchmark's long notes exceed the tiny model's context
        bench.conversation(http, f"Tell me about {topic}, all about {topic}.", turns=2, max_tokens=4, think_s=0.01,
                           seed=0, out=records)
    assert [r["turn"] for r in records] == [0, 1, 0, 1]
    later = [r for r in records if r["turn"] == 1]
    assert all(r["cached_tokens"] >= 16 and r["prompt_tokens"] > r["cached_tokens"] for r in later), records
    summary = bench.summarize(records, seconds=1.0)
    assert 0 < summary["hit_rate"] < 1 and 0 < summary["ttft_p50_s"] <= summary["ttft_p99_s"]
    results = dict.fromkeys(bench.CONFIGS, summary)
    assert [g["met"] for g in bench.report(results)] == [True, False]  # same numbers: hit rate 1x, TTFT 1x
    bench.plot(results, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 0
