"""offload's CPU 4-bit kernel (offload/kernels): every path this CPU runs against a float
oracle, its build cache and fallback, its threads, and the demo model through it.

The oracle is bitsandbytes' own dequantization of the record's tensors (over the flattened
matrix, as one row: see ``oracle_weight``), then a float64 matmul. Paths this CPU or build lacks
are skipped. Speed is measured in benchmarks/bench_quant.py, never here.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its harmless line about `kernels`

import pytest
import torch

from offload import quant
from offload.errors import SettingError
from offload.kernels import cpu4

FORMATS = ["nf4", "fp4", "nf4-dq", "fp4-dq"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# [Out, In]: In a multiple of 64 (the SIMD paths), Out not a multiple of 8 or 16 too; and rows
# that are not whole blocks of 64 (every path hands those to the portable C code).
SIMD_SHAPES = [(80, 128), (37, 192), (256, 64), (19, 1024), (129, 4096)]
ODD_SHAPES = [(256, 160), (64, 96), (7, 33), (3, 1000)]
ROWS = list(range(1, 17))
# Relative error per output row against the oracle (fp32 result, before any cast to x's dtype):
# the SIMD paths round x to 16 bits and the codes' table to 13 bits (measured 1e-4 to 1.5e-4);
# the portable path computes in fp32 on the dequantized weights (measured below 1e-6).
SIMD_BOUND = 1e-3
GENERIC_BOUND = 1e-5


def bound(path: str, shape: tuple[int, int]) -> float:
    return GENERIC_BOUND if path == "generic" or shape[1] % 64 else SIMD_BOUND


def needs(path: str) -> None:
    if path not in cpu4.runnable_paths():
        pytest.skip(f"this CPU or build does not run the {path} path (it runs {cpu4.runnable_paths() or 'none'})")


@functools.cache
def matrix(shape, fmt, seed=0) -> quant.QuantizedMatrix:
    """A random N(0, 0.02) weight in ``fmt`` (cached: treat as read-only)."""
    generator = torch.Generator().manual_seed(seed)
    return quant.quantize(torch.randn(shape, generator=generator) * 0.02, fmt)


def activations(n, in_f, dtype, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_f, generator=generator).to(dtype)  # [N, In]


def oracle_weight(qm: quant.QuantizedMatrix) -> torch.Tensor:
    """bitsandbytes' dequantization of qm's tensors to fp32, [Out, In]. Its blocks of 64 run over
    the flattened matrix; its native CPU dequantizer numbers them by row instead when a row is
    not whole blocks (0.50), so the matrix is handed over as one row of Out * In weights, where
    both agree."""
    functional = quant._bnb()
    out_f, in_f = qm.shape
    state = qm.quant_state(torch.float32)
    state.shape = torch.Size((1, out_f * in_f))
    return functional.dequantize_4bit(qm.tensors["data"], state).reshape(out_f, in_f)


def row_errors(y: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """||y_n - want_n|| / ||want_n|| per row n, in float64."""
    y, want = y.double(), want.double()
    return (y - want).norm(dim=1) / want.norm(dim=1)


# ---- every path against the oracle ----------------------------------------------------------------


@pytest.mark.parametrize("path", cpu4.PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SIMD_SHAPES + ODD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_path_matches_bitsandbytes_dequantize_then_matmul(path, fmt, shape, dtype):
    needs(path)
    qm = matrix(shape, fmt)
    w = oracle_weight(qm).double()  # [Out, In]
    x = activations(max(ROWS), shape[1], dtype)  # [16, In]
    for n in ROWS:
        y, _ = cpu4.run(x[:n], qm.tensors, shape, path)  # [n, Out] fp32
        assert y.shape == (n, shape[0]) and y.dtype == torch.float32
        errors = row_errors(y, x[:n].double() @ w.T)
        assert errors.max().item() <= bound(path, shape), (n, errors.max().item())


@pytest.mark.parametrize("path", cpu4.PATHS)
def test_the_error_is_real_rounding_not_zero_and_a_wrong_scale_would_fail(path):
    """The bound is not vacuous: the SIMD paths do round (error above 1e-6), and the same
    codes with one block's absmax changed by 1% miss the oracle by more than the bound."""
    needs(path)
    shape = (64, 256)
    qm = matrix(shape, "nf4")
    x = activations(4, shape[1], torch.float32)
    want = x.double() @ oracle_weight(qm).double().T
    y, _ = cpu4.run(x, qm.tensors, shape, path)
    worst = row_errors(y, want).max().item()
    assert (worst > 1e-6) == (path != "generic")
    tensors = dict(qm.tensors)
    tensors["absmax"] = qm.tensors["absmax"].clone()  # the cached matrix stays as it was
    tensors["absmax"][::4] *= 1.01  # every row's first block
    y, _ = cpu4.run(x, tensors, shape, path)
    assert row_errors(y, want).min().item() > SIMD_BOUND


