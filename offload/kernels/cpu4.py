"""The CPU 4-bit kernel: x @ W.T straight on bitsandbytes' portable 4-bit record bytes.

What it is: the loader and caller of ``q4.c`` (beside this file). On first use the C source is
compiled by the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) with
``-O3 -fopenmp`` into a per-user cache, ``$XDG_CACHE_HOME/offload/kernels`` (default
``~/.cache/offload/kernels``), under a name keyed by the source's hash, the flags, the compiler
(its resolved path, size and mtime), the CPU model and the machine; the build runs under a file
lock and lands by an atomic rename, so concurrent first uses build once and never load half a
file. A cached file that does not load, or has another ABI, is rebuilt; every path the library
offers is checked once against a float reference before it is used. ``pip install`` builds
nothing: without a compiler, or when the build or the check fails, ``status()`` says why and
``offload.quant`` keeps its pure-torch path (dequantize, then matmul).

Paths (``PATHS``, best first), picked at run time by what the CPU has (the C side asks
``__builtin_cpu_supports``, which also checks that the OS saves the registers): ``avx512``
(AVX-512 VL + VNNI), ``avx2`` (AVX2 + FMA), ``generic`` (portable C). The two SIMD paths
quantize each row of x to int16 per block of 64 (one scale a block), look the codes up in an
int16 table (vpshufb), multiply integers exactly (vpmaddwd, vpdpwssd) and scale each block's
int32 sums by absmax x the activation's scale in fp32; they give bit-identical results to each
other. ``generic`` computes in fp32 on the dequantized weights and serves any shape (a SIMD
path needs In % 64 == 0 and hands other matrices to ``generic``).
``OFFLOAD_CPU_KERNEL=avx512|avx2|generic|torch`` forces one (a path this CPU lacks is a
SettingError, never an illegal instruction); unset or ``auto``: the best.

Accuracy of the SIMD paths against the float result (bitsandbytes' dequantization, then a
float64 matmul): the activations' rounding to 16 bits (2e-5 rms of a Gaussian block) and the
codes' table rounded to 13 bits (1.4e-4 rms of an nf4 weight) give a relative error per output
row of about 1e-4 (measured on 14336x4096 nf4: 1.1e-4); tests/test_cpu_kernel.py asserts below
1e-3, the same bound for fp4 and double quantization. (llama.cpp's int8 activations and an
int8 table, tried first, measured 0.77% error per row, and a Mixtral expert at N=1 on two
threads of a Zen 4 EPYC in 0.86x the time on avx2, 0.93x on avx512: 60x the error for 7-14%.)

Against the GPU (an expert run on the CPU beside a GPU, ``--cpu-experts``): bitsandbytes' CUDA
kernel dequantizes to bf16 and rounds its products to bf16, so the two sides differ by bf16's
rounding, not by this kernel's: measured 4-5.5e-3 relative error per expert output row (nf4,
nf4-dq, fp4; a Mixtral-like 1024 x 3584 expert, N = 1-16) against the GPU's arithmetic emulated
on the CPU, and 9.4e-3 relative error of the demo model's logits per position (bf16, every
expert on the kernel vs every one dequantized and multiplied in bf16). The stated bounds,
``GPU_EXPERT_AGREEMENT`` and ``GPU_LOGITS_AGREEMENT``, are tested against that emulation here
and against a real GPU wherever one is lent (tests/test_gpu.py).

Threads: OpenMP over output rows, 64 rows a grab to whichever thread is free, with
``torch.get_num_threads()`` threads of the calling thread. torch's wheels load their own ``libgomp.so.1``, and the dynamic loader resolves this
library's ``libgomp.so.1`` to the one already loaded, so both share one OpenMP runtime and its
thread pool. ctypes releases the GIL for the call.

What it is not: a GEMM for large batches (``offload.quant`` dequantizes and multiplies above
``MAX_ROWS`` rows), a quantizer, or a reader of the "-cpu" layouts.

Shape legend: N = rows of x, In = in features, Out = out features, B = blocks of 64.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.errors import SettingError

SOURCE = Path(__file__).with_name("q4.c")
ENV_PATH = "OFFLOAD_CPU_KERNEL"  # avx512 | avx2 | generic | torch | auto
PATHS = ("avx512", "avx2", "generic")  # the kernel's paths, best first
CHOICES = (*PATHS, "torch")
_PATH_ID = {"generic": 0, "avx2": 1, "avx512": 2}
ABI = 1  # q4_abi() of a library this loader can call
BASE_FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")
OPENMP_FLAG = "-fopenmp"
BUILD_TIMEOUT_S = 300
BLOCK = 64
MAX_ROWS = 64  # rows of x up to which offload.quant uses the kernel (above: dequantize + matmul; measured
# on Mixtral 14336x4096 nf4, 2 threads of a Zen 4 EPYC: 42 vs 58 ms at 64 rows, 100 vs 74 at 128)
GPU_EXPERT_AGREEMENT = 1.5e-2  # ||y_cpu - y_gpu|| / ||y_gpu|| per row of one expert's output, bf16
GPU_LOGITS_AGREEMENT = 3e-2  # ||logits_cpu_experts - logits_gpu|| / ||logits_gpu|| per position, bf16
_DESCRIPTIONS = {
    "avx512": "AVX-512 VNNI, int16 dot products per block of 64",
    "avx2": "AVX2+FMA, int16 dot products per block of 64",
    "generic": "portable C, fp32",
}


class KernelBuildError(Exception):
    """The kernel could not be built, loaded or checked (not a user error: the caller falls
    back to the torch path and reports the message)."""


# ---- build and cache ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where built kernels are kept: $XDG_CACHE_HOME/offload/kernels, else ~/.cache/offload/kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "offload" / "kernels"


def find_compiler() -> list[str] | None:
    """The C compiler command: $CC (split like a shell), else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _compiler_identity(compiler: list[str]) -> str:
    exe = shutil.which(compiler[0]) or compiler[0]
    try:
        real = os.path.realpath(exe)
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}:{' '.join(compiler[1:])}"
    except OSError:
        return " ".join(compiler)


