"""`build_app`: the Serve application builder that the YAML `import_path` points at."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from helix_serve.serving.app_config import HelixAppArgs
from helix_serve.serving.engine_deployment import HelixEngine
from helix_serve.serving.ingress import HelixIngress


def build_app(args: dict[str, Any]) -> Application:
    """Ingress → one engine deployment per pool. Replicas, resources and batching per pool come from the YAML,
    which addresses each pool's deployment by the pool's name."""
    config = HelixAppArgs(**args)
    config.engine_config()  # fail at deploy time, not in a replica, on inconsistent engine settings
    pools = config.engine_pools()
    dumped = config.model_dump(exclude_unset=True)  # what was given: defaults can't trip the pools check
    engines = {name: HelixEngine.options(name=name).bind(dumped, name) for name in pools}
    capacities = {name: pool.capacity for name, pool in pools.items()}
    return HelixIngress.bind(engines, capacities, config.routing, config.served_model_name,
                             config.max_batch_prompts, config.security)
