"""A real local Ray + Serve app for the security, reliability and fuzz tests, with deployment options
(replicas, queue bounds) that `build_app` leaves to the YAML."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from helix_serve.serving.local import free_port, local_serve  # noqa: F401  (re-exported for the tests)

MODEL = "helix-test"
PROMPT = "the quick brown fox"


def app_args(pair: tuple[Path, Path], **overrides: Any) -> dict[str, Any]:
    # Replicas import helix_serve from the installed package, never `tests`: pass paths, not fixtures.
    target, draft = pair
    args = {"target_model": str(target), "draft_model": str(draft), "device": "cpu", "dtype": "float32",
            "num_kv_blocks": 128, "served_model_name": MODEL, "max_batch_prompts": 4}
    return {**args, **overrides}


def build_test_app(args: dict[str, Any], engine_options: dict[str, Any] | None = None,
                   ingress_options: dict[str, Any] | None = None):
    """`build_app`'s graph (one pool), with Serve options applied to each deployment."""
    from helix_serve.serving.app_config import DEFAULT_POOL, HelixAppArgs
    from helix_serve.serving.engine_deployment import HelixEngine
    from helix_serve.serving.ingress import HelixIngress

    config = HelixAppArgs(**args)
    engine = HelixEngine.options(name=DEFAULT_POOL, **(engine_options or {})).bind(args, DEFAULT_POOL)
    return HelixIngress.options(**(ingress_options or {})).bind(
        {DEFAULT_POOL: engine}, {DEFAULT_POOL: 1.0}, config.routing, config.served_model_name,
        config.max_batch_prompts, config.security)


def kv_used(http: httpx.Client, headers: dict[str, str] | None = None) -> int:
    return http.get("/health", headers=headers).json()["kv_cache"]["used_blocks"]


def wait_kv_free(http: httpx.Client, timeout_s: float = 5.0) -> int:
    """KV blocks still in use once the engine had `timeout_s` to settle (0 unless something leaked)."""
    deadline = time.monotonic() + timeout_s
    while (used := kv_used(http)) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return used
