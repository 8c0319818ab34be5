"""`build_app`: the Serve application builder that the YAML `import_path` points at."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from helix_serve.serving.app_config import HelixAppArgs
from helix_serve.serving.engine_deployment import HelixEngine
from helix_serve.serving.ingress import HelixIngress


def build_app(args: dict[str, Any]) -> Application:
    """Ingress → one engine deployment per pool of each served model. Replicas, resources and batching per pool
    come from the YAML, which addresses each pool's deployment by the pool's name."""
    return bind_graph(HelixAppArgs(**args))


def bind_graph(config: HelixAppArgs, engine_options: dict[str, Any] | None = None,
               ingress_options: dict[str, Any] | None = None) -> Application:
    """The graph, with Serve options (`num_replicas`, ...) applied to every engine deployment and to the ingress
    (tests and scripts: a YAML sets them per deployment instead)."""
    engines: dict[str, dict[str, Application]] = {}
    capacities: dict[str, float] = {}
    for d in config.engine_deployments():
        d.model_args.engine_config()  # fail at deploy time, not in a replica, on inconsistent engine settings
        # What was given (exclude_unset): defaults can't trip the pools check in the replica.
        engines.setdefault(d.model, {})[d.name] = HelixEngine.options(name=d.name, **(engine_options or {})).bind(
            d.model_args.model_dump(exclude_unset=True), d.name, d.pool.model_dump())
        capacities[d.name] = d.pool.capacity
    return HelixIngress.options(**(ingress_options or {})).bind(engines, capacities, config.routing,
                                                                config.max_batch_prompts, config.security,
                                                                config.reserved_cores())
