"""Observability over HTTP: /metrics moves by exactly the traffic sent, each generation request logs one
structured line carrying its X-Request-ID, and the engine's state reaches Ray's own metrics export."""

from __future__ import annotations

import glob
import json
import os
import re
import time
import uuid

import httpx
import pytest

from tests.serve_harness import CLUSTER, PROMPT, app_args, build_test_app

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

GREEDY = {"prompt": PROMPT, "max_tokens": 7, "ignore_eos": True, "temperature": 0, "num_speculative_tokens": 3}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@pytest.fixture(scope="module")
def session(llama_pair):
    """(base URL, Ray logs dir, Ray's metrics export port) of an app whose ingress logs JSON."""
    import ray

    app = build_test_app(app_args(llama_pair), {"ray_actor_options": {"num_cpus": 0.5}},
                         {"logging_config": {"encoding": "JSON"}})
    # The shared cluster's replicas push their Ray metrics every second (CLUSTER_ENV); the app's own name tells its
    # samples in Ray's export apart from earlier modules'.
    with CLUSTER.serving(app, name="observability") as base_url:
        node = ray._private.worker._global_node
        yield base_url, node.get_logs_dir_path(), node.metrics_export_port


@pytest.fixture(scope="module")
def http(session):
    with httpx.Client(base_url=session[0], timeout=60) as client:
        yield client


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, labels as Prometheus writes them (sorted by the client, in order given)."""
    samples = {}
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def test_metrics_move_by_exactly_the_traffic_sent(http):
    before = parse_metrics(http.get("/metrics").text)
    bodies = []
    for _ in range(3):
        response = http.post("/generate", json=GREEDY)
        assert response.status_code == 200, response.text
        bodies.append(response.json())
    assert http.post("/generate", json={"prompt": "   "}).status_code == 422
    after = parse_metrics(http.get("/metrics").text)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    num_drafted, num_accepted = sum(b["num_drafted"] for b in bodies), sum(b["num_accepted"] for b in bodies)
    assert all(b["tokens_generated"] == 7 for b in bodies) and num_drafted > 0
    assert moved('helix_http_requests_total{route="/generate",status="200"}') == 3
    assert moved('helix_http_requests_total{route="/generate",status="422"}') == 1
    assert moved('helix_http_requests_total{route="/metrics",status="200"}') == 1  # the first scrape
    assert moved('helix_generated_tokens_total{route="/generate"}') == 21
    assert moved("helix_draft_tokens_total") == num_drafted
    assert moved("helix_accepted_draft_tokens_total") == num_accepted
    assert moved("helix_draft_tokens_total") - moved("helix_accepted_draft_tokens_total") == num_drafted - num_accepted
    assert moved('helix_time_to_first_token_seconds_count{route="/generate"}') == 3
    assert moved('helix_request_latency_seconds_count{route="/generate"}') == 3
    # The prefill brings each request's first token alone; the other 6 are inter-token gaps.
    assert moved('helix_inter_token_latency_seconds_count{route="/generate"}') == 18
    assert moved("helix_speculative_k_sum") == num_drafted  # one K per verify step: they add up to the drafts
    assert 0 < moved("helix_speculative_k_count") <= 18
    assert after["helix_speculative_k_sum"] / after["helix_speculative_k_count"] <= 3
    assert moved("helix_request_acceptance_rate_count") == 3
    assert after["helix_draft_acceptance_rate"] == pytest.approx(
        after["helix_accepted_draft_tokens_total"] / after["helix_draft_tokens_total"])
    # Engine state, refreshed from the pool's `info` at scrape time: idle again, every block free.
    (pool,) = [k[k.index('"') + 1:k.rindex('"')] for k in after if k.startswith("helix_engine_running_sequences{")]
    assert after[f'helix_engine_running_sequences{{pool="{pool}"}}'] == 0
    assert after[f'helix_engine_waiting_sequences{{pool="{pool}"}}'] == 0
    assert after[f'helix_engine_kv_blocks{{pool="{pool}",state="used"}}'] == 0
    assert after[f'helix_engine_kv_blocks{{pool="{pool}",state="free"}}'] == 128
    assert 0 <= after[f'helix_engine_mean_k{{pool="{pool}"}}'] <= 3


def request_log_lines(logs_dir: str, request_id: str, timeout_s: float = 5.0) -> list[dict]:
    """The ingress's JSON `request finished` lines for one request id (waits for the file to catch up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = []
        for path in glob.glob(os.path.join(logs_dir, "serve", "replica_*HelixIngress*.log")):
            with open(path) as log:
                lines += [json.loads(line) for line in log if request_id in line and line.startswith("{")]
        found = [line for line in lines if line["message"].startswith("request finished")]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_one_log_line_per_request_with_its_request_id(http, session):
    logs_dir = session[1]
    response = http.post("/generate", json={**GREEDY, "max_tokens": 5})
    body, request_id = response.json(), response.headers["x-request-id"]
    (line,) = request_log_lines(logs_dir, request_id)
    assert line["request_id"] == request_id == body["request_id"]
    assert line["path"] == "/generate" and line["status_code"] == 200 and line["finish_reason"] == "length"
    assert line["tokens_generated"] == 5 and line["num_prompt_tokens"] == body["num_prompt_tokens"]
    assert (line["num_drafted"], line["num_accepted"]) == (body["num_drafted"], body["num_accepted"])
    assert line["e2e_s"] >= line["ttft_s"] > 0 and "HelixIngress" in line["deployment"]

    with http.stream("POST", "/generate/stream", json={**GREEDY, "max_tokens": 6}) as streamed:
        stream_id = streamed.headers["x-request-id"]
        streamed.read()
    (line,) = request_log_lines(logs_dir, stream_id)
    assert line["path"] == "/generate/stream" and line["status_code"] == 200 and line["tokens_generated"] == 6

    chosen = f"client-chosen-{uuid.uuid4().hex[:8]}"  # the shared cluster's logs hold other modules' requests too
    rejected = http.post("/generate", json={"prompt": "  "}, headers={"X-Request-ID": chosen})
    assert rejected.status_code == 422 and rejected.headers["x-request-id"] == chosen
    (line,) = request_log_lines(logs_dir, chosen)
    assert line["status_code"] == 422 and line["tokens_generated"] == 0 and line["finish_reason"] is None