def library_path(directory: Path, compiler: list[str]) -> Path:
    """The cached library's file for this source, flags, compiler, CPU model and machine."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr((BASE_FLAGS, OPENMP_FLAG, ABI)).encode(),
                 _compiler_identity(compiler).encode(), _cpu_model().encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return Path(directory) / f"q4-{key.hexdigest()[:20]}.so"


def _compile(compiler: list[str], target: Path) -> bool:
    """Compile SOURCE into ``target`` (a temporary name beside it, then an atomic rename);
    True when built with OpenMP. Raises KernelBuildError with the compiler's first error."""
    errors = []
    for flags in ((*BASE_FLAGS, OPENMP_FLAG), BASE_FLAGS):
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        cmd = [*compiler, *flags, str(SOURCE), "-o", str(tmp), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"{' '.join(compiler)} could not run: {e}") from None
        if done.returncode == 0 and tmp.exists():
            os.replace(tmp, target)
            return OPENMP_FLAG in flags
        tmp.unlink(missing_ok=True)
        lines = [ln for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else f"exit {done.returncode}")
        errors.append(first.strip()[:200])
    raise KernelBuildError(f"compiling {SOURCE.name} with {' '.join(compiler)} failed: {errors[-1]}")


class _Weight(ctypes.Structure):
    """q4.c's q4_weight."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("absmax_codes", ctypes.c_void_p),
        ("nested_absmax", ctypes.c_void_p),
        ("nested_map", ctypes.c_void_p),
        ("quant_map", ctypes.c_void_p),
        ("nested_offset", ctypes.c_float),
        ("out", ctypes.c_int64),
        ("in_", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class Library:
    """A loaded kernel library and what it offers here."""

    path: Path
    handle: ctypes.CDLL
    built: bool  # compiled by this load (False: taken from the cache)
    compiler: str
    openmp: bool
    runnable: tuple[str, ...]  # paths compiled in and supported by this CPU, best first


def _open(path: Path) -> ctypes.CDLL:
    """Load and type the library; KernelBuildError when it does not load or has another ABI."""
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.q4_abi()
    except (OSError, AttributeError) as e:
        raise KernelBuildError(f"{path}: does not load ({str(e).splitlines()[0][:160]})") from None
    if abi != ABI:
        raise KernelBuildError(f"{path}: ABI {abi}, expected {ABI}")
    lib.q4_linear.argtypes = [ctypes.POINTER(_Weight), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.q4_linear.restype = ctypes.c_int
    for name in ("q4_openmp", "q4_compiled_paths", "q4_supported_paths"):
        getattr(lib, name).restype = ctypes.c_int
    lib.q4_stream_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.q4_stream_sum.restype = ctypes.c_uint64
    return lib


class _Lock:
    """An exclusive lock on a file (fcntl.flock), a no-op where there is none."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def load_library(directory: Path | str | None = None, compiler: list[str] | None = None) -> Library:
    """The kernel library from the cache ``directory`` (default ``cache_dir()``), compiled there
    first if it is missing or does not load; every runnable path self-checked. Raises
    KernelBuildError saying why when there is no compiler or the build or check fails."""
    compiler = compiler if compiler is not None else find_compiler()
    if not compiler:
        raise KernelBuildError("no C compiler found (set CC, or install gcc or clang)")
    if not shutil.which(compiler[0]) and not os.path.exists(compiler[0]):
        raise KernelBuildError(f"no C compiler found ({compiler[0]!r} is not on PATH)")
    directory = Path(directory) if directory is not None else cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix="offload-kernels-"))  # not cached, but usable
    path = library_path(directory, compiler)
    built = False
    with _Lock(path.with_suffix(".lock")):
        lib = None
        if path.exists():
            try:
                lib = _open(path)
            except KernelBuildError:
                path.unlink(missing_ok=True)  # damaged or stale: rebuild it
        if lib is None:
            _compile(compiler, path)
            built = True
            lib = _open(path)
    compiled, supported = lib.q4_compiled_paths(), lib.q4_supported_paths()
    runnable = tuple(p for p in PATHS if compiled & supported & (1 << _PATH_ID[p]))
    library = Library(path, lib, built, " ".join(compiler), bool(lib.q4_openmp()), runnable)
    bad = [p for p in runnable if not _self_check(library, p)]
    if bad:
        raise KernelBuildError(f"{path}: path {', '.join(bad)} gave wrong numbers in the self-check")
    return library


