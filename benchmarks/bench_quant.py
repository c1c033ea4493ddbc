"""Expert weight formats side by side: bytes, load time and FFN time of one Mixtral-8x7B expert,
against the machine's measured read bandwidth.

What it measures: ONE expert of Mixtral-8x7B's shape (w1, w3 [14336, 4096], w2 [4096, 14336];
random N(0, 0.02) weights from a fixed seed, bf16 source), stored in each weight format of
``--formats`` (see ``offload.quant``; default on a CPU: bf16, int8, nf4 on each path of
offload's 4-bit CPU kernel this CPU runs and on the torch path, nf4-dq, fp4, and nf4-cpu where
bitsandbytes' fused CPU kernel works), all in one process:

0. read bandwidth: a streaming read of a buffer much larger than the caches (``--bandwidth-mib``,
   default 1024 MiB) with the threads torch uses: on a CPU the sum of its 64-bit words by
   ``offload.kernels.cpu4.stream_read`` (OpenMP, one contiguous share a thread; torch's own
   int64 sum where the kernel cannot be built), on CUDA torch's int32 sum on the device; timed
   in every repetition, interleaved with the formats;
1. bytes: the expert record as ``RecordLayout.for_config`` lays it out for Mixtral-8x7B's
   published config.json (w1, w3, w2 with their quantization state, tensors 64-byte aligned);
2. load: the record is written at offset 0 of its own temporary file (fsync'd, under ``--dir``)
   and read back whole with the preadv loop ``Pack.read_record`` uses
   (``offload.checkpoint.read_into``) into a host buffer (pinned on CUDA, as the engine's):
   cold, right after ``posix_fadvise(POSIX_FADV_DONTNEED)`` asks the kernel to drop the file's
   pages (``mincore`` then tells how much of the file is still cached, and the output says
   whether the drop worked), and warm, straight after; on CUDA also the host-to-device copy of
   the record through ``offload.device.Transfers`` (the expert cache's copy stream);
3. compute: ``offload.model.expert_ffn`` (silu(x @ w1.T) * (x @ w3.T) @ w2.T, each product
   through ``quant.linear`` on the path ``quant.select_kernels`` picks for the device) on views
   of the record on the compute device, x bf16, under ``torch.inference_mode``: N=1 (one decode
   token) and N=16 (a prefill-ish batch). A format written ``NAME@PATH`` (``nf4@avx2``,
   ``fp4@torch``...; CPU only) runs the same FFN with the portable 4-bit matmul forced onto one
   path: ``avx512``, ``avx2`` or ``generic`` of offload's CPU kernel, or ``torch`` (bitsandbytes'
   dequantize, then torch's matmul); plain ``nf4`` is the path the engine takes, and its row is
   named by it. Each FFN time is also given as GB/s of the record's bytes (the weights with
   their quantization state; temporaries a path makes are not counted) and as a share of the
   read bandwidth of step 0; and the relative error ||y - y_bf16|| / ||y_bf16|| of each
   format's N=16 output against the bf16 record's.

Every time is the median over ``--reps`` repetitions after one untimed warm-up; the repetitions
interleave the formats (forwards, then reversed, ...) so that a slow spell of a shared machine
lands on all of them, and a cell whose spread ((max - min) / median) is large is marked.
Ratios (JSON only) are this format's median over bf16's, which is always measured (it is the
baseline).

What it does not measure: a whole pack (no manifest, and not the crc32 check ``Pack.read_record``
makes on an expert's first read), quantization time, the expert cache, a physical disk when the
machine is a VM whose host caches the disk image (a "cold" read is then only as cold as the guest
can make it: compare its GB/s with the disk's), trained weights (random Gaussian weights have no
outliers, so real relative errors differ), batches above 16 tokens, or memory. Nothing here
asserts a speed: benchmarks are not tests.

    python benchmarks/bench_quant.py
    python benchmarks/bench_quant.py --formats bf16,nf4@avx2,nf4@avx512,nf4@torch --reps 15 --json
    OFFLOAD_CPU_KERNEL=avx2 python benchmarks/bench_quant.py --formats bf16,nf4
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import mmap
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import Bandwidth, run, say, timed  # noqa: E402
from offload import quant  # noqa: E402
from offload.checkpoint import read_into  # noqa: E402
from offload.config import ModelConfig  # noqa: E402
from offload.device import (  # noqa: E402
    DEVICE_CHOICES,
    Transfers,
    device_name,
    empty_host_buffer,
    is_cuda,
    resolve_device,
)
from offload.errors import SettingError  # noqa: E402
from offload.experts.record import RecordLayout  # noqa: E402
from offload.kernels import cpu4  # noqa: E402
from offload.model import ExpertWeights, expert_ffn  # noqa: E402
from offload.plan import builtin_model  # noqa: E402

DEFAULT_FORMATS = ("bf16", "int8", "nf4", "nf4-dq", "fp4", "nf4-cpu")  # on CUDA; see default_formats
BASELINE = "bf16"
PATH_CHOICES = (*cpu4.PATHS, "torch")  # NAME@PATH: the portable 4-bit matmul forced onto one path
BANDWIDTH_MIB = 1024
WEIGHT_SEED = 0
INPUT_SEED = 1
WEIGHT_STD = 0.02  # Mixtral's initializer_range
TOKENS = (1, 16)  # FFN batch sizes timed; the relative error is taken at the last
NOISY = 0.25  # (max - min) / median above which a cell is marked
DROPPED = 0.01  # a cold read counts as cold when at most this share of the file was cached
MIB = 2**20


# ---- the page cache -------------------------------------------------------------------------------

def drop_from_page_cache(fd: int) -> bool:
    """Ask the kernel to drop the file's cached pages (they must be clean: the file was fsync'd).
    False where the call does not exist."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def cached_share(fd: int, size: int) -> float | None:
    """Share of the file's pages in the page cache (mincore on a fresh read-only mapping, which
    faults nothing in); None where that cannot be asked."""
    try:
        libc = _libc()
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    except (OSError, AttributeError):
        return None
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return None
        resident = torch.frombuffer(bytearray(vec), dtype=torch.uint8).bitwise_and(1).sum().item()
        return resident / pages
    finally:
        libc.munmap(addr, size)


