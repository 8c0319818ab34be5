"""Per-pool device choice and pool settings: the pool's device, or CPU only when it says `fallback: cpu`."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from helix_serve.device import DEVICE_ENV, DeviceUnavailableError
from helix_serve.serving.app_config import DEFAULT_POOL, HelixAppArgs, PoolConfig
from helix_serve.serving.engine_deployment import PoolDevice, select_device


@pytest.fixture(autouse=True)
def no_accelerators(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "torch_directml", None)  # torch-directml not installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["directml", "cuda"])
def test_missing_accelerator_fails_the_replica_clearly(device):
    with pytest.raises(DeviceUnavailableError, match=f"engine pool 'engine_{device}'.*fallback: cpu"):
        select_device(f"engine_{device}", PoolConfig(device=device))


def test_missing_directml_says_how_to_install_it():
    with pytest.raises(DeviceUnavailableError, match=r"helix-serve\[directml\]"):
        select_device("engine_directml", PoolConfig(device="directml"))


@pytest.mark.parametrize("device", ["directml", "cuda"])
def test_fallback_cpu_starts_on_cpu_and_warns(device, caplog):
    with caplog.at_level(logging.WARNING, logger="helix_serve.serving.engine_deployment"):
        chosen = select_device("pool", PoolConfig(device=device, fallback="cpu"))
    assert chosen.device == torch.device("cpu") and chosen.requested == device
    assert device in chosen.fallback_reason
    assert "running on CPU" in caplog.text


def test_available_device_is_no_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("gpu", PoolConfig(device="cuda", fallback="cpu")) == PoolDevice(torch.device("cuda"), "cuda")
    assert select_device("cpu", PoolConfig(device="cpu")) == PoolDevice(torch.device("cpu"), "cpu")


def test_auto_ends_on_cpu_without_a_fallback():
    assert select_device("any", PoolConfig()) == PoolDevice(torch.device("cpu"), "auto")


def test_helix_device_env_overrides_the_pool(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert select_device("gpu", PoolConfig(device="cuda")) == PoolDevice(torch.device("cpu"), "cuda")


def test_no_pools_key_is_one_default_pool_on_the_top_level_device():
    assert HelixAppArgs(device="cuda").engine_pools() == {DEFAULT_POOL: PoolConfig(device="cuda")}


def test_pools_are_bound_by_name():
    args = HelixAppArgs(pools={"engine_cpu": {"device": "cpu"}, "engine_cuda": {"device": "cuda", "capacity": 4}})
    assert list(args.engine_pools()) == ["engine_cpu", "engine_cuda"]
    assert args.engine_pools()["engine_cuda"].capacity == 4


@pytest.mark.parametrize(("settings", "needle"), [
    ({"pools": {}}, "at least one pool"),
    ({"pools": {"engine_cpu": {}}, "device": "cpu"}, "on each pool"),
    ({"pools": {"HelixIngress": {}}}, "ingress"),
    ({"pools": {"bad name": {}}}, "pattern"),
    ({"pools": {"p": {"device": "tpu"}}}, "pattern"),
    ({"pools": {"p": {"capacity": 0}}}, "greater than 0"),
    ({"pools": {"p": {"fallback": "cuda"}}}, "fallback"),
])
def test_bad_pool_settings_are_refused(settings, needle):
    with pytest.raises(ValueError, match=needle):
        HelixAppArgs(**settings)


class _LoadFailsOffCpu:
    """Stands in for load_model_pair: the accelerator runs out of memory, the CPU load works."""

    def __init__(self):
        self.devices: list[torch.device] = []

    def __call__(self, target, draft, device, dtype, quantization, int4_dense_rows):
        self.devices.append(device)
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return "pair-on-cpu"


def test_load_failure_on_the_device_fails_loudly_without_fallback(monkeypatch):
    from helix_serve.serving import engine_deployment

    monkeypatch.setattr(engine_deployment, "load_model_pair", _LoadFailsOffCpu())
    placement = PoolDevice(torch.device("meta"), "cuda")  # stands in for a real accelerator
    with pytest.raises(torch.OutOfMemoryError):
        engine_deployment.load_pair_for_pool("engine_cuda", PoolConfig(device="cuda"), placement,
                                             HelixAppArgs().engine_config())


def test_load_failure_falls_back_to_cpu_when_allowed(monkeypatch, caplog):
    from helix_serve.serving import engine_deployment

    loader = _LoadFailsOffCpu()
    monkeypatch.setattr(engine_deployment, "load_model_pair", loader)
    placement = PoolDevice(torch.device("meta"), "cuda")
    with caplog.at_level(logging.WARNING):
        pair, ended_on = engine_deployment.load_pair_for_pool(
            "engine_cuda", PoolConfig(device="cuda", fallback="cpu"), placement, HelixAppArgs().engine_config())
    assert pair == "pair-on-cpu" and ended_on.device.type == "cpu" and ended_on.requested == "cuda"
    assert "out of memory" in ended_on.fallback_reason and "fallback: cpu" in caplog.text
    assert [d.type for d in loader.devices] == ["meta", "cpu"]
