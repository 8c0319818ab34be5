"""`build_app`: the Serve application builder that the YAML `import_path` points at."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from helix_serve.serving.app_config import HelixAppArgs
from helix_serve.serving.engine_deployment import HelixEngine
from helix_serve.serving.ingress import HelixIngress


def build_app(args: dict[str, Any]) -> Application:
    """Ingress → engine graph. Deployment options (CPUs, GPUs, replicas, batching) come from the YAML."""
    config = HelixAppArgs(**args)
    config.engine_config()  # fail at deploy time, not in a replica, on inconsistent engine settings
    engine = HelixEngine.bind(config.model_dump())
    return HelixIngress.bind(engine, config.served_model_name, config.max_batch_prompts)
