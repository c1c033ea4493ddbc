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


def sdpa_path(device: torch.device) -> str:
    """How this device runs a prefill chunk's attention with grouped KV heads, for the plan's
    reserve (``offload.plan.SDPA_PATHS``): "fused" on a CPU and on CUDA from Ampere (sm80, flash
    attention), "math" on older cards (fp32 scores: a larger reserve)."""
    if device.type != "cuda":
        return "fused"
    major, _ = torch.cuda.get_device_capability(device)
    return "fused" if major >= 8 else "math"


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device``; a no-op on CPU, where work is synchronous."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """A human name for the device, for benchmark and statistics output."""
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def to_host(tensor: torch.Tensor) -> list:
    """A tensor's values as (nested) Python numbers: on CUDA a device-to-host copy that waits for
    the queued work, so the decode step calls it once per layer, for everything it must read."""
    return tensor.tolist()


def memory_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device for this process; None on CPU (use psutil for RAM
    there). Blocks torch's allocator holds but does not use count as free (they are released
    first), and a cap set with ``torch.cuda.set_per_process_memory_fraction`` is honoured: free
    is then at most the cap less what the allocator has reserved."""
    if not is_cuda(device):
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        cap = int(fraction(device) * total)
        free = min(free, max(0, cap - torch.cuda.memory_reserved(device)))
    return free, total


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

# A record read into host staging, then copied into its slot: two buffers per lane, so one read
# can fill a buffer while the other still feeds a copy.
STAGING_BUFFERS = 2

ReadInto = Callable[[torch.Tensor], object]  # reads one record into the uint8 buffer it is given


