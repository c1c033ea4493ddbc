"""What the benchmark scripts share: progress lines on stderr, and how a run ends."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from offload.errors import OffloadError


def timed(fn: Callable[[], object], device) -> float:
    """Seconds of one ``fn()`` on ``device`` (a torch.device), queued work finished before and after."""
    import time

    from offload.device import synchronize

    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def say(message: str) -> None:
    """A progress or error line on stderr (stdout carries only the report)."""
    print(message, file=sys.stderr, flush=True)


def finish(result: dict[str, Any], as_json: bool, print_report: Callable[[dict[str, Any]], None]) -> int:
    """Print the result as one JSON object or as the readable report; exit code 0."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


def run(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], Any],
    bench: Callable[[Any], dict[str, Any]],
    print_report: Callable[[dict[str, Any]], None],
) -> int:
    """The usual main: parse, set torch's threads (``--threads``), measure, report; a bad
    setting is one line on stderr and exit code 2."""
    import torch

    args = parse_args(argv)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    try:
        result = bench(args)
    except OffloadError as e:
        say(f"error: {e}")
        return 2
    return finish(result, args.json, print_report)


class Bandwidth:
    """The machine's read bandwidth: a streaming read of ``nbytes`` with torch's threads (on a
    CPU ``offload.kernels.cpu4.stream_read``, one contiguous share a thread; torch's own sum where
    the kernel cannot be built, or on CUDA). ``measure`` appends one timed read to ``times``."""

    def __init__(self, nbytes: int, device):
        import torch

        from offload.device import is_cuda
        from offload.kernels import cpu4

        self.device = device
        if is_cuda(device):
            self.buffer = torch.ones(nbytes // 4, dtype=torch.int32, device=device)  # [nbytes / 4]
            self.method = "torch's int32 sum on the device"
            self.read = lambda: self.buffer.sum()
        else:
            self.buffer = torch.ones(nbytes // 8, dtype=torch.int64)  # [nbytes / 8], pages touched
            try:
                cpu4.stream_read(self.buffer[:1])
                self.method = "offload.kernels.cpu4.stream_read (a streaming sum of 64-bit words, OpenMP)"
                self.read = lambda: cpu4.stream_read(self.buffer)
            except cpu4.KernelBuildError as e:
                self.method = f"torch's int64 sum (the kernel's reader is unavailable: {e})"
                self.read = lambda: self.buffer.sum()
        self.nbytes = self.buffer.numel() * self.buffer.element_size()
        self.times: list[float] = []

    def measure(self) -> None:
        self.times.append(timed(self.read, self.device))

    def gb_per_s(self) -> float:
        """The median of the reads so far, as GB/s."""
        import statistics

        return self.nbytes / statistics.median(self.times) / 1e9
