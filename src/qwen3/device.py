"""Which device to run on: "auto" picks one, an explicit name is checked before anything is loaded.

torch accepts `torch.device("cuda")` on a machine without CUDA and fails only at the first use, deep inside
(pin_memory while loading, `_cuda_setDevice` in training); `resolve_device` says it in one line up front.
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The device asked for is not a device name, or not present on this machine."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda, then mps, then cpu; any other name -> that device, if this machine has it."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {str(name)!r}: not a device name (cpu, cuda, cuda:1, mps or auto)") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {str(name)!r}: no CUDA GPU available to torch on this machine (use cpu)")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {str(name)!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(name)!r}: MPS (Apple GPU) is not available on this machine (use cpu)")
    elif device.type not in ("cpu", "meta", "cuda", "mps"):
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise DeviceError(f"device {str(name)!r}: not available on this machine (use cpu)")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype when none is asked for: float32 on the CPU, bfloat16 on a GPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16