def _self_check(library: Library, path: str) -> bool:
    """One small product on ``path`` against the float product of the same codes, decoded here
    in torch (independent of the C code)."""
    generator = torch.Generator().manual_seed(0)
    out_f, in_f, n = 24, 3 * BLOCK, 3
    data = torch.randint(0, 256, (out_f * in_f // 2, 1), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(out_f * in_f // BLOCK, generator=generator) + 0.5  # [B]
    quant_map = torch.linspace(-1, 1, 16)
    x = torch.randn(n, in_f, generator=generator)  # [N, In]
    want = x.double() @ dequantize_reference(data, absmax, quant_map, (out_f, in_f)).double().T  # [N, Out]
    got, _ = run(x, {"data": data, "absmax": absmax, "quant_map": quant_map}, (out_f, in_f), path,
                 threads=1, library=library)
    tolerance = 1e-5 if path == "generic" else 1e-3
    return bool(torch.isfinite(got).all()) and ((got.double() - want).norm() <= tolerance * want.norm()).item()


def dequantize_reference(data: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                         shape: tuple[int, int]) -> torch.Tensor:
    """The [Out, In] fp32 matrix of portable 4-bit codes, decoded in plain torch: codes in
    row-major order, high nibble first, w = quant_map[code] * absmax[i // 64]."""
    out_f, in_f = shape
    b = data.reshape(-1)  # [n/2]
    codes = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(-1)[: out_f * in_f].long()  # [n]
    scale = absmax.float().repeat_interleave(BLOCK)[: out_f * in_f]  # [n]
    return (quant_map.float()[codes] * scale).reshape(out_f, in_f)


# ---- calling it ---------------------------------------------------------------------------------


def _checked(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if t.dtype != dtype or t.device.type != "cpu" or t.numel() != numel:
        raise ValueError(f"4-bit kernel: tensor {name!r} is {t.dtype} {list(t.shape)} on {t.device}, "
                         f"expected {numel} {dtype} on the CPU")
    return t if t.is_contiguous() else t.contiguous()


def run(x: torch.Tensor, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], path: str,
        threads: int | None = None, library: Library | None = None) -> tuple[torch.Tensor, int]:
    """x [N, In] (any float dtype, CPU) @ W.T on ``path`` -> (y [N, Out] fp32, threads used).
    ``tensors``: the matrix's portable 4-bit tensors as ``offload.quant.tensor_specs`` names them
    (with ``nested_*`` for double quantization). A SIMD path with In % 64 != 0 runs ``generic``.
    ``threads``: default ``torch.get_num_threads()``."""
    library = library or _library()
    if path not in library.runnable:
        raise SettingError(f"4-bit CPU kernel path {path!r}: this CPU or build runs {', '.join(library.runnable)}")
    out_f, in_f = shape
    n_weights = out_f * in_f
    blocks = -(-n_weights // BLOCK)
    if x.dim() != 2 or x.shape[1] != in_f:
        raise ValueError(f"4-bit kernel: x is {list(x.shape)}, expected [N, {in_f}]")
    xf = x.to(torch.float32).contiguous()  # [N, In] fp32 (no copy when it already is)
    n = xf.shape[0]
    y = torch.empty((n, out_f), dtype=torch.float32)  # [N, Out]
    if n == 0:
        return y, 0
    keep = [xf]  # every tensor whose pointer the C side reads stays referenced until it returns

    def pointer(name: str, dtype: torch.dtype, numel: int) -> int:
        keep.append(_checked(tensors[name], name, dtype, numel))
        return keep[-1].data_ptr()

    w = _Weight(out=out_f, in_=in_f)
    w.data = pointer("data", torch.uint8, (n_weights + 1) // 2)
    w.quant_map = pointer("quant_map", torch.float32, 16)
    if "nested_absmax" in tensors:  # double quantization
        w.absmax_codes = pointer("absmax", torch.uint8, blocks)
        w.nested_absmax = pointer("nested_absmax", torch.float32, -(-blocks // 256))
        w.nested_map = pointer("nested_quant_map", torch.float32, 256)
        w.nested_offset = float(tensors["nested_offset"])
    else:
        w.absmax = pointer("absmax", torch.float32, blocks)
    path_id = _PATH_ID[path] if in_f % BLOCK == 0 else _PATH_ID["generic"]
    used = ctypes.c_int(0)
    threads = torch.get_num_threads() if threads is None else threads
    rc = library.handle.q4_linear(ctypes.byref(w), xf.data_ptr(), n, y.data_ptr(), path_id, max(1, int(threads)),
                                  ctypes.byref(used))
    if rc != 0:
        raise RuntimeError(f"4-bit CPU kernel: q4_linear returned {rc} on path {path} for {list(shape)}")
    return y, used.value


def stream_read(buffer: torch.Tensor, threads: int | None = None) -> int:
    """Read ``buffer`` (contiguous, CPU, 8-byte aligned) once, as a streaming sum of its 64-bit
    words with ``threads`` OpenMP threads (default ``torch.get_num_threads()``); returns the sum.
    For timing the machine's read bandwidth (benchmarks/bench_quant.py); KernelBuildError where
    the kernel cannot be built."""
    if buffer.device.type != "cpu" or not buffer.is_contiguous() or buffer.data_ptr() % 8:
        raise ValueError("stream_read needs a contiguous, 8-byte aligned CPU tensor")
    threads = torch.get_num_threads() if threads is None else threads
    nbytes = buffer.numel() * buffer.element_size()
    return int(_library().handle.q4_stream_sum(buffer.data_ptr(), nbytes, max(1, int(threads))))


def linear(x: torch.Tensor, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """x [N, In] @ W.T -> [N, Out] in x's dtype, on the path ``status()`` chose (not "torch")."""
    y, _ = run(x, tensors, shape, status().path)
    return y.to(x.dtype)


# ---- which path runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelStatus:
    """Which 4-bit CPU path is in use and why."""

    path: str  # "avx512", "avx2", "generic" or "torch" (offload.quant's dequantize + matmul)
    runnable: tuple[str, ...]  # the kernel's paths this CPU and build run, best first (empty: none,
    # or not asked: OFFLOAD_CPU_KERNEL=torch builds nothing)
    reason: str | None  # why the kernel is not in use, or why not its best path; None otherwise
    library: str | None = None
    compiler: str | None = None
    openmp: bool = False

    def describe(self) -> str:
        if self.path == "torch":
            return f"dequantize, then matmul ({self.reason})"
        threads = "OpenMP, torch's thread count" if self.openmp else "one thread: built without OpenMP"
        text = f"offload's q4 kernel, {self.path} path ({_DESCRIPTIONS[self.path]}; {threads})"
        return text + (f" ({self.reason})" if self.reason else "")


@functools.cache
def _library_or_error() -> Library | KernelBuildError:
    try:
        return load_library()
    except KernelBuildError as e:
        return e  # kept, so a failed build is tried once per process


def _library() -> Library:
    got = _library_or_error()
    if isinstance(got, KernelBuildError):
        raise got
    return got


@functools.cache
def _status() -> KernelStatus:
    forced = os.environ.get(ENV_PATH, "").strip().lower()
    if forced not in ("", "auto", *CHOICES):
        raise SettingError(f"{ENV_PATH}={forced}: choose one of auto, {', '.join(CHOICES)}")
    forced = "" if forced == "auto" else forced
    if forced == "torch":
        return KernelStatus("torch", (), f"{ENV_PATH}=torch")
    try:
        library = _library()
    except KernelBuildError as e:
        if forced:
            raise SettingError(f"{ENV_PATH}={forced}: the 4-bit CPU kernel is unavailable: {e}") from None
        return KernelStatus("torch", (), f"offload's 4-bit CPU kernel is unavailable: {e}")
    info = {"runnable": library.runnable, "library": str(library.path), "compiler": library.compiler,
            "openmp": library.openmp}
    if forced:
        if forced not in library.runnable:
            raise SettingError(f"{ENV_PATH}={forced}: this CPU lacks it (it runs {', '.join(library.runnable)}, torch)")
        reason = f"{ENV_PATH}={forced}" if forced != library.runnable[0] else None
        return KernelStatus(forced, reason=reason, **info)
    return KernelStatus(library.runnable[0], reason=None, **info)


def status() -> KernelStatus:
    """The path in use (read ``OFFLOAD_CPU_KERNEL`` and built the library once; ``reset`` forgets)."""
    return _status()


def runnable_paths() -> tuple[str, ...]:
    """The kernel's paths this CPU runs, best first, whatever ``OFFLOAD_CPU_KERNEL`` says;
    empty when the kernel cannot be built here."""
    try:
        return _library().runnable
    except KernelBuildError:
        return ()


def reset() -> None:
    """Forget the loaded library and the chosen path (tests; a changed environment)."""
    _status.cache_clear()
    _library_or_error.cache_clear()
