"""Autoscaling on a local cluster: load scales the engine pool from 1 replica to 2 and, once it stops, back to 1,
with every request answered in full while a replica starts, serves and drains (Serve waits for a replica's
ongoing streams before stopping it: graceful_shutdown_timeout_s)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from ray import serve

from helix_serve.serving.app_config import DEFAULT_POOL
from tests.serve_harness import CLUSTER, MODEL, PROMPT, app_args, build_test_app, wait_kv_free

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

ENGINE = {"ray_actor_options": {"num_cpus": 0.5}, "graceful_shutdown_timeout_s": 60,
          "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                 "upscale_delay_s": 0.5, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                 "look_back_period_s": 1}}
INGRESS = {"ray_actor_options": {"num_cpus": 0.25}}  # the cluster has 2 CPUs: room for two engine replicas
STREAM = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True, "stream": True,
          "speculative": False}


@pytest.fixture(scope="module")
def base_url(llama_pair):
    with CLUSTER.serving(build_test_app(app_args(llama_pair), ENGINE, INGRESS)) as url:
        yield url


def _running_replicas() -> int:
    deployment = serve.status().applications["helix"].deployments[DEFAULT_POOL]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for(replicas: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _running_replicas() == replicas:
            return True
        time.sleep(0.25)
    return False


def test_load_scales_the_pool_up_and_back_down_without_losing_a_request(base_url):
    assert _running_replicas() == 1
    outcomes: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as http:
            while not stop.is_set():
                finish, tokens = None, 0
                with http.stream("POST", "/v1/completions", json=STREAM) as response:
                    if response.status_code != 200:
                        outcomes.append(f"status {response.status_code}")
                        continue
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            tokens += 1
                            finish = choice.get("finish_reason") or finish
                outcomes.append(finish or "cut")

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    scaled_up = _wait_for(2, timeout_s=90)
    time.sleep(3)  # both replicas serve a while
    stop.set()
    for thread in threads:
        thread.join()
    assert scaled_up, "4 concurrent streams against a target of 1 ongoing request did not add a replica"
    assert _wait_for(1, timeout_s=60), "the pool did not scale back down once the load stopped"
    assert outcomes and set(outcomes) == {"length"}, outcomes  # every stream answered in full
    with httpx.Client(base_url=base_url, timeout=60) as http:
        assert wait_kv_free(http) == 0
