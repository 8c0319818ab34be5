"""Serve a Helix app on a private local Ray cluster, loopback only (tests, soak and load scripts)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(app, env: dict[str, str] | None = None, log_to_driver: bool = True) -> Iterator[str]:
    """Start a new local cluster (never join another session's), serve `app`, yield its base URL."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.update(env or {})  # inherited by the raylet, so by every replica
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=log_to_driver)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(app, name="helix", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for name in env or {}:
            os.environ.pop(name, None)
