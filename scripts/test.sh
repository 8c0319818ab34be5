#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only; no GPU, no model hub needed).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
