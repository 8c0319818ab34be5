"""Shared fixtures: tiny random-weight Llama and Qwen2 pairs saved as real HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helix_serve.model.eagle_head import EagleConfig, EagleHead
from helix_serve.model.loader import load_model
from tests.model_factory import make_pair_dirs
from tests.serve_harness import CLUSTER

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair_dirs(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_pair_dirs(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def eagle_dir(llama_pair, tmp_path_factory):
    """A randomly initialised head for the tiny target (exactness does not need a trained one)."""
    target = load_model(str(llama_pair[0]), torch.device("cpu"), "float32")
    torch.manual_seed(5)
    vocab = len(target.hf_model.get_input_embeddings().weight)
    config = EagleConfig.for_target(target.hf_model.config, (0, 1, 2), list(range(0, vocab, 2)))
    head = EagleHead(config, target.embed_tokens)
    head.init_from_target(target.lm_head.weight, target.norm.weight)
    path = tmp_path_factory.mktemp("eagle-head")
    head.save(path)
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Serving modules (marked `serving`) run together after the rest, so they share one Ray cluster, which is
    not up while the other modules run; modules that start a cluster of their own (`own_cluster`) run last.
    Ranked by the module's marks, so a module is never split."""
    def rank(item: pytest.Item) -> int:
        module = item.getparent(pytest.Module)
        return 2 if module.get_closest_marker("own_cluster") else 1 if module.get_closest_marker("serving") else 0

    items.sort(key=rank)  # stable: the order within each group is pytest's


@pytest.fixture(scope="session", autouse=True)
def shared_cluster_stops_at_the_end():
    yield
    CLUSTER.stop()
