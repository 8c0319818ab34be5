"""A real local Ray + Serve app for the serving tests, with deployment options (replicas, queue bounds) that
`build_app` leaves to the YAML (`build_test_app`: local.build_graph).

The serving modules share one cluster (`CLUSTER`): starting one costs ~10 s and stopping it ~6 s, a dozen times
over. Each module deploys its app on it (`CLUSTER.serving`) and deletes it afterwards; conftest runs the serving
modules together, at the end, and stops the cluster when the session ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from helix_serve.serving.local import build_graph as build_test_app  # noqa: F401  (re-exported for the tests)
from helix_serve.serving.local import local_cluster, local_serve  # noqa: F401

MODEL = "helix-test"
PROMPT = "the quick brown fox"
# Every engine replica pushes its Ray metrics each second instead of every 10 s (test_observability reads them).
CLUSTER_ENV = {"RAY_metrics_report_interval_ms": "1000"}


class SharedCluster:
    """The session's local cluster, started on first use; `stop` lets a module start a cluster of its own."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self.url = ""

    def start(self) -> str:
        if self._stack is None:
            stack = ExitStack()
            self.url = stack.enter_context(local_cluster(CLUSTER_ENV))
            self._stack = stack
        return self.url

    def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    @contextmanager
    def serving(self, app, name: str = "helix") -> Iterator[str]:
        """`app` served at the cluster's root while the block runs; yields the base URL."""
        from ray import serve

        url = self.start()
        try:
            serve.run(app, name=name, route_prefix="/")
            yield url
        finally:
            try:  # a failed deploy too: its app would keep the route, and later apps could not take it
                serve.delete(name)  # its replicas stopped (killed): the next module gets the cluster's CPUs
            except Exception:
                self.stop()  # the next module starts a fresh cluster rather than wait on this one
                raise


CLUSTER = SharedCluster()


def app_args(pair: tuple[Path, Path], **overrides: Any) -> dict[str, Any]:
    # Replicas import helix_serve from the installed package, never `tests`: pass paths, not fixtures.
    target, draft = pair
    args = {"target_model": str(target), "draft_model": str(draft), "device": "cpu", "dtype": "float32",
            "num_kv_blocks": 128, "served_model_name": MODEL, "max_batch_prompts": 4}
    return {**args, **overrides}


def kv_used(http: httpx.Client, headers: dict[str, str] | None = None) -> int:
    return http.get("/health", headers=headers).json()["kv_cache"]["used_blocks"]


def wait_kv_free(http: httpx.Client, timeout_s: float = 5.0) -> int:
    """KV blocks still in use once the engine had `timeout_s` to settle (0 unless something leaked)."""
    deadline = time.monotonic() + timeout_s
    while (used := kv_used(http)) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return used