def write_file(path: Path, data: torch.Tensor) -> None:
    """data (uint8, CPU) at offset 0 of a new file, fsync'd so that its pages can be dropped."""
    buffer = memoryview(data.numpy())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done = 0
        while done < len(buffer):
            done += os.pwrite(fd, buffer[done:], done)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- one format -----------------------------------------------------------------------------------

@dataclass
class Subject:
    """One format's expert: its record on the host (pinned on CUDA) and on the compute device,
    the views the FFN runs on, its file, and what was measured."""

    fmt: str  # the row's name: a format, or FORMAT@PATH
    layout: RecordLayout
    host: torch.Tensor  # uint8 [nbytes], the packed record
    record: torch.Tensor  # uint8 [nbytes] on the compute device (``host`` itself on a CPU)
    weights: ExpertWeights  # views of ``record``
    path: Path
    fd: int
    times: dict[str, list[float]] = field(default_factory=dict)  # step -> seconds per repetition
    cached_after_drop: list[float | None] = field(default_factory=list)
    y: torch.Tensor | None = None  # [N, D] FFN output at the largest N, from the warm-up
    kernels: quant.Kernels | None = None  # the forced 4-bit path of a FORMAT@PATH row; None: the engine's


def split_name(name: str) -> tuple[str, str | None]:
    """'nf4@avx2' -> ('nf4', 'avx2'); 'int8' -> ('int8', None)."""
    fmt, _, path = name.partition("@")
    return fmt, path or None


def forced_kernels(path: str, device: torch.device) -> quant.Kernels:
    """The device's kernels with the portable 4-bit matmul on ``path`` (up to cpu4.MAX_ROWS rows
    of x, as the engine's own choice; dequantize + matmul above)."""
    base = quant.select_kernels(device)
    if path == "torch":
        return dataclasses.replace(base, four_bit=quant._linear_4bit_dequantize)

    def four_bit(x: torch.Tensor, qm: quant.QuantizedMatrix) -> torch.Tensor:
        if x.shape[0] > cpu4.MAX_ROWS:
            return quant._linear_4bit_dequantize(x, qm)
        return cpu4.run(x, qm.tensors, qm.shape, path)[0].to(x.dtype)  # [N, Out]

    return dataclasses.replace(base, four_bit=four_bit)


