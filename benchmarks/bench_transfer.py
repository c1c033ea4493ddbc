"""Host-to-device bandwidth of expert loads, against a plain copy of the same bytes.

Measures, for one expert record of a given size (default: one Mixtral-8x7B expert in bf16,
336 MiB; ``--mib`` to change): the GB/s of a plain ``copy_`` from a (pinned, on CUDA) host
buffer into a device buffer, and the GB/s of the expert cache's own load path
(``offload.device.Transfers``: copy stream + event, compute stream waiting on it), in the same
process, interleaved, as a ratio. On a CPU-only machine both are memcpy within RAM.

It does not measure disk reads (see bench_cache.py) or compute.

    python benchmarks/bench_transfer.py [--device auto|cpu|cuda] [--mib 336] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.benchlib import timed  # noqa: E402
from offload.device import Transfers, device_name, empty_host_buffer, resolve_device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mib", type=float, default=336.0, help="record size in MiB")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    device = resolve_device(args.device)
    nbytes = int(args.mib * 2**20)
    host = empty_host_buffer(nbytes, 1, device)[0]  # pinned on CUDA
    host.fill_(7)
    slot = torch.empty(nbytes, dtype=torch.uint8, device=device)
    transfers = Transfers(device)

    def plain() -> None:
        slot.copy_(host, non_blocking=True)

    def cache_path() -> None:
        transfers.wait(transfers.copy(slot, host))

    timed(plain, device), timed(cache_path, device)  # warm up
    results: dict[str, list[float]] = {"plain copy_": [], "expert load": []}
    for _ in range(args.reps):
        results["plain copy_"].append(nbytes / timed(plain, device) / 1e9)
        results["expert load"].append(nbytes / timed(cache_path, device) / 1e9)
    assert torch.equal(slot[:16].cpu(), host[:16])

    print(f"machine: {device_name(device)}, torch {torch.__version__}; "
          f"pinned host buffer: {host.is_pinned()}; record {args.mib:g} MiB; {args.reps} reps")
    for name, values in results.items():
        print(f"{name:>12}: {statistics.median(values):7.2f} GB/s (median; min {min(values):.2f}, max {max(values):.2f})")
    ratio = statistics.median(results["expert load"]) / statistics.median(results["plain copy_"])
    print(f"expert load / plain copy_: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
