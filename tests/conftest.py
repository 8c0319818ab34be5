"""Shared fixtures: tiny random-weight Llama and Qwen2 pairs saved as real HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.model_factory import make_pair_dirs

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair_dirs(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair_dirs(tmp_path_factory.mktemp("qwen2"), "qwen2")
