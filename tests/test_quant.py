"""Weight formats: quantization error within stated bounds, a layout fixed by (shape, format)
and computable without quantizing, bit-exact round trips through a byte buffer of views, and
``linear`` equal to a matmul with the dequantized weight."""

from __future__ import annotations

import logging
import subprocess
import sys

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its harmless line about `kernels`

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import quant
from offload.errors import SettingError, TensorShapeError

PORTABLE = ["bf16", "fp16", "fp32", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq"]
CPU_LAYOUT = ["nf4-cpu", "fp4-cpu"]
ALL = PORTABLE + CPU_LAYOUT

# Upper bounds on ||W - deq(q(W))|| / ||W|| for a Gaussian weight. Measured: nf4 0.092,
# fp4 0.122, int8 0.0075 (0.0087 on a Mixtral-sized matrix), bf16 0.0022; double quantization
# and the CPU layout's bf16 scales add less than 0.001.
ERROR_BOUND = {
    "fp32": 0.0,
    "fp16": 0.001,
    "bf16": 0.005,
    "int8": 0.01,
    "nf4": 0.10,
    "nf4-dq": 0.10,
    "nf4-cpu": 0.10,
    "fp4": 0.13,
    "fp4-dq": 0.13,
    "fp4-cpu": 0.13,
}

# ||linear(x, q) - x @ dequantize(q).T|| / ||x @ dequantize(q).T||. fp32 is exact up to
# summation order; bf16 allows one bf16 rounding of the weight or the result (eps 2^-8). The
# CPU layout's fused kernel computes in bf16 whatever x's dtype; offload's CPU 4-bit kernel
# (portable 4-bit formats on a CPU) rounds x to 16 bits and the codes' table to 13 bits
# (measured 1.3e-4; tests/test_cpu_kernel.py holds its own tests).
LINEAR_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CPU_LAYOUT_TOLERANCE = 1e-2
CPU_KERNEL_TOLERANCE = 1e-3

MIXTRAL_I, MIXTRAL_D = 14336, 4096


def gaussian(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def round_trip(qm: quant.QuantizedMatrix, alignment: int = 1) -> tuple[quant.QuantizedMatrix, torch.Tensor]:
    """Write qm's tensors into one uint8 buffer, rebuild from views of it: (rebuilt, buffer)."""
    buffer = torch.full((quant.packed_bytes(qm.shape, qm.fmt, alignment),), 0xAB, dtype=torch.uint8)
    views = quant.views(buffer, qm.shape, qm.fmt, alignment)
    for name, tensor in quant.to_tensors(qm).items():
        views[name].copy_(tensor)
    return quant.from_tensors(views, qm.shape, qm.fmt, device="cpu"), buffer


# ---- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nf3", "int4", "", "bf16-dq"])
def test_unknown_format_is_a_setting_error_naming_it(name):
    with pytest.raises(SettingError, match=f"weight format {name!r}"):
        quant.get_format(name)
    with pytest.raises(SettingError):
        quant.tensor_specs((64, 64), name)


def test_formats_by_name():
    assert list(quant.FORMATS) == ALL
    assert {name: quant.get_format(name).bits for name in ALL} == {
        "bf16": 16, "fp16": 16, "fp32": 32, "int8": 8,
        "nf4": 4, "nf4-dq": 4, "fp4": 4, "fp4-dq": 4, "nf4-cpu": 4, "fp4-cpu": 4,
    }  # fmt: skip
    assert quant.get_format("bfloat16") is quant.get_format("bf16")  # torch's names as aliases
    assert quant.get_format(" NF4-DQ ").double_quant


def test_importing_the_module_leaves_bitsandbytes_unimported():
    code = "import sys, offload.quant; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- quantization error -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relative_error_within_bound(name, dtype):
    w = gaussian((1024, 512), dtype)
    qm = quant.quantize(w, name)
    assert relative_error(quant.dequantize(qm, torch.float32), w) <= ERROR_BOUND[name]


def test_int8_all_zero_row_dequantizes_to_zero():
    w = gaussian((8, 64))
    w[3] = 0
    back = quant.dequantize(quant.quantize(w, "int8"), torch.float32)
    assert torch.equal(back[3], torch.zeros(64))
    assert torch.isfinite(back).all()


def int8_matrix(dtype: torch.dtype) -> torch.Tensor:
    """[12, 96] rows that exercise the int8 quantizer: Gaussian, all zero, one nonzero weight,
    negative extremes, exact halves after scaling (ties), the dtype's largest value, tiny ones."""
    w = gaussian((12, 96), torch.float32, seed=3) * 50
    w[1] = 0
    w[2] = 0
    w[2, 17] = -3.0
    w[3, :5] = torch.tensor([254.0, 1.0, 3.0, 5.0, -7.0])  # scale 1/2: ties at 0.5, 1.5, 2.5, -3.5
    w[3, 5:] = 0
    w[4] = -w[4].abs()  # every weight negative
    w[5, 0] = torch.finfo(dtype).max if dtype != torch.float32 else 3e38
    w[6] = torch.linspace(-1e-3, 1e-3, 96)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_rowwise_is_bit_identical_to_bitsandbytes(dtype):
    """Plain torch on any device, against bitsandbytes' own int8_vectorwise_quant on the CPU."""
    w = int8_matrix(dtype)
    data, row_absmax = quant.int8_rowwise(w)
    theirs, their_absmax, outliers = quant._bnb().int8_vectorwise_quant(w.clone())
    assert outliers is None
    assert data.dtype == torch.int8 and row_absmax.dtype == torch.float32
    assert torch.equal(row_absmax, their_absmax)
    nonzero = their_absmax != 0  # bitsandbytes divides 0 by 0 on all-zero rows; ours are 0 there
    assert torch.equal(data[nonzero], theirs[nonzero])
    assert torch.equal(data[~nonzero], torch.zeros_like(data[~nonzero])) and (~nonzero).sum() == 1
    assert data[3, :5].tolist() == [127, 0, 2, 2, -4]  # round half to even, as torch.round
    assert not torch.equal(w, torch.zeros_like(w))  # the input is left as it was
    assert torch.equal(w, int8_matrix(dtype))


def test_int8_rowwise_on_a_mixtral_sized_matrix_is_bitsandbytes():
    w = gaussian((4096, 1024), torch.bfloat16, seed=4)
    data, row_absmax = quant.int8_rowwise(w)
    theirs, their_absmax, _ = quant._bnb().int8_vectorwise_quant(w)
    assert torch.equal(data, theirs) and torch.equal(row_absmax, their_absmax)
    assert torch.equal(quant.quantize(w, "int8").tensors["data"], theirs)


def test_int8_rowwise_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="2-D bf16, fp16 or fp32"):
        quant.int8_rowwise(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quant.int8_rowwise(torch.zeros(4))


# ---- layout -----------------------------------------------------------------------------------


def produced(qm: quant.QuantizedMatrix) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, t.dtype, tuple(t.shape)) for name, t in quant.to_tensors(qm).items()]


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(ALL),
    out_f=st.integers(1, 300),
    in_blocks=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_tensor_specs_match_what_quantization_produces(name, out_f, in_blocks, dtype):
    if name in CPU_LAYOUT:
        out_f = -(-out_f // 32) * 32  # the CPU layout interleaves rows by 32
    shape = (out_f, 64 * in_blocks)
    qm = quant.quantize(gaussian(shape, dtype, seed=out_f), name)
    assert produced(qm) == [tuple(spec) for spec in quant.tensor_specs(shape, name)]
    assert sum(t.numel() * t.element_size() for t in qm.tensors.values()) == quant.matrix_bytes(shape, name)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_4bit_tensors_are_bitsandbytes_own(name):
    """The stored tensors are exactly bitsandbytes' QuantState tensors, less the packed JSON."""
    functional = quant._bnb()
    fmt = quant.get_format(name)
    w = gaussian((300, 256), torch.bfloat16)
    q, state = functional.quantize_4bit(
        w, blocksize=64, compress_statistics=fmt.double_quant, quant_type=fmt.quant_type
    )
    theirs = {k: v for k, v in state.as_dict(packed=True).items() if not k.startswith("quant_state.")}
    ours = quant.to_tensors(quant.quantize(w, name))
    assert torch.equal(ours.pop("data"), q)
    if fmt.double_quant:
        assert torch.equal(ours.pop("nested_offset"), state.offset)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_cpu_layout_is_bitsandbytes_repacked_layout(name):
    """The "-cpu" formats hold what bitsandbytes' own repack for its fused CPU kernel writes."""
    functional = quant._bnb()
    w = gaussian((96, 320), torch.bfloat16)
    portable = quant.quantize(w, name)
    data, state = functional._convert_weight_packed_for_cpu(
        portable.tensors["data"].clone(), portable.quant_state(torch.bfloat16)
    )
    cpu = quant.quantize(w, f"{name}-cpu")
    assert torch.equal(cpu.tensors["data"], data)
    assert torch.equal(cpu.tensors["absmax"], state.absmax)
    assert torch.equal(quant._from_cpu_layout(cpu.tensors["data"], (96, 320)), portable.tensors["data"])


def test_cpu_layout_refuses_shapes_it_cannot_hold():
    with pytest.raises(SettingError, match=r"nf4-cpu.*\[100, 64\]"):
        quant.tensor_specs((100, 64), "nf4-cpu")
    with pytest.raises(SettingError, match=r"fp4-cpu.*\[64, 96\]"):
        quant.quantize(gaussian((64, 96)), "fp4-cpu")


def test_sizes_of_mixtral_8x7b():
    """bitsandbytes' own byte counts (FACTS.md) without the packed JSON tensor, which is not stored."""
    matrix = (MIXTRAL_I, MIXTRAL_D)
    assert quant.matrix_bytes(matrix, "nf4") == 29_360_128 + 3_670_080
    assert quant.matrix_bytes(matrix, "nf4-dq") == 30_293_060
    assert quant.matrix_bytes(matrix, "fp4-dq") == 30_293_060
    assert quant.matrix_bytes(matrix, "int8") == MIXTRAL_I * MIXTRAL_D + 4 * MIXTRAL_I
    assert quant.matrix_bytes(matrix, "nf4-cpu") == 29_360_128 + 2 * MIXTRAL_I * MIXTRAL_D // 64 + 64
    assert quant.expert_bytes("bf16") == 3 * 2 * MIXTRAL_I * MIXTRAL_D == 336 * 2**20
    assert quant.expert_bytes("fp32") == 2 * quant.expert_bytes("bf16")
    assert quant.expert_bytes("nf4") == quant.expert_bytes("fp4") == 99_090_624
    assert quant.expert_bytes("nf4-dq") == quant.expert_bytes("fp4-dq") == 90_879_180
    assert quant.expert_bytes("int8") == 176_291_840  # 168.1 MiB
    assert quant.expert_bytes("nf4-cpu") == 93_585_600  # 89.3 MiB


@pytest.mark.slow
def test_a_mixtral_sized_matrix_as_bitsandbytes_quantizes_it():
    """One real 14336x4096 quantization per kind (~5 s): sizes and error as on small matrices."""
    shape = (MIXTRAL_I, MIXTRAL_D)
    w = gaussian(shape, torch.bfloat16)
    for name in ("nf4", "nf4-dq", "int8"):
        qm = quant.quantize(w, name)
        assert produced(qm) == [tuple(spec) for spec in quant.tensor_specs(shape, name)]
        assert sum(t.numel() * t.element_size() for t in qm.tensors.values()) == quant.matrix_bytes(shape, name)
        assert relative_error(quant.dequantize(qm, torch.float32), w) <= ERROR_BOUND[name]


# ---- round trip through bytes -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("alignment", [1, 64])
def test_round_trip_through_a_byte_buffer_is_bit_exact(name, alignment):
    shape = (96, 192)
    qm = quant.quantize(gaussian(shape, torch.bfloat16), name)
    rebuilt, buffer = round_trip(qm, alignment)
    if alignment == 1:
        assert buffer.numel() == sum(spec.nbytes for spec in quant.tensor_specs(shape, name))
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for t in rebuilt.tensors.values():  # views into the buffer, not copies
        assert lo <= t.data_ptr() < hi
        assert (t.data_ptr() - lo) % alignment == 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(quant.dequantize(rebuilt, dtype), quant.dequantize(qm, dtype))


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_round_trip_equals_bitsandbytes_dequantizing_the_original(name):
    functional = quant._bnb()
    fmt = quant.get_format(name)
    w = gaussian((128, 256), torch.bfloat16)
    q, state = functional.quantize_4bit(
        w, blocksize=64, compress_statistics=fmt.double_quant, quant_type=fmt.quant_type
    )
    rebuilt, _ = round_trip(quant.quantize(w, name))
    assert torch.equal(quant.dequantize(rebuilt, torch.bfloat16), functional.dequantize_4bit(q, state))


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
@pytest.mark.parametrize("shape", [(256, 160), (64, 96), (3, 1000), (7, 33)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rows_that_are_not_whole_blocks_dequantize_by_bitsandbytes_own_block_numbering(name, shape, dtype):
    """bitsandbytes numbers 4-bit blocks over the flattened matrix (its quantizer, its CUDA and
    pure-torch dequantizers); its native CPU dequantizer (0.50) numbers them by row, which
    differs when In % 64 != 0 (the demo model's w2 [256, 160]). quant.dequantize gives the
    flattened numbering's values: bitsandbytes' own, handed the matrix as one row."""
    qm = quant.quantize(gaussian(shape, seed=2), name)
    state = qm.quant_state(dtype)
    state.shape = torch.Size((1, shape[0] * shape[1]))
    want = quant._bnb().dequantize_4bit(qm.tensors["data"], state).reshape(shape)
    got = quant.dequantize(qm, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    w = gaussian(shape, seed=2)
    assert relative_error(got, w) <= ERROR_BOUND[name]


def test_int8_dequantize_is_bitsandbytes_own():
    qm = quant.quantize(gaussian((300, 256)), "int8")
    theirs = quant._bnb().int8_vectorwise_dequant(qm.tensors["data"], qm.tensors["row_absmax"])
    assert torch.equal(quant.dequantize(qm, torch.float32), theirs)


def test_from_tensors_refuses_a_wrong_tensor_naming_it():
    shape = (64, 128)
    tensors = quant.to_tensors(quant.quantize(gaussian(shape), "nf4-dq"))
    bad = dict(tensors, absmax=tensors["absmax"].float())
    with pytest.raises(TensorShapeError, match=r"'absmax' is float32 \[128\], expected uint8 \[128\]"):
        quant.from_tensors(bad, shape, "nf4-dq")
    with pytest.raises(TensorShapeError, match="nested_offset"):
        quant.from_tensors({k: v for k, v in tensors.items() if k != "nested_offset"}, shape, "nf4-dq")
    with pytest.raises(TensorShapeError, match=r"nf4-dq matrix \[64, 192\]: tensor 'absmax'"):
        quant.from_tensors(tensors, (64, 192), "nf4-dq")


def test_views_refuse_a_short_buffer():
    with pytest.raises(ValueError, match="smaller than"):
        quant.views(torch.empty(100, dtype=torch.uint8), (64, 64), "int8")


# ---- compute ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 5])
def test_linear_equals_matmul_with_the_dequantized_weight(name, dtype, n):
    shape = (160, 256)
    qm, _ = round_trip(quant.quantize(gaussian(shape), name))  # from record views, as in use
    x = gaussian((n, shape[1]), dtype, seed=1)  # [N, In]
    with torch.inference_mode():
        got = quant.linear(x, qm)  # [N, Out]
    want = x @ quant.dequantize(qm, dtype).T  # [N, Out]
    assert got.shape == (n, shape[0]) and got.dtype == dtype
    tolerance = CPU_LAYOUT_TOLERANCE if name in CPU_LAYOUT else LINEAR_TOLERANCE[dtype]
    if quant.get_format(name).kind == "4bit" and quant.select_kernels("cpu").four_bit is quant._linear_4bit_kernel:
        tolerance = max(tolerance, CPU_KERNEL_TOLERANCE)
    assert relative_error(got, want) <= tolerance


def test_kernels_are_chosen_once_per_device_type():
    from offload.kernels import cpu4

    assert quant.select_kernels("cpu") is quant.select_kernels(torch.device("cpu"))
    kernels = quant.select_kernels("cpu")
    # the portable 4-bit layout runs offload's CPU kernel wherever it was built, else the torch path
    on_kernel = cpu4.status().path != "torch"
    assert kernels.four_bit is (quant._linear_4bit_kernel if on_kernel else quant._linear_4bit_dequantize)
    assert cpu4.status().path in kernels.description or not on_kernel
    if quant._bnb().has_avx512bf16():
        assert kernels.four_bit_cpu is quant._linear_4bit_cpu_fused


# ---- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 5, 64])
def test_linear_on_cuda_equals_matmul_with_the_dequantized_weight(name, dtype, n):
    shape = (160, 256)
    host, _ = round_trip(quant.quantize(gaussian(shape), name))
    qm = quant.from_tensors(
        {k: v.cuda() for k, v in quant.to_tensors(host).items()}, shape, name, device="cuda"
    )
    x = gaussian((n, shape[1]), dtype, seed=1).cuda()  # [N, In]
    with torch.inference_mode():
        got = quant.linear(x, qm)  # [N, Out]
    want = x @ quant.dequantize(qm, dtype).T  # [N, Out]
    assert torch.equal(quant.dequantize(qm, torch.float32).cpu(), quant.dequantize(host, torch.float32))
    assert got.shape == (n, shape[0]) and got.dtype == dtype
    assert relative_error(got, want) <= LINEAR_TOLERANCE[dtype] * 10


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_on_cuda_is_bit_identical_to_the_cpu(dtype):
    """bitsandbytes' CUDA int8 kernel takes fp16 only; ours quantizes bf16 weights on the GPU as
    bitsandbytes' CPU kernel does."""
    w = int8_matrix(dtype)
    on_gpu = quant.quantize(w.cuda(), "int8")
    assert on_gpu.device.type == "cuda"
    theirs, their_absmax, _ = quant._bnb().int8_vectorwise_quant(w.clone())
    nonzero = their_absmax != 0
    assert torch.equal(on_gpu.tensors["row_absmax"].cpu(), their_absmax)
    assert torch.equal(on_gpu.tensors["data"].cpu()[nonzero], theirs[nonzero])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "nf4-cpu"])
def test_4bit_quantized_on_cuda_matches_the_cpu(name):
    """The same weight quantized on the GPU and on the CPU: the same block scales, and codes
    equal but for weights on a bin's edge, where the two kernels may round apart."""
    w = gaussian((512, 1024), torch.bfloat16, seed=5)
    gpu = quant.quantize(w.cuda(), name)
    cpu = quant.quantize(w, name)
    assert gpu.device.type == "cuda"
    for key, t in cpu.tensors.items():
        if key == "data":
            continue
        if key == "absmax" and name == "nf4-dq":  # 8-bit codes of the scales: a code on a bin's edge may differ
            assert (gpu.tensors[key].cpu().int() - t.int()).abs().max() <= 1, key
            assert (gpu.tensors[key].cpu() == t).float().mean().item() >= 0.99, key
        elif key == "nested_offset":  # a mean of the scales, summed in another order
            assert torch.allclose(gpu.tensors[key].cpu(), t, rtol=1e-5, atol=0), key
        else:
            assert torch.allclose(gpu.tensors[key].cpu().float(), t.float(), rtol=1e-6, atol=0), key
    same = (gpu.tensors["data"].cpu() == cpu.tensors["data"]).float().mean().item()
    assert same >= 0.999
    error = relative_error(quant.dequantize(gpu, torch.float32).cpu(), quant.dequantize(cpu, torch.float32))
    assert error <= 1e-2