def test_the_simd_paths_give_bit_identical_results():
    needs("avx2")
    needs("avx512")
    for fmt in FORMATS:
        for shape in SIMD_SHAPES:
            qm = matrix(shape, fmt, seed=3)
            x = activations(16, shape[1], torch.bfloat16, seed=4)
            a, _ = cpu4.run(x, qm.tensors, shape, "avx2")
            b, _ = cpu4.run(x, qm.tensors, shape, "avx512")
            assert torch.equal(a, b), (fmt, shape)


@pytest.mark.parametrize("path", cpu4.PATHS)
def test_results_depend_neither_on_threads_nor_on_the_batch(path):
    """Each output is one thread's sum in a fixed order: a row gives the same bits alone, in a
    batch of 16 and on one or two threads (so cached and all-resident runs agree)."""
    needs(path)
    shape = (301, 512)
    qm = matrix(shape, "nf4-dq", seed=5)
    x = activations(16, shape[1], torch.float32, seed=6)
    batch, _ = cpu4.run(x, qm.tensors, shape, path, threads=2)
    one_thread, _ = cpu4.run(x, qm.tensors, shape, path, threads=1)
    assert torch.equal(batch, one_thread)
    for n in (0, 7, 15):
        alone, _ = cpu4.run(x[n : n + 1], qm.tensors, shape, path, threads=2)
        assert torch.equal(alone[0], batch[n])


@pytest.mark.parametrize("path", cpu4.PATHS)
def test_nan_and_inf_in_x_come_out_as_nan_not_as_numbers(path):
    needs(path)
    shape = (32, 128)
    qm = matrix(shape, "nf4")
    x = activations(3, shape[1], torch.float32)
    x[0, 5], x[1, 100] = float("nan"), float("inf")
    y, _ = cpu4.run(x, qm.tensors, shape, path)
    assert not torch.isfinite(y[:2]).any() and torch.isfinite(y[2]).all()


def test_quant_linear_uses_the_kernel_up_to_max_rows_and_returns_xs_dtype(monkeypatch):
    if cpu4.status().path == "torch":
        pytest.skip(f"the kernel is not in use here: {cpu4.status().reason}")
    calls = []
    run = cpu4.run
    monkeypatch.setattr(cpu4, "run", lambda *a, **k: calls.append(a[0].shape[0]) or run(*a, **k))
    shape = (96, 256)
    qm = matrix(shape, "nf4")
    w = oracle_weight(qm).double()
    for dtype in DTYPES:
        for n in (1, cpu4.MAX_ROWS, cpu4.MAX_ROWS + 1):
            x = activations(n, shape[1], dtype)
            with torch.inference_mode():
                y = quant.linear(x, qm)  # [n, Out]
            assert y.dtype == dtype and y.shape == (n, shape[0])
            assert row_errors(y, x.double() @ w.T).max().item() <= 1e-2  # a 16-bit result's rounding
    assert calls == [1, cpu4.MAX_ROWS] * len(DTYPES)  # above MAX_ROWS: dequantize + matmul


# ---- threads ----------------------------------------------------------------------------------------


def test_the_kernel_runs_torchs_thread_count_in_torchs_openmp_runtime():
    if not cpu4.runnable_paths():
        pytest.skip("the kernel cannot be built here")
    library = cpu4._library()
    if not library.openmp:
        pytest.skip("built without OpenMP")
    shape = (256, 256)  # 16 tiles of 16 rows: room for every thread
    qm = matrix(shape, "nf4")
    x = activations(1, shape[1], torch.float32)
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, min(2, os.cpu_count() or 1), before}):
            torch.set_num_threads(threads)
            _, used = cpu4.run(x, qm.tensors, shape, cpu4.runnable_paths()[0])
            assert used == threads
    finally:
        torch.set_num_threads(before)
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if sys.platform.startswith("linux") and torch_gomp.exists():
        # the OpenMP runtime the kernel calls (dlsym through its handle searches its own
        # dependencies) is the file torch loaded, not a second copy from the system
        assert Path(openmp_file(library.handle)).resolve() == torch_gomp.resolve()


def openmp_file(handle: ctypes.CDLL) -> str:
    """The file that defines the omp_get_max_threads a library resolves (dlsym, then dladdr)."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    address = ctypes.cast(handle.omp_get_max_threads, ctypes.c_void_p)
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    info = DlInfo()
    assert libc.dladdr(address, ctypes.byref(info)) != 0
    return info.dli_fname.decode()


# ---- build, cache, fallback ---------------------------------------------------------------------------


@pytest.fixture
def forget_kernel(monkeypatch):
    """No forced path; the loaded library and the quant kernels are forgotten before and after,
    so that other tests see this machine's own choice again."""
    monkeypatch.delenv(cpu4.ENV_PATH, raising=False)
    cpu4.reset()
    quant._kernels.cache_clear()
    yield
    monkeypatch.undo()
    cpu4.reset()
    quant._kernels.cache_clear()


