"""The device layer: the only module that calls CUDA-only APIs.

What it is: device selection with clear errors, synchronisation for honest timing, and memory
figures, each with a CPU path so the whole engine runs and is tested without a GPU. Streams,
events and pinned buffers join it when the expert cache needs them. What it is not: a place
for model or cache logic.
"""

from __future__ import annotations

import torch

from offload.errors import SettingError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is refused with a clear line."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingError(f"--device {name!r}: expected one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise SettingError(f"--device {name!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    return device


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device``; a no-op on CPU, where work is synchronous."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """A human name for the device, for benchmark and statistics output."""
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since start; None on CPU (use process RSS there)."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device)
    return None
