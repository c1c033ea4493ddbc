"""Timed measurements of this machine's compute, for the placement cost model and profiles.

What it is: the figures ``--cpu-experts auto`` needs beside the link's GB/s (which
``offload.profile.probe_machine`` times itself): the RAM's streaming read bandwidth, the 4-bit
CPU kernel's GB/s on an expert-sized matrix (``offload.kernels.cpu4``, on the path this CPU
takes), the 4-bit GPU kernel's (bitsandbytes, on CUDA) and one layer's CPU-expert round trip
(a hidden state down and a result up, with the waits). Each is the best of a few short runs, so
a busy moment of a shared machine does not become the machine's figure; each takes well under a
second. What it is not: a benchmark (benchmarks/ print the full tables and ratios), nor the
cost model (``offload.experts.placement``).

GB/s are 1e9 bytes per second of the weight bytes read: the codes and their absmax, the
bytes an expert record holds for its matrices. Shape legend: Out, In = the matrix's shape.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from offload.device import is_cuda, synchronize
from offload.kernels import cpu4

RAM_READ_BYTES = 256 * 2**20
EXPERT_MATRIX = (14336, 4096)  # Mixtral-8x7B's w1: a third of one expert, [Out, In]
BLOCK = 64
RUNS = 3


def _best(fn: Callable[[], object], device: torch.device, runs: int = RUNS) -> float:
    """The shortest of ``runs`` timed calls of ``fn`` after one untimed one, in seconds."""
    fn()
    best = math.inf
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def ram_read_gbps(nbytes: int = RAM_READ_BYTES) -> float:
    """The RAM's streaming read bandwidth with torch's threads, GB/s (the 4-bit kernel's reader,
    ``cpu4.stream_read``; torch's own sum where the kernel cannot be built)."""
    buffer = torch.ones(max(1, nbytes // 8), dtype=torch.int64)  # [nbytes / 8], pages touched
    cpu = torch.device("cpu")
    try:
        seconds = _best(lambda: cpu4.stream_read(buffer), cpu)
    except cpu4.KernelBuildError:
        seconds = _best(buffer.sum, cpu)
    return buffer.numel() * 8 / seconds / 1e9


def random_4bit_tensors(shape: tuple[int, int], device: torch.device | str = "cpu",
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """A portable 4-bit matrix's tensors (``offload.quant.tensor_specs`` names) of random codes,
    scales and code table: the kernels' speed does not depend on the values."""
    out_f, in_f = shape
    generator = torch.Generator().manual_seed(seed)
    return {
        "data": torch.randint(0, 256, (out_f * in_f // 2, 1), dtype=torch.uint8, generator=generator).to(device),
        "absmax": (torch.rand(out_f * in_f // BLOCK, generator=generator) + 0.5).to(device),  # [B]
        "quant_map": torch.linspace(-1, 1, 16).to(device),  # [16]: a stand-in for nf4's table
    }


def _weight_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensors[k].numel() * tensors[k].element_size() for k in ("data", "absmax"))


def cpu_expert_gbps(shape: tuple[int, int] = EXPERT_MATRIX) -> float | None:
    """The 4-bit CPU kernel's GB/s at one token on a ``shape`` matrix, with torch's threads; None
    where the kernel does not run here (``cpu4.status()`` says why)."""
    try:
        path = cpu4.status().path
    except Exception:  # a bad OFFLOAD_CPU_KERNEL is reported where the kernel is used, not here
        return None
    if path == "torch":
        return None
    tensors = random_4bit_tensors(shape)
    x = torch.randn(1, shape[1])  # [1, In]
    seconds = _best(lambda: cpu4.run(x, tensors, shape, path), torch.device("cpu"))
    return _weight_bytes(tensors) / seconds / 1e9


def gpu_expert_gbps(device: torch.device, shape: tuple[int, int] = EXPERT_MATRIX) -> float | None:
    """The 4-bit GPU kernel's GB/s at one token on a ``shape`` matrix (bitsandbytes' nf4
    ``matmul_4bit`` through ``offload.quant.linear``); None off CUDA or without bitsandbytes' CUDA
    library."""
    if not is_cuda(device):
        return None
    try:
        from offload import quant

        weight = quant.quantize(torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02, "nf4")
        x = torch.randn(1, shape[1], device=device, dtype=torch.bfloat16)  # [1, In]
        seconds = _best(lambda: quant.linear(x, weight), device, runs=10)
    except (ImportError, RuntimeError, OSError):
        return None
    return quant.matrix_bytes(shape, "nf4") / seconds / 1e9


def round_trip_ms(device: torch.device, hidden: int = 4096) -> float | None:
    """One layer's CPU-expert round trip on CUDA, ms: a bf16 hidden state of ``hidden`` values
    copied to pinned host memory and a result copied back, each waited for (the best of a few);
    None off CUDA (there is no trip to make)."""
    if not is_cuda(device):
        return None
    on_device = torch.zeros(1, hidden, device=device, dtype=torch.bfloat16)
    host = torch.empty(1, hidden, dtype=torch.bfloat16).pin_memory()

    def trip() -> None:
        host.copy_(on_device, non_blocking=True)
        synchronize(device)
        on_device.copy_(host, non_blocking=True)

    return _best(trip, device, runs=10) * 1e3


def compute_figures(device: torch.device) -> dict[str, float | None]:
    """``ram_gbps``, ``cpu_expert_gbps``, ``gpu_expert_gbps``, ``round_trip_ms`` of this machine
    (None where not measurable here), rounded for a profile."""
    figures = {
        "ram_gbps": ram_read_gbps(),
        "cpu_expert_gbps": cpu_expert_gbps(),
        "gpu_expert_gbps": gpu_expert_gbps(device),
        "round_trip_ms": round_trip_ms(device),
    }
    return {k: None if v is None else round(v, 3 if k == "round_trip_ms" else 2) for k, v in figures.items()}


__all__ = ["compute_figures", "cpu_expert_gbps", "gpu_expert_gbps", "ram_read_gbps", "random_4bit_tensors",
           "round_trip_ms"]
