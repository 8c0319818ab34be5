"""A real local Ray + Serve app for the security, reliability and fuzz tests, with deployment options
(replicas, queue bounds) that `build_app` leaves to the YAML (`build_test_app`: local.build_graph)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from helix_serve.serving.local import build_graph as build_test_app  # noqa: F401  (re-exported for the tests)
from helix_serve.serving.local import free_port, local_serve  # noqa: F401

MODEL = "helix-test"
PROMPT = "the quick brown fox"


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
