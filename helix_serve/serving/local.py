"""Serve a Helix app on a private local Ray cluster, loopback only (tests, soak and load scripts)."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (32768+, where Ray's own outgoing connections
    take ports between this check and the bind: a CI run lost its proxy that way) and above Ray's worker ports
    (10002-19999)."""
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-29999")


@contextmanager
def local_cluster(env: dict[str, str] | None = None, log_to_driver: bool = True,
                  reserved_cores: Sequence[int] = ()) -> Iterator[str]:
    """Start a new local cluster (never join another session's) with Serve on a free port; yield its base URL.
    Apps are then served with `serve.run(app, name="helix", route_prefix="/")` (a later one replaces it).
    reserved_cores: this process, and so the cluster it starts, keeps off them while it runs (as `helix serve`
    does)."""
    from helix_serve.serving.cpu_affinity import keep_off, move_process

    home = os.sched_getaffinity(0) if reserved_cores else None
    keep_off(reserved_cores)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.update(env or {})  # inherited by the raylet, so by every replica
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=log_to_driver)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()  # even if Serve's shutdown failed: the next cluster of this process needs it gone
        for name in env or {}:
            os.environ.pop(name, None)
        if home is not None:
            move_process(home)


@contextmanager
def local_serve(app, env: dict[str, str] | None = None, log_to_driver: bool = True,
                reserved_cores: Sequence[int] = ()) -> Iterator[str]:
    """A new local cluster serving `app`; yields its base URL."""
    from ray import serve

    with local_cluster(env, log_to_driver, reserved_cores) as url:
        serve.run(app, name="helix", route_prefix="/")
        yield url


def build_graph(args: dict[str, Any], engine_options: dict[str, Any] | None = None,
                ingress_options: dict[str, Any] | None = None):
    """`build_app`'s graph with Serve options applied to every engine deployment and to the ingress, as a YAML
    would."""
    from helix_serve.serving.app import bind_graph
    from helix_serve.serving.app_config import HelixAppArgs

    return bind_graph(HelixAppArgs(**args), engine_options, ingress_options)