class Transfers:
    """Loads of expert records into device slots, overlapped with compute.

    Two lanes, so that a load the compute needs now (a demand miss) never waits behind a
    speculative one (a prefetch):

    - CUDA: copies from the RAM tier run on two copy streams, a high-priority one for demand
      loads and one for prefetches, each returning an event that the compute stream waits on
      only when it needs the expert. A disk read goes into pinned staging first, then is copied
      on the same lane's stream: a prefetch's read runs on the loader thread (the host goes on
      queuing compute), a demand read on the calling thread (which needs it next anyway).
    - CPU: prefetches (copies and disk reads) run in order on one loader thread and return a
      future; compute blocks on it only when it needs the expert; a demand load runs on the
      calling thread, beside the loader. Copies are a plain ``memmove`` and pack reads a
      ``preadv`` (one thread, the GIL released), so they never start a second OpenMP team
      beside the compute's; a checkpoint source, which packs (or quantizes) its tensors with
      torch on each read, does. A prefetch under ``ASYNC_MIN_BYTES`` runs on the calling thread
      when the loader is idle. ``staged=True`` makes a CPU device read through staging as CUDA
      does (tests use it to check that path's order without a GPU).

    Either way a later load into a slot lands after an earlier one: the last load into the same
    slot (``previous``) is cancelled if it has not started, else waited for (host) or followed
    (stream event), before a new one may write.

    A batched load (``copy_runs``) is several copies, each a contiguous run of records, under one
    handle: the set-up, the ordering waits and the event are paid once for all of them.
    """

    def __init__(self, device: torch.device, record_bytes: int = 0, staged: bool | None = None):
        self.device = device
        self.cuda = is_cuda(device)
        self.staged = self.cuda if staged is None else staged
        if self.cuda:
            low, high = torch.cuda.Stream.priority_range()  # high is the more urgent (a smaller number)
            self.stream = torch.cuda.Stream(device, priority=low)  # prefetches
            self.demand_stream = torch.cuda.Stream(device, priority=high)
        else:
            self.stream = self.demand_stream = None
        self.record_bytes = record_bytes
        self._staging: dict[str, list[torch.Tensor]] = {}  # lane -> buffers, made on first disk read
        self._staging_busy: dict[str, list[object]] = {}  # lane -> the copy each buffer last fed
        self._staging_next = {"demand": 0, "prefetch": 0}
        self._loader: ThreadPoolExecutor | None = None  # started on first use
        self._last: Future | None = None  # the load submitted to the loader last

    # ---- starting loads ---------------------------------------------------------------------

    def _loader_pool(self) -> ThreadPoolExecutor:
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-loader")
        return self._loader

    @staticmethod
    def _settle(previous) -> None:
        """CUDA: make sure no earlier staged load into the same slot can land after the one about
        to start: cancel it if it has not started, else wait (host) until its read is done and
        its copy queued; the new copy's stream then follows that copy's event (rare: a slot is
        reloaded while its last load runs only after a failure or an evicted prediction)."""
        if isinstance(previous, Future) and not previous.done() and not previous.cancel():
            futures_wait([previous])

    def _submit(self, fn: Callable[[], object], nbytes: int, needed_now: bool, previous) -> Future | None:
        """CPU: queue ``fn`` on the loader thread, or run it here (a demand load, or a small one
        with the loader idle). CUDA: the loader thread runs a prefetch's disk read and queues its
        copy; the future gives the copy's event. ``previous``: one handle, or a sequence of them
        (a batched load's slots), each cancelled if queued, else waited for by a demand load."""
        running = [
            p for p in (previous if isinstance(previous, (list, tuple)) else (previous,))
            if isinstance(p, Future) and not p.done() and not p.cancel()
        ]
        if needed_now:
            if running:  # running now: they end before this one starts
                futures_wait(running)
            result = fn()
            return result if self.cuda else None
        if not self.cuda and nbytes < ASYNC_MIN_BYTES and (self._last is None or self._last.done()):
            fn()
            return None
        self._last = self._loader_pool().submit(fn)
        return self._last

    def _stream_copy(self, dst: torch.Tensor, src: torch.Tensor, after, needed_now: bool, previous):
        """CUDA: queue dst.copy_(src) on the lane's stream, after ``after`` (a compute mark; None:
        all compute queued so far) and after ``previous`` (an event of an earlier load into
        dst); returns the copy's event."""
        return self._stream_copies([(dst, src)], after, needed_now, (previous,))

    def _stream_copies(self, pairs, after, needed_now: bool, previous):
        """CUDA: queue each dst.copy_(src) of ``pairs`` on the lane's stream, in order, after
        ``after`` and after every event in ``previous``; one event for them all."""
        stream = self.demand_stream if needed_now else self.stream
        if after is None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            stream.wait_event(after)
        for handle in previous:
            event = self._event(handle)  # a finished staged load's event; a failed one wrote nothing
            if event is not None:
                stream.wait_event(event)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None, needed_now: bool = False, previous=None):
        """Start dst.copy_(src) (a RAM-tier record into a slot); a handle for ``wait`` (None when
        already done).

        ``dst`` may still be read by compute queued earlier: on CUDA the copy waits for
        ``after`` (a ``mark`` made once that compute was queued), or, without one, for all
        compute queued so far. On CPU compute is synchronous, so nothing queued can read it.
        ``needed_now``: the caller waits for it next (a demand miss, not a prefetch).
        ``previous``: the last load into ``dst``, which must land first."""
        return self.copy_runs([(dst, src)], after, needed_now, (previous,))

    def copy_runs(self, pairs, after=None, needed_now: bool = False, previous=()):
        """Start several copies as one load: ``pairs`` of (dst, src), each two contiguous
        buffers of the same size (a run of records: consecutive slots from consecutive RAM rows,
        one copy each); one handle for ``wait`` covers them all (None when already done).

        ``previous``: the last loads into any of the dsts, which must land first (cancelled when
        still queued). ``after`` and ``needed_now`` as for ``copy``. CPU: one ``memmove`` per
        pair, on one thread; CUDA: one copy per pair on the lane's stream and one event after
        them, so the stream set-up, the ordering waits and the event are paid once per load, not
        per record."""
        pairs = list(pairs)
        for dst, src in pairs:
            if dst.numel() * dst.element_size() != src.numel() * src.element_size() or not (
                dst.is_contiguous() and src.is_contiguous()
            ):
                raise ValueError("a record copy needs two contiguous buffers of the same size")
        if not self.cuda:
            # the tensors ride along (a queued copy must keep its buffers alive), with their pointers
            moves = [(dst, src, dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size()) for dst, src in pairs]
            nbytes = sum(move[-1] for move in moves)

            def copy() -> None:
                for _, _, to, source, n in moves:
                    ctypes.memmove(to, source, n)

            return self._submit(copy, nbytes, needed_now, tuple(previous))
        for handle in previous:
            self._settle(handle)
        return self._stream_copies(pairs, after, needed_now, previous)

    def read(self, read_into: ReadInto, dst: torch.Tensor, after=None, needed_now: bool = False, previous=None):
        """Start a disk read of one record into ``dst`` (a slot): ``read_into(buffer)`` fills a
        CPU uint8 buffer. Unstaged (a CPU device), it reads straight into the slot, on the loader
        thread for a prefetch. Staged (CUDA), it reads into a pinned staging buffer of the lane
        (a prefetch on the loader thread, a demand load here), then copies it into the slot on
        the lane's stream. Returns a handle for ``wait``; an error in the read is raised there
        (or here, when it ran here)."""
        nbytes = dst.numel()
        if not self.staged:
            return self._submit(lambda: read_into(dst), nbytes, needed_now, previous)
        lane = "demand" if needed_now else "prefetch"
        if self.cuda:
            self._settle(previous)
            if after is None:  # the caller's compute so far: the loader thread's current stream is another
                after = self.mark()

        def staged_read():
            buffer, i = self._staging_buffer(lane, nbytes)
            read_into(buffer)
            if self.cuda:
                handle = self._stream_copy(dst, buffer[:nbytes], after, needed_now, previous)
            else:
                ctypes.memmove(dst.data_ptr(), buffer.data_ptr(), nbytes)
                handle = None
            self._staging_busy[lane][i] = handle
            return handle

        return self._submit(staged_read, nbytes, needed_now, None if self.cuda else previous)

    def _staging_buffer(self, lane: str, nbytes: int) -> tuple[torch.Tensor, int]:
        """The lane's next staging buffer, once the copy it last fed has finished (each lane is
        used by one thread only: the loader for prefetches, the caller for demand loads)."""
        if lane not in self._staging:
            size = max(nbytes, self.record_bytes)
            rows = empty_host_buffer(size, STAGING_BUFFERS, self.device)  # pinned on CUDA
            self._staging[lane] = list(rows)
            self._staging_busy[lane] = [None] * STAGING_BUFFERS
        i = self._staging_next[lane]
        self._staging_next[lane] = (i + 1) % STAGING_BUFFERS
        busy = self._staging_busy[lane][i]
        if busy is not None:
            busy.synchronize()  # that buffer may still feed a copy
        return self._staging[lane][i], i

    def fill(self, fn: Callable[[], object], nbytes: int, needed_now: bool = False, previous=None):
        """Run ``fn`` (which writes ``nbytes`` of a CPU buffer) in load order: on the loader
        thread (a prefetch) or here (``needed_now``). Returns a handle for ``wait``; an error in
        ``fn`` is raised there (or here, when run at once)."""
        if self.cuda:
            fn()
            return None
        return self._submit(fn, nbytes, needed_now, previous)

    def mark(self):
        """A point on the compute stream: everything queued so far (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # ---- finishing loads --------------------------------------------------------------------

    def _event(self, handle):
        """The CUDA event of a load: the handle itself, or a finished staged read's copy event
        (None on CPU, where a future's result means nothing, and for an unfinished, cancelled
        or failed future)."""
        if not isinstance(handle, Future):
            return handle
        if not self.cuda or not handle.done() or handle.cancelled() or handle.exception() is not None:
            return None
        return handle.result()

    def done(self, handle) -> bool:
        """Whether a load has finished (a staged CUDA prefetch: its read and its copy)."""
        if handle is None:
            return True
        if isinstance(handle, Future):
            if not handle.done():
                return False
            event = self._event(handle)
            return event is None or event.query()
        return handle.query()

    @staticmethod
    def cancel(handle) -> bool:
        """Cancel a load that is still queued (a future the loader has not started); True when it
        was, so it will write nothing."""
        return isinstance(handle, Future) and handle.cancel()

    @staticmethod
    def check(handle) -> None:
        """Raise the error of a finished load that failed (a future; a CUDA copy cannot fail later)."""
        if isinstance(handle, Future) and handle.done() and not handle.cancelled():
            handle.result()

    def wait(self, handle) -> None:
        """Make compute wait for a load: the compute stream waits on CUDA (no host block, except
        for a staged read still running on the loader); the host blocks on CPU, where compute is
        the host."""
        if handle is None:
            return
        if isinstance(handle, Future):
            if handle.cancelled():  # replaced by a later load into its slot: nothing to wait for
                return
            handle = handle.result()  # raises the load's error
            if not self.cuda or handle is None:
                return
        torch.cuda.current_stream(self.device).wait_event(handle)

    def wait_host(self, handle) -> None:
        """Block the host until a load is done (before reusing its source buffer)."""
        if handle is None:
            return
        if isinstance(handle, Future):
            handle = handle.result()
            if not self.cuda or handle is None:
                return
        handle.synchronize()

    def close(self) -> None:
        """Finish the loads in flight and stop the loader thread."""
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
        self._done: list[tuple[int, float]] = []  # folded intervals, not yet handed out

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    # CUDA: pending intervals above this are folded into ``_done`` where already finished (a
    # query, no sync), so a long generation does not hold one event pair per load
    FOLD_AT = 512

    def stop(self, started, key: int) -> float | None:
        """Returns seconds on CPU; on CUDA the time is added to ``key`` later (``resolve``)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._pending.append((started, end, key))
            if len(self._pending) >= self.FOLD_AT:
                self._fold()
            return None
        return time.perf_counter() - started

    def _fold(self) -> None:
        """Resolve the pending intervals whose end has passed, keeping the others."""
        waiting = []
        for start, end, key in self._pending:
            if end.query():
                self._done.append((key, start.elapsed_time(end) / 1000.0))
            else:
                waiting.append((start, end, key))
        self._pending = waiting

    def resolve(self) -> list[tuple[int, float]]:
        """(key, seconds) for every CUDA interval recorded since the last call."""
        out, self._done = self._done, []
        for start, end, key in self._pending:
            end.synchronize()
            out.append((key, start.elapsed_time(end) / 1000.0))
        self._pending.clear()
        return out