def ffn(x: torch.Tensor, s: Subject) -> torch.Tensor:
    """The engine's expert FFN, or the same products on a forced 4-bit path: x [N, D] -> [N, D]."""
    if s.kernels is None:
        return expert_ffn(x, s.weights)
    w = s.weights

    def mm(a: torch.Tensor, m) -> torch.Tensor:
        return F.linear(a, m) if isinstance(m, torch.Tensor) else quant.linear(a, m, s.kernels)

    return mm(F.silu(mm(x, w.w1)) * mm(x, w.w3), w.w2)


def alias(s: Subject, name: str, kernels: quant.Kernels | None) -> Subject:
    """Another row on the same record and file (its own descriptor and times)."""
    return Subject(name, s.layout, s.host, s.record, s.weights, s.path, os.open(s.path, os.O_RDONLY),
                   kernels=kernels)


def build(fmt: str, config: ModelConfig, device: torch.device, directory: Path,
          fill: Callable[[RecordLayout, torch.Tensor], object]) -> Subject:
    """The record of ``fmt``, written by ``fill(layout, host)`` into a zeroed host buffer, then
    into its file and (on CUDA) onto the device."""
    layout = RecordLayout.for_config(config, fmt)
    host = empty_host_buffer(layout.nbytes, 1, device)[0].zero_()  # [nbytes], padding zero
    fill(layout, host)
    path = directory / f"expert-{fmt}.bin"
    write_file(path, host)
    record = host
    if is_cuda(device):
        record = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        record.copy_(host)
    fd = os.open(path, os.O_RDONLY)
    return Subject(fmt, layout, host, record, layout.views(record), path, fd)


def draw_expert(layout: RecordLayout, host: torch.Tensor) -> None:
    """The bf16 source: w1, w3 [I, D], w2 [D, I] ~ N(0, WEIGHT_STD), drawn in fp32 from
    WEIGHT_SEED straight into the record's views (no second copy of the expert)."""
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    for w in layout.views(host):
        w.copy_(torch.randn(w.shape, generator=generator).mul_(WEIGHT_STD))


def quantize_baseline(baseline: Subject) -> Callable[[RecordLayout, torch.Tensor], object]:
    """A ``fill`` that writes the baseline's bf16 expert (views of its host record) into a
    record of another format, quantizing on the CPU as a convert does."""
    source = baseline.layout.views(baseline.host)  # w1, w3, w2 bf16, no copies
    return lambda layout, host: layout.pack(source, host)


def trim_heap() -> None:
    """Hand freed heap back to the system (glibc keeps the fp32 temporaries of a quantization
    otherwise); a no-op elsewhere."""
    gc.collect()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def one_pass(s: Subject, scratch: torch.Tensor, xs: dict[int, torch.Tensor], transfers: Transfers,
             device: torch.device) -> dict[str, float]:
    """Cold read, warm read, (host-to-device copy,) FFN at each N: seconds per step."""
    nbytes = s.layout.nbytes
    target = memoryview(scratch[:nbytes].numpy())

    def read() -> None:
        got = read_into(s.fd, target, 0)
        if got != nbytes:
            raise OSError(f"{s.path}: read {got} of {nbytes} bytes")

    out: dict[str, float] = {}
    dropped = drop_from_page_cache(s.fd)
    s.cached_after_drop.append(cached_share(s.fd, nbytes) if dropped else None)
    out["read cold"] = timed(read, device)
    out["read warm"] = timed(read, device)
    if is_cuda(device):
        out["h2d"] = timed(lambda: transfers.wait(transfers.copy(s.record, s.host)), device)
    with torch.inference_mode():
        for n, x in xs.items():
            out[f"ffn N={n}"] = timed(lambda x=x: ffn(x, s), device)
    return out


def measure(subjects: list[Subject], scratch: torch.Tensor, xs: dict[int, torch.Tensor], reps: int,
            device: torch.device, bandwidth: Bandwidth) -> None:
    """One untimed warm-up pass per format (it also keeps the outputs for the error), then
    ``reps`` passes over all formats, forwards then reversed, each with a read of the bandwidth
    buffer before it."""
    bandwidth.read()  # warm-up
    transfers = Transfers(device)
    n_max = max(xs)
    for s in subjects:
        one_pass(s, scratch, xs, transfers, device)
        if not torch.equal(scratch[: s.layout.nbytes], s.host):
            raise RuntimeError(f"{s.path}: the bytes read back differ from the record written")
        s.cached_after_drop.clear()
        with torch.inference_mode():
            s.y = ffn(xs[n_max], s).float().cpu()  # [N, D]
    for rep in range(reps):
        say(f"repetition {rep + 1}/{reps}")
        bandwidth.measure()
        for s in subjects if rep % 2 == 0 else subjects[::-1]:
            for step, seconds in one_pass(s, scratch, xs, transfers, device).items():
                s.times.setdefault(step, []).append(seconds)


