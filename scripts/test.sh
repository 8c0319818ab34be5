#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only; no GPU, no model hub needed), OS packages included.
set -euo pipefail
cd "$(dirname "$0")/.."
# The playground's browser test drives Debian's Chromium and ChromeDriver (no browser download).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
EXTRAS=test bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
