"""Device selection for every branch, with a stand-in torch_directml module and faked CUDA.

No DirectML adapter or CUDA GPU exists on the CI machine: these tests check the selection logic only.
"""

import sys
import types

import pytest
import torch

from helix_serve.device import DEVICE_ENV, DeviceUnavailableError, resolve_device


@pytest.fixture
def fake_directml(monkeypatch):
    module = types.ModuleType("torch_directml")
    module.device_count = lambda: 1
    module.default_device = lambda: 0
    module.device = lambda index: torch.device("meta")  # stands in for privateuseone:0
    monkeypatch.setitem(sys.modules, "torch_directml", module)
    return module


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "torch_directml", None)  # absent unless a test installs the stand-in
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_prefers_directml(fake_directml, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("meta")


def test_auto_falls_back_to_cuda_then_cpu(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_directml_without_adapter_is_an_error(fake_directml):
    fake_directml.device_count = lambda: 0
    with pytest.raises(DeviceUnavailableError, match="torch-directml"):
        resolve_device("directml")


def test_directml_not_installed_is_an_error():
    with pytest.raises(DeviceUnavailableError, match="helix-serve\\[directml\\]"):
        resolve_device("directml")


def test_cuda_requested_without_gpu_is_an_error():
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        resolve_device("cuda")


def test_explicit_cpu_and_indexed_cuda(fake_directml):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_environment_overrides_config(fake_directml, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device("directml") == torch.device("cpu")


def test_unknown_device_is_rejected():
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        resolve_device("tpu")


def test_choice_is_logged(caplog):
    with caplog.at_level("INFO", logger="helix_serve.device"):
        resolve_device("cpu")
    assert "helix device: cpu" in caplog.text