# ---- numbers --------------------------------------------------------------------------------------

def summary(runs: list[float]) -> dict:
    median = statistics.median(runs)
    return {
        "median": median,
        "min": min(runs),
        "max": max(runs),
        "spread": (max(runs) - min(runs)) / median if median > 0 else 0.0,
        "runs": runs,
    }


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y - reference).norm() / reference.norm()).item()


def results(subjects: list[Subject], args: argparse.Namespace, device: torch.device, config: ModelConfig,
            bandwidth: Bandwidth) -> dict:
    base = next(s for s in subjects if s.fmt == BASELINE)
    base_times = {step: statistics.median(runs) for step, runs in base.times.items()}
    read = summary(bandwidth.times)
    read_gbps = bandwidth.nbytes / read["median"] / 1e9
    formats = {}
    for s in subjects:
        times = {}
        for step, runs in s.times.items():
            t = summary(runs)
            t["ratio_to_bf16"] = t["median"] / base_times[step]
            t["gb_per_s"] = s.layout.nbytes / t["median"] / 1e9
            if step.startswith("ffn"):
                t["share_of_read_bandwidth"] = t["gb_per_s"] / read_gbps
            times[step] = t
        cached = [c for c in s.cached_after_drop if c is not None]
        formats[s.fmt] = {
            "record_bytes": s.layout.nbytes,
            "record_stride": s.layout.stride,
            "bytes_ratio_to_bf16": s.layout.nbytes / base.layout.nbytes,
            "bits_per_weight": 8 * s.layout.nbytes / config.expert_parameters,
            "times_s": times,
            "cached_share_after_drop": cached or None,
            f"relative_error_n{max(TOKENS)}": relative_error(s.y, base.y),
        }
    all_cached = [c for f in formats.values() for c in (f["cached_share_after_drop"] or [])]
    import bitsandbytes

    return {
        "machine": device_name(device),
        "cpu_model": cpu4._cpu_model(),
        "device": str(device),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "threads": torch.get_num_threads(),
        "kernels": quant.select_kernels(device).description,
        "cpu_4bit_kernel": dataclasses.asdict(cpu4.status()) if not is_cuda(device) else None,
        "read_bandwidth": {"gb_per_s": read_gbps, "bytes": bandwidth.nbytes, "method": bandwidth.method,
                           "times_s": read, "threads": torch.get_num_threads()},
        "expert": {
            **{m.name: list(m.shape) for m in base.layout.matrices},  # w1, w3 [I, D], w2 [D, I]
            "weight_std": WEIGHT_STD, "weight_seed": WEIGHT_SEED, "input_seed": INPUT_SEED, "source_dtype": "bfloat16",
        },
        "tokens": list(TOKENS),
        "reps": args.reps,
        "directory": str(args.dir or tempfile.gettempdir()),
        "page_cache_drop": {
            "asked": hasattr(os, "posix_fadvise"),
            "checked": bool(all_cached),
            "worked": bool(all_cached) and max(all_cached) <= DROPPED,
            "max_cached_share_after_drop": max(all_cached) if all_cached else None,
        },
        "formats": formats,
    }


# ---- output ---------------------------------------------------------------------------------------

def drop_line(drop: dict) -> str:
    if not drop["asked"]:
        return "page cache: posix_fadvise is missing here, so 'cold' reads are NOT cold"
    if not drop["checked"]:
        return "page cache: posix_fadvise(DONTNEED) before each cold read; mincore unavailable, so not checked"
    share = drop["max_cached_share_after_drop"]
    if drop["worked"]:
        return (f"page cache: posix_fadvise(DONTNEED) before each cold read worked (mincore: at most {share:.1%} "
                "of a file still cached); the host of a VM may still cache its disk")
    return (f"page cache: posix_fadvise(DONTNEED) did NOT drop the files (mincore: up to {share:.1%} still cached, "
            "e.g. a tmpfs --dir), so 'cold' reads are partly warm")


