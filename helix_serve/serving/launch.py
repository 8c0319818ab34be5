"""`helix serve CONFIG`: `serve run CONFIG`, with the local cluster it starts kept off the engines' reserved cores.

Ray's processes (GCS, raylet, proxy, controller, workers) inherit the CPU affinity of the process that starts them;
an engine replica then moves itself back onto its slice of its pool's `cpu_cores` (cpu_affinity.py). Against a
running cluster (`--address`) only this process moves: place that cluster's processes yourself (`taskset`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from helix_serve.serving import cpu_affinity
from helix_serve.serving.app_config import HelixAppArgs

BUILD_APP = "helix_serve.serving.app:build_app"


def reserved_cores(config_path: Path) -> list[int]:
    """Every core the Helix applications of a Serve config file reserve for engines (validates their args)."""
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    apps = config.get("applications") or [] if isinstance(config, dict) else None
    if not isinstance(apps, list) or not all(isinstance(app, dict) for app in apps):
        raise ValueError(f"{config_path}: not a Serve config file (expected `applications:`, a list of mappings)")
    return sorted({core for app in apps if app.get("import_path") == BUILD_APP
                   for core in HelixAppArgs(**(app.get("args") or {})).reserved_cores()})


def serve_run(config_path: Path, serve_args: list[str]) -> None:
    """Replace this process with `serve run CONFIG ...`, kept off the reserved cores."""
    cores = reserved_cores(config_path)
    others = cpu_affinity.keep_off(cores)
    if others is not None:
        print(f"helix serve: engines reserve cores {cores}; this process and a local cluster it starts run on "
              f"{sorted(others)}", file=sys.stderr)
    # Ray Serve's own CLI module, through this interpreter: no dependence on where the `serve` script was installed.
    os.execv(sys.executable, [sys.executable, "-m", "ray.serve.scripts", "run", str(config_path), *serve_args])
