"""configs/mixed-cluster.yaml on a simulated heterogeneous Ray cluster: each pool on its kind of node.

Three Ray nodes on this one machine: a CPU head (label accel=cpu), a "CUDA" node (declared num_gpus=1,
accel=gpu) and a "DirectML" node (custom resource directml=1, accel=directml). There is no real GPU or
DirectML adapter here, so the accelerator pools get `fallback: cpu`: their replicas go through the real
fallback path and run on CPU, while placement is still decided by the YAML's ray_actor_options.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from helix_serve.serving.local import free_port
from tests.serve_harness import CLUSTER

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mixed-cluster.yaml"
pytestmark = pytest.mark.own_cluster  # three nodes: runs last, after the shared cluster stops

POOLS = ("engine_cuda", "engine_directml", "engine_cpu")


def _scaled_down(target: Path, draft: Path) -> dict[str, Any]:
    """The shipped mixed-cluster config on the tiny pair: one small replica per pool, CPU fallback allowed."""
    config = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    app = config["applications"][0]
    app["args"].update(target_model=str(target), draft_model=str(draft), dtype="float32", num_kv_blocks=64,
                       torch_threads=1)
    for name in ("engine_cuda", "engine_directml"):
        app["args"]["pools"][name]["fallback"] = "cpu"  # no real accelerator on this machine (see above)
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        deployment["ray_actor_options"]["num_cpus"] = 0.1 if deployment["name"] == "HelixIngress" else 0.25
    return config


@pytest.fixture(scope="module")
def cluster(llama_pair):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    CLUSTER.stop()  # one driver, one cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "labels": {"accel": "cpu"},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1, labels={"accel": "gpu"})
    cluster.add_node(num_cpus=1, resources={"directml": 1}, labels={"accel": "directml"})
    port = free_port()
    ray.init(address=cluster.address)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        # The same path as `serve deploy`: the controller builds the app and applies the YAML's deployments.
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(_scaled_down(*llama_pair)))
        _wait_running(serve)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster, timeout=60) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        yield client


def _wait_running(serve: Any, timeout_s: float = 120) -> None:  # slow under load: 45 s once was not enough
    deadline = time.monotonic() + timeout_s
    while (status := serve.status().applications.get("helix")) is None or status.status != "RUNNING":
        if time.monotonic() > deadline or (status is not None and status.status == "DEPLOY_FAILED"):
            pytest.fail(f"helix is not running after {timeout_s} s: {status}")
        time.sleep(0.5)


def _node_kind(resources: dict[str, float]) -> str:
    return "gpu" if resources.get("GPU") else "directml" if resources.get("directml") else "cpu"


def test_each_pool_runs_only_on_its_kind_of_node(http):
    import ray
    from ray import serve

    kinds = {n["NodeID"]: _node_kind(n["Resources"]) for n in ray.nodes() if n["Alive"]}
    assert sorted(kinds.values()) == ["cpu", "directml", "gpu"]
    # One running replica per pool (the state API needs the dashboard, off here), and each replica
    # reports the node it runs on: together, every replica of every pool is on its kind of node.
    deployments = serve.status().applications["helix"].deployments
    assert {name: deployments[name].replica_states for name in POOLS} == {name: {"RUNNING": 1} for name in POOLS}
    pools = http.get("/health").json()["pools"]
    assert {name: kinds[pools[name]["node_id"]] for name in POOLS} == \
        {"engine_cuda": "gpu", "engine_directml": "directml", "engine_cpu": "cpu"}


def test_health_reports_each_pools_device_and_fallback(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["model_loaded"]
    pools = health["pools"]
    assert {name: (pools[name]["device_requested"], pools[name]["device"]) for name in POOLS} == \
        {"engine_cuda": ("cuda", "cpu"), "engine_directml": ("directml", "cpu"), "engine_cpu": ("cpu", "cpu")}
    assert "torch-directml" in pools["engine_directml"]["device_fallback"]
    assert "cuda" in pools["engine_cuda"]["device_fallback"] and pools["engine_cpu"]["device_fallback"] is None
    assert {pools[name]["capacity"] for name in POOLS} == {4.0, 2.0, 1.0}


def test_requests_are_served_by_every_pool(http):
    for i in range(7):
        response = http.post("/generate", json={"prompt": f"the quick brown fox {i}", "max_tokens": 2})
        assert response.status_code == 200, response.text
    served = {name: pool["requests_served"] for name, pool in http.get("/health").json()["pools"].items()}
    assert all(served[name] > 0 for name in POOLS), served
    metrics = http.get("/metrics").text
    for name in POOLS:
        assert f'helix_pool_requests_total{{pool="{name}"}}' in metrics
        assert f'helix_pool_healthy{{pool="{name}"}} 1.0' in metrics