def print_report(r: dict) -> None:
    print(f"machine: {r['machine']}, {r['cpu_model']}, torch {r['torch']}, bitsandbytes {r['bitsandbytes']}; "
          f"{r['reps']} reps, medians, interleaved")
    print(f"compute ({r['device']}): {r['kernels']}")
    bw = r["read_bandwidth"]
    t = bw["times_s"]
    print(f"read bandwidth: {bw['gb_per_s']:.1f} GB/s ({bw['bytes'] / MIB:.0f} MiB, {bw['threads']} threads, "
          f"{bw['method']}; min..max {bw['bytes'] / t['max'] / 1e9:.1f}..{bw['bytes'] / t['min'] / 1e9:.1f})")
    e = r["expert"]
    print(f"one Mixtral-8x7B expert: w1, w3 {e['w1']}, w2 {e['w2']}; random N(0, {e['weight_std']}) bf16 weights "
          f"(seed {e['weight_seed']}); x bf16; records read from files in {r['directory']}")
    print(drop_line(r["page_cache_drop"]))
    print()

    steps = list(next(iter(r["formats"].values()))["times_s"])
    columns = [("format", 14), ("MiB", 6)]
    for step in steps:
        if step.startswith("ffn"):
            columns += [(f"{step} ms", 12), ("GB/s", 6), ("share", 5)]
        else:
            columns += [(f"{step} ms", 12), ("GB/s", 6)]
    err_key = f"relative_error_n{max(r['tokens'])}"
    columns.append((f"rel err N={max(r['tokens'])}", 14))
    print("  ".join(name.rjust(width) if i else name.ljust(width) for i, (name, width) in enumerate(columns)))

    noisy = []
    for fmt, f in r["formats"].items():
        cells = [fmt, f"{f['record_bytes'] / MIB:.1f}"]
        for step in steps:
            t = f["times_s"][step]
            mark = "*" if t["spread"] > NOISY else " "
            if mark == "*":
                noisy.append(f"{fmt} {step} {t['spread']:.0%}")
            cells += [f"{t['median'] * 1e3:.1f}{mark}", f"{t['gb_per_s']:.2f}"]
            if "share_of_read_bandwidth" in t:
                cells.append(f"{t['share_of_read_bandwidth']:.2f}")
        cells.append(f"{f[err_key]:.4f}")
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, (_, w)) in enumerate(zip(cells, columns))))
    print()
    print("GB/s: the record's bytes over the median time; share: that over the read bandwidth above; "
          f"rel err: ||y - y_bf16|| / ||y_bf16|| of the FFN output at N={max(r['tokens'])}; "
          "NAME@PATH: the 4-bit matmul on that path (offload's CPU kernel, or torch: dequantize + matmul)")
    if noisy:
        print(f"* large spread, (max - min) / median above {NOISY:.0%}: {', '.join(noisy)}; "
              "something else may share the machine (--json lists every repetition)")


# ---- main -----------------------------------------------------------------------------------------

def default_formats(device: torch.device) -> str:
    """On CUDA: DEFAULT_FORMATS. On a CPU: bf16, int8, nf4 on each path of the 4-bit CPU kernel
    this CPU runs and on the torch path, nf4-dq, fp4 (the engine's path), and nf4-cpu where
    bitsandbytes' fused CPU kernel works (elsewhere it dequantizes, the slowest of all)."""
    if is_cuda(device):
        return ",".join(DEFAULT_FORMATS)
    names = ["bf16", "int8", *(f"nf4@{p}" for p in cpu4.runnable_paths() if p != "generic"), "nf4@torch",
             "nf4-dq", "fp4"]
    if quant.select_kernels(device).four_bit_cpu is quant._linear_4bit_cpu_fused:
        names.append("nf4-cpu")
    return ",".join(names)