def test_engine_state_reaches_rays_metrics_export(http, session):
    """The engine replica's own gauges, tagged by pool and replica, in Ray's Prometheus export."""
    export = f"http://127.0.0.1:{session[2]}/metrics"
    assert http.post("/generate", json=GREEDY).status_code == 200
    def free_blocks(samples: dict) -> float:
        return sum(v for k, v in samples.items() if k.startswith("ray_helix_engine_kv_blocks{") and 'state="free"' in k)

    def this_app(samples: dict) -> dict:  # the shared cluster's export may still hold earlier modules' replicas
        return {k: v for k, v in samples.items() if 'application="observability"' in k}

    # Wait for the names and for the value exported after the request finished (an export may catch it mid-step).
    deadline, text = time.monotonic() + 15, ""
    while time.monotonic() < deadline:
        text = httpx.get(export, timeout=10).text
        if "ray_helix_engine_speculative_k_count" in text and free_blocks(this_app(parse_metrics(text))) == 128:
            break
        time.sleep(0.5)
    samples = this_app(parse_metrics(text))
    kv = {k: v for k, v in samples.items() if k.startswith("ray_helix_engine_kv_blocks{")}
    assert kv and all('pool="' in k and 'replica="' in k for k in kv), text[-2000:]
    assert free_blocks(samples) == 128
    assert any(k.startswith("ray_helix_engine_running_sequences{") for k in samples)
    assert sum(v for k, v in samples.items() if k.startswith("ray_helix_engine_speculative_k_count")) > 0
    assert sum(v for k, v in samples.items() if k.startswith("ray_helix_engine_generated_tokens_total")) > 0