@pytest.fixture
def fresh_kernel(forget_kernel, monkeypatch, tmp_path):
    """As ``forget_kernel``, with an empty kernel cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def needs_compiler():
    if cpu4.find_compiler() is None:
        pytest.skip("no C compiler here")


def test_the_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu4.cache_dir() == tmp_path / "offload" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cpu4.cache_dir() == Path.home() / ".cache" / "offload" / "kernels"


def test_a_second_load_takes_the_cached_library_without_compiling(fresh_kernel, monkeypatch):
    needs_compiler()
    first = cpu4.load_library()
    assert first.built and first.path.parent == cpu4.cache_dir() and first.path.is_file()
    assert first.path == cpu4.library_path(cpu4.cache_dir(), cpu4.find_compiler())
    assert not list(first.path.parent.glob("*.tmp"))  # the build landed by rename

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    cpu4.reset()
    second = cpu4.load_library()
    assert not second.built and second.path == first.path and second.runnable == first.runnable


def test_the_cache_key_follows_the_source_and_the_compiler(tmp_path):
    needs_compiler()
    compiler = cpu4.find_compiler()
    path = cpu4.library_path(tmp_path, compiler)
    assert path.name.startswith("q4-") and path.suffix == ".so"
    assert cpu4.library_path(tmp_path, [*compiler, "-DOTHER"]) != path


def test_a_corrupt_cached_library_is_rebuilt(fresh_kernel):
    needs_compiler()
    directory = cpu4.cache_dir()
    directory.mkdir(parents=True)
    path = cpu4.library_path(directory, cpu4.find_compiler())
    path.write_bytes(b"\x7fELF but not really" * 100)
    library = cpu4.load_library()
    assert library.built and library.path == path
    assert path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 2000
    qm = matrix((64, 128), "nf4")
    x = activations(2, 128, torch.float32)
    y, _ = cpu4.run(x, qm.tensors, (64, 128), library.runnable[0], library=library)
    assert row_errors(y, x.double() @ oracle_weight(qm).double().T).max().item() <= SIMD_BOUND


@pytest.mark.parametrize(
    "cc, words",
    [("/nonexistent/cc", "no C compiler found"), ("false", "failed")],
    ids=["no compiler", "a failing build"],
)
def test_without_a_working_compiler_quant_falls_back_to_torch_and_says_why(fresh_kernel, monkeypatch, cc, words):
    monkeypatch.setenv("CC", cc)
    status = cpu4.status()
    assert status.path == "torch" and words in status.reason and cpu4.runnable_paths() == ()
    kernels = quant.select_kernels("cpu")
    assert kernels.four_bit is quant._linear_4bit_dequantize
    assert words in kernels.description
    qm = matrix((64, 128), "nf4")
    x = activations(3, 128, torch.float32)
    got = quant.linear(x, qm)
    assert row_errors(got, x.double() @ oracle_weight(qm).double().T).max().item() <= 1e-5


def test_offload_cpu_kernel_forces_a_path_and_refuses_nonsense(fresh_kernel, monkeypatch):
    monkeypatch.setenv(cpu4.ENV_PATH, "torch")
    assert cpu4.status().path == "torch" and cpu4.ENV_PATH in cpu4.status().reason
    assert quant.select_kernels("cpu").four_bit is quant._linear_4bit_dequantize
    monkeypatch.setenv(cpu4.ENV_PATH, "sse9")
    cpu4.reset()
    with pytest.raises(SettingError, match=f"{cpu4.ENV_PATH}=sse9: choose one of"):
        cpu4.status()
    monkeypatch.setenv(cpu4.ENV_PATH, "auto")
    cpu4.reset()
    assert cpu4.status().path == (cpu4.runnable_paths() or ("torch",))[0]
    for path in cpu4.PATHS:
        monkeypatch.setenv(cpu4.ENV_PATH, path)
        cpu4.reset()
        if path in cpu4.runnable_paths():
            assert cpu4.status().path == path
        else:  # a path the CPU lacks is refused, never run
            with pytest.raises(SettingError, match=f"{cpu4.ENV_PATH}={path}"):
                cpu4.status()


# ---- the demo model through the kernel ---------------------------------------------------------------


def test_demo_model_with_4bit_experts_runs_portable_4bit_through_the_kernel_with_bounded_kl(forget_kernel, monkeypatch):
    """Engine.load(..., expert_bits=4) on a CPU stores the portable 4-bit format of 4 bits
    (``quant.format_for_bits``: the GPU's bytes, with its tensors), every path this CPU runs
    computes it, the two SIMD paths give the same logits bit for bit, and
    the next-token KL from the fp32 model stays within the bound of tests/test_quant_model.py
    (measured 5.1e-3 on each path and on the dequantize path)."""
    from offload.demo import DEMO_MODEL_DIR
    from offload.engine import Engine, GenerationSettings

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "python-docs-valid.txt").read_text()
    reference = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    ids = reference.tokenizer.encode(text[5000:12000], bos=True)[:256]
    ref = reference.logits(ids).log_softmax(-1)
    paths = cpu4.runnable_paths()
    if not paths:
        pytest.skip("the kernel cannot be built here")
    seen, logits = [], {}
    run = cpu4.run

    def recording(x, tensors, shape, path, **kwargs):
        if "library" not in kwargs:  # not the loader's own self-check
            seen.append((shape, path, tuple(tensors)))
        return run(x, tensors, shape, path, **kwargs)

    monkeypatch.setattr(cpu4, "run", recording)
    for path in paths:
        monkeypatch.setenv(cpu4.ENV_PATH, path)
        cpu4.reset()
        quant._kernels.cache_clear()
        seen.clear()
        engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", expert_bits=4)
        lp = engine.logits(ids).float().log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        assert 0 < kl <= 0.012, (path, kl)
        c = engine.config
        assert {s for s, _, _ in seen} == {(c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)}
        fmt = quant.format_for_bits(4, torch.float32, "cpu")
        assert fmt.kind == "4bit"
        names = {tuple(spec.name for spec in quant.tensor_specs(s, fmt)) for s, _, _ in seen}
        assert {p for _, p, _ in seen} == {path} and {t for _, _, t in seen} == names
        tokens = engine.generate(ids[:12], GenerationSettings(max_new_tokens=8, ignore_eos=True)).run().tokens
        assert len(tokens) == 8
        logits[path] = lp
    if "avx2" in logits and "avx512" in logits:
        assert torch.equal(logits["avx2"], logits["avx512"])


# ---- against the GPU's arithmetic (the bound of --cpu-experts beside a GPU) -----------------------


def gpu_like_ffn(x: torch.Tensor, weights: list[quant.QuantizedMatrix]) -> torch.Tensor:
    """The GPU's arithmetic for one expert, emulated on the CPU: bitsandbytes' CUDA kernel
    dequantizes to bf16 and rounds each product to bf16."""
    w1, w3, w2 = (quant.dequantize(m, torch.bfloat16) for m in weights)
    return torch.nn.functional.linear(torch.nn.functional.silu(x @ w1.T) * (x @ w3.T), w2)  # [N, D] bf16


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_expert_on_the_kernel_agrees_with_the_gpus_arithmetic_within_the_stated_bound(fmt):
    from offload.model import ExpertWeights, expert_ffn

    if not cpu4.runnable_paths():
        pytest.skip("the kernel cannot be built here")
    D, I = 1024, 3584
    generator = torch.Generator().manual_seed(3)
    weights = [quant.quantize((torch.randn(s, generator=generator) * 0.02).bfloat16(), fmt)
               for s in ((I, D), (I, D), (D, I))]
    for n in (1, 4, 16):
        x = torch.randn(n, D, generator=generator).bfloat16()  # [N, D]
        ours = expert_ffn(x, ExpertWeights(*weights))
        theirs = gpu_like_ffn(x, weights)
        error = row_errors(ours.float(), theirs.float())
        assert 0 < error.max() <= cpu4.GPU_EXPERT_AGREEMENT, (n, error.max())


def test_the_demo_models_logits_on_the_kernel_agree_with_the_gpus_arithmetic(forget_kernel, monkeypatch):
    from offload.demo import DEMO_MODEL_DIR
    from offload.engine import Engine

    if not cpu4.runnable_paths():
        pytest.skip("the kernel cannot be built here")
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "python-docs-valid.txt").read_text()
    logits = {}
    for path in ("torch", cpu4.runnable_paths()[0]):  # torch: dequantize to bf16, then a bf16 matmul
        monkeypatch.setenv(cpu4.ENV_PATH, path)
        cpu4.reset()
        quant._kernels.cache_clear()
        engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="bfloat16", expert_bits=4)
        ids = engine.tokenizer.encode(text[5000:12000], bos=True)[:256]
        logits[path] = engine.logits(ids).float()  # [T, vocab]
    want, got = logits.pop("torch"), logits.popitem()[1]
    error = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert 0 < error.max() <= cpu4.GPU_LOGITS_AGREEMENT
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
