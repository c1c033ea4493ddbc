"""The device layer: the only module that calls CUDA-only APIs.

What it is: device selection with clear errors, synchronisation for honest timing, and memory
figures, pinned host buffers, and ``Transfers`` (a CUDA copy stream with events, or a loader
thread on CPU), each with a CPU path so the whole engine runs and is tested without a GPU. What
it is not: a place for model or cache logic.
"""

from __future__ import annotations

import ctypes
import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Callable

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
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def memory_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device; None on CPU (use psutil for RAM there)."""
    if is_cuda(device):
        return torch.cuda.mem_get_info(device)
    return None


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since start; None on CPU (use process RSS there)."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device)
    return None


def empty_host_buffer(nbytes_per_row: int, rows: int, device: torch.device) -> torch.Tensor:
    """uint8 [rows, nbytes_per_row] in host RAM, pinned when the compute device is CUDA
    (so host-to-device copies can run asynchronously); plain RAM otherwise."""
    return torch.empty((rows, nbytes_per_row), dtype=torch.uint8, pin_memory=is_cuda(device))


# CPU loads smaller than this run on the calling thread when nothing is queued: handing a load
# to the loader thread and back costs tens of microseconds (the GIL), as much as copying ~1 MiB.
ASYNC_MIN_BYTES = 1 << 20


class Transfers:
    """Loads of expert records into device slots, overlapped with compute.

    CUDA: host-to-device copies run on a dedicated copy stream and return an event; the compute
    stream waits on that event only when it needs the expert. CPU: copies and disk reads run in
    order on one loader thread and return a future; compute blocks on it only when it needs
    the expert, and a load it needs at once runs on its own thread rather than queue behind
    prefetches. Copies there are a plain ``memmove`` and pack reads a ``preadv`` (one thread,
    the GIL released), so they never start a second OpenMP team beside the compute's; a
    checkpoint source, which packs (or quantizes) its tensors with torch on each read, does.
    Either way a later load into a slot lands after an earlier one (stream order on CUDA; on
    CPU the queue's order, or the earlier one cancelled or waited for). A CPU load under
    ``ASYNC_MIN_BYTES`` runs on the calling thread when the loader is idle.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if is_cuda(device) else None
        self._loader: ThreadPoolExecutor | None = None  # CPU: started on first use
        self._last: Future | None = None  # CPU: the load submitted last

    def _submit(self, fn: Callable[[], object], nbytes: int, needed_now: bool, previous) -> Future | None:
        """CPU: queue ``fn`` on the loader thread, or run it here. ``previous``: the handle of
        the last load into the same buffer (None if none), cancelled if it has not started.

        A load needed at once never waits behind queued prefetches: it runs here, beside the
        loader, once no load into its buffer can still land (a running one is waited for).
        A small one runs here when nothing is queued; any other is queued, after ``previous``."""
        clear = previous is None or previous.done() or previous.cancel()
        if needed_now:
            if not clear:  # running now: it ends before this one starts
                futures_wait([previous])
            fn()
            return None
        if nbytes < ASYNC_MIN_BYTES and (self._last is None or self._last.done()):  # FIFO: all done
            fn()
            return None
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-loader")
        self._last = self._loader.submit(fn)
        return self._last

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, needed_now: bool = False, previous=None):
        """Start dst.copy_(src); returns a handle for ``wait`` (None when already done).

        ``dst`` may still be read by compute queued earlier: on CUDA the copy waits for
        ``after`` (a ``mark`` made once that compute was queued), or, without one, for all
        compute queued so far. On CPU compute is synchronous, so nothing queued can read it.
        ``needed_now``: the caller waits for it next (a demand miss, not a prefetch).
        ``previous``: the last load into ``dst`` (CPU; the copy stream orders CUDA's)."""
        if self.stream is None:
            if dst.numel() != src.numel() or not (dst.is_contiguous() and src.is_contiguous()):
                raise ValueError("a CPU record copy needs two contiguous buffers of the same size")
            nbytes = src.numel() * src.element_size()
            copy = lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)  # noqa: E731
            return self._submit(copy, nbytes, needed_now, previous)
        if after is None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def fill(self, fn: Callable[[], object], nbytes: int, needed_now: bool = False, previous=None):
        """Run ``fn`` (which writes ``nbytes`` of a CPU buffer, e.g. a disk read into a slot)
        in load order: on the loader thread on CPU, at once on CUDA (whose loads read into
        host staging). Returns a handle for ``wait``; an error in ``fn`` is raised there (or
        here, when run at once)."""
        if self.stream is None:
            return self._submit(fn, nbytes, needed_now, previous)
        fn()
        return None

    def mark(self):
        """A point on the compute stream: everything queued so far (None on CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @staticmethod
    def done(handle) -> bool:
        """Whether a load has finished."""
        if handle is None:
            return True
        return handle.done() if isinstance(handle, Future) else handle.query()

    @staticmethod
    def check(handle) -> None:
        """Raise the error of a finished load that failed (CPU; a CUDA copy cannot fail later)."""
        if isinstance(handle, Future) and handle.done():
            handle.result()

    def wait(self, handle) -> None:
        """Make compute wait for a load: the compute stream waits on CUDA (no host block); the
        host blocks on CPU, where compute is the host."""
        if handle is None:
            return
        if isinstance(handle, Future):
            handle.result()
        else:
            torch.cuda.current_stream(self.device).wait_event(handle)

    def wait_host(self, handle) -> None:
        """Block the host until a load is done (before reusing its source buffer)."""
        if handle is None:
            return
        if isinstance(handle, Future):
            handle.result()
        else:
            handle.synchronize()

    def close(self) -> None:
        """Finish the loads in flight and stop the loader thread (CPU)."""
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = self._last = None


class StallClock:
    """Time the compute stream spends waiting for expert loads.

    CPU: wall time around the synchronous load. CUDA: a pair of timing events on the compute
    stream around its wait, resolved lazily when the total is read (no sync in the hot path).
    """

    def __init__(self, device: torch.device):
        self.cuda = is_cuda(device)
        self.device = device
        self._pending: list[tuple[object, object, int]] = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def stop(self, started, key: int) -> float | None:
        """Returns seconds on CPU; on CUDA the time is added to ``key`` later (``resolve``)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._pending.append((started, end, key))
            return None
        return time.perf_counter() - started

    def resolve(self) -> list[tuple[int, float]]:
        """(key, seconds) for every CUDA interval recorded since the last call."""
        out = []
        for start, end, key in self._pending:
            end.synchronize()
            out.append((key, start.elapsed_time(end) / 1000.0))
        self._pending.clear()
        return out
