"""Pick the torch device: DirectML → CUDA → CPU, overridable by config and by HELIX_DEVICE."""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

DEVICE_ENV = "HELIX_DEVICE"
DEVICE_CHOICES = ("auto", "directml", "cuda", "cpu")


class DeviceUnavailableError(RuntimeError):
    """The configured device cannot be used on this machine."""


def _directml_device() -> torch.device | None:
    """The DirectML device if torch-directml is installed and sees an adapter (imported lazily)."""
    try:
        torch_directml = importlib.import_module("torch_directml")
    except ImportError:
        return None
    if torch_directml.device_count() < 1:
        return None
    return torch_directml.device(torch_directml.default_device())


def resolve_device(preference: str = "auto") -> torch.device:
    """Resolve a device preference; the HELIX_DEVICE environment variable overrides the argument."""
    choice = (os.environ.get(DEVICE_ENV) or preference or "auto").strip().lower()
    if choice.startswith("cuda:"):
        device = torch.device(choice)
    elif choice not in DEVICE_CHOICES:
        raise DeviceUnavailableError(f"unknown device {choice!r}; expected one of {DEVICE_CHOICES} or cuda:N")
    else:
        device = _pick(choice)
    logger.info("helix device: %s (asked for %r)", device, choice)
    return device


def _pick(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice in ("auto", "directml"):
        dml = _directml_device()
        if dml is not None:
            return dml
        if choice == "directml":
            raise DeviceUnavailableError(
                "device 'directml' requested but torch-directml is not installed or sees no adapter "
                "(pip install 'helix-serve[directml]' in a torch 2.4.1 environment)"
            )
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise DeviceUnavailableError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device("cpu")
