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


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: a timing must cover the work, not its launch (CPU work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """AVX512_BF16 or AMX-BF16: bf16 GEMMs run at full speed. Without them torch emulates bf16 and a bf16
    GEMM of a few rows costs several times the fp32 one (measured on an AVX2-only EPYC)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def preferred_cpu_dtype(flags: set[str] | None = None) -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp32."""
    return torch.bfloat16 if cpu_has_native_bf16(flags) else torch.float32