def parse_formats(text: str, device: torch.device) -> list[str]:
    """Row names, the baseline first: a format, or FORMAT@PATH for a portable 4-bit format on a
    CPU (plain portable 4-bit formats on a CPU are named by the engine's path)."""
    names = []
    for part in text.split(","):
        fmt_name, path = split_name(part.strip())
        fmt = quant.get_format(fmt_name)  # SettingError names a bad one
        on_cpu_4bit = fmt.kind == "4bit" and not is_cuda(device)
        if path is not None:
            if not on_cpu_4bit:
                raise SettingError(f"--formats {part}: @PATH is for the portable 4-bit formats on a CPU")
            if path not in PATH_CHOICES:
                raise SettingError(f"--formats {part}: the path is one of {', '.join(PATH_CHOICES)}")
            if path != "torch" and path not in cpu4.runnable_paths():
                raise SettingError(f"--formats {part}: this CPU or build runs {', '.join(cpu4.runnable_paths()) or 'none'}"
                                   f" of the kernel's paths ({cpu4.status().reason or 'none built'})")
        elif on_cpu_4bit:
            path = cpu4.status().path
        name = f"{fmt.name}@{path}" if path else fmt.name
        if name not in names:
            names.append(name)
    if BASELINE not in names:
        say(f"note: {BASELINE} added as the baseline of the ratios")
    return [BASELINE] + [name for name in names if name != BASELINE]  # the baseline first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=None,
                        help=f"comma list of weight formats ({', '.join(quant.FORMATS)}), a portable 4-bit one "
                             f"optionally as NAME@PATH ({', '.join(PATH_CHOICES)}) on a CPU; bf16 is always "
                             "measured (default: see the module's docstring)")
    parser.add_argument("--bandwidth-mib", type=int, default=BANDWIDTH_MIB,
                        help="size of the buffer whose streaming read is the read bandwidth")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the record files (default: the system's temporary directory; "
                             "on a tmpfs the page cache cannot be dropped)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    for flag in ("reps", "threads", "bandwidth_mib"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def bench(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    rows = parse_formats(args.formats or default_formats(device), device)
    _, config = builtin_model("mixtral-8x7b")
    say(f"compute paths: {quant.select_kernels(device).description}")
    x = torch.randn(max(TOKENS), config.hidden_size, generator=torch.Generator().manual_seed(INPUT_SEED))
    x = x.to(torch.bfloat16).to(device)  # [N, D]
    xs = {n: x[:n] for n in TOKENS}  # [n, D] each
    bandwidth = Bandwidth(args.bandwidth_mib * MIB, device)

    records: dict[str, Subject] = {}  # format -> the subject that owns its record
    subjects: list[Subject] = []
    with tempfile.TemporaryDirectory(prefix="offload-bench-quant-", dir=args.dir) as tmp:
        try:
            # bitsandbytes' CPU 4-bit quantization holds fp32 temporaries of several times a matrix
            # (~1.5 GB for a 14336x4096 fp4 one): quantize those first, while few records exist.
            formats = list(dict.fromkeys(split_name(name)[0] for name in rows))
            order = sorted(formats[1:], key=lambda name: quant.get_format(name).kind != "4bit")
            for fmt in (BASELINE, *order):
                start = time.perf_counter()
                fill = draw_expert if fmt == BASELINE else quantize_baseline(records[BASELINE])
                records[fmt] = build(fmt, config, device, Path(tmp), fill)
                trim_heap()
                say(f"{fmt}: record of {records[fmt].layout.nbytes / MIB:.1f} MiB packed and written "
                    f"in {time.perf_counter() - start:.1f} s")
            for name in rows:  # the first row on a record is its owner, later ones alias it
                fmt, path = split_name(name)
                owner, kernels = records[fmt], (forced_kernels(path, device) if path else None)
                if any(s is owner for s in subjects):
                    subjects.append(alias(owner, name, kernels))
                else:
                    owner.fmt, owner.kernels = name, kernels
                    subjects.append(owner)
            largest = max(s.layout.nbytes for s in subjects)
            scratch = empty_host_buffer(largest, 1, device)[0]  # [largest] (pinned on CUDA), the read target
            say(f"warm-up, then {args.reps} interleaved repetitions ...")
            measure(subjects, scratch, xs, args.reps, device, bandwidth)
            return results(subjects, args, device, config, bandwidth)
        finally:
            for s in subjects:
                os.close(s.fd)
            for s in records.values():
                if not any(s is t for t in subjects):
                    os.close(s.fd)


def main(argv: list[str] | None = None) -> int:
    return run(argv, parse_args, bench, print_report)


if __name__ == "__main__":
    sys.exit(main())
