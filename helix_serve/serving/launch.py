"""`helix serve CONFIG`: `serve run CONFIG`, with the local cluster it starts kept off the engines' reserved cores.

Ray's processes (GCS, raylet, proxy, controller, workers) inherit the CPU affinity of the process that starts them;
an engine replica then pins its engine thread back onto its pool's `cpu_cores` (cpu_affinity.py).
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
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc
    apps = (config or {}).get("applications") or []
    return sorted({core for app in apps if app.get("import_path") == BUILD_APP
                   for core in HelixAppArgs(**(app.get("args") or {})).reserved_cores()})


def serve_run(config_path: Path, serve_args: list[str]) -> None:
    """Replace this process with `serve run CONFIG ...`, kept off the reserved cores."""
    cores = reserved_cores(config_path)
    others = cpu_affinity.keep_off(cores)
    if others is not None:
        print(f"helix serve: engines reserve cores {cores}; the rest of the cluster runs on {sorted(others)}",
              file=sys.stderr)
    serve = Path(sys.executable).parent / "serve"
    os.execv(serve, [str(serve), "run", str(config_path), *serve_args])
