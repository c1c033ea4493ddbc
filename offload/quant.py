"""Weight formats: how one [out, in] matrix is stored, sized, dequantized and multiplied.

What it is: the formats by name ("bf16", "fp16", "fp32" plain; "int8" row-wise absmax; "nf4",
"nf4-dq", "fp4", "fp4-dq" 4-bit in blocks of 64, "-dq" with bitsandbytes' double quantization
of the block scales; "nf4-cpu", "fp4-cpu" the same codes in the layout of bitsandbytes' fused
CPU kernel), quantization on the weight's device (int8 in plain torch, bit-identical to
bitsandbytes' own; 4-bit through bitsandbytes), and a fixed tensor layout per (shape, format):
``tensor_specs`` names every tensor a quantized matrix has, with its dtype and shape, without
quantizing anything. So one expert record layout serves every expert, and ``from_tensors``
rebuilds a matrix from views into a record's bytes (``views``) without copying them. ``linear``
computes x @ W.T on the path chosen once per device type (``select_kernels``).

What it is not: the record layout, I/O or caching (offload.experts.record places these tensors
in a record), nor a model: it never sees more than one matrix.

Layout per format (wider elements first, so a tightly packed buffer keeps every view aligned;
the 4-bit state is named as in bitsandbytes' ``QuantState.as_dict``):
  plain      data [Out, In] (bf16 | fp16 | fp32)
  int8       row_absmax [Out] fp32, data [Out, In] int8             w = data * row_absmax / 127
  nf4, fp4   absmax [B] fp32, quant_map [16] fp32, data [(n+1)//2, 1] uint8 (two codes a byte)
  *-dq       quant_map [16] fp32, nested_absmax [ceil(B/256)] fp32, nested_quant_map [256] fp32,
             nested_offset [] fp32, absmax [B] uint8, data [(n+1)//2, 1] uint8
  *-cpu      quant_map [16] fp32, absmax [In/64, Out] bf16, data [Out, In/2] uint8 (rows
             interleaved by 32); needs Out % 32 == 0 and In % 64 == 0
where n = Out * In and B = ceil(n / 64) blocks. Everything else bitsandbytes keeps in a
QuantState (blocksize 64, nested blocksize 256, quant type, shape, nested dtype fp32) follows
from (shape, format), so the small JSON tensor of ``as_dict(packed=True)``, whose length varies
with the printed digits of the offset, is not stored. The quant maps are stored although the
4-bit kernels use built-in tables: 64 + 1024 bytes keep a ``QuantState`` complete.

Compute paths. CUDA: bitsandbytes' ``matmul_4bit`` (fused kernel at small N). CPU: the portable
4-bit formats run offload's own kernel (``offload.kernels.cpu4``: the record's bytes as they are,
AVX-512 VNNI, AVX2 or portable C by what the CPU has, within 1e-3 of the float product) up to
``cpu4.MAX_ROWS`` rows of x, and bitsandbytes' dequantize kernel then torch's matmul above that,
or everywhere when the kernel cannot be built here (``cpu4.status()`` says why; the
description of ``select_kernels("cpu")`` carries it). So one record format serves both devices:
the bytes a GPU's kernel reads are the bytes the CPU computes from. The "-cpu" formats remain
readable: they store the layout of bitsandbytes' fused CPU kernel (AVX-512 bf16 only), which
reads record views directly; their scales are bf16 and that kernel computes in bf16, so their
numbers differ slightly from the portable formats'; where the fused kernel is missing they are
unpacked and dequantized on every call (slow). bitsandbytes' ``Linear4bit`` reaches its fused
kernel by repacking the weight in place on its first call, which a view into a record must not
do. int8 on both devices is weight-only (bitsandbytes' int8 matmul quantizes the activations
too, and on CUDA takes and returns fp16 only).

Shape legend: N = rows of x (tokens), In = in features, Out = out features, B = 4-bit blocks.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from offload.errors import SettingError, TensorShapeError
from offload.kernels import cpu4

BLOCKSIZE = 64  # 4-bit: weights per absmax
NESTED_BLOCKSIZE = 256  # double quantization: absmax values per nested absmax (bitsandbytes' fixed choice)
INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes' int8_vectorwise_dequant writes it
CPU_BLOCK_ROWS = 32  # CPU 4-bit layout: rows interleaved in groups of this many


@dataclass(frozen=True)
class WeightFormat:
    """One way of storing an [out, in] matrix; ``bits`` is the width of one stored weight."""

    name: str
    bits: int
    kind: str  # "plain", "int8", "4bit" (portable layout) or "4bit-cpu" (fused CPU kernel's layout)
    dtype: torch.dtype  # dtype of the data tensor
    quant_type: str | None = None  # "nf4" or "fp4" for 4-bit
    double_quant: bool = False  # 4-bit: absmax stored as 8-bit codes (compress_statistics)

    def tensor_specs(self, shape: tuple[int, int]) -> list[TensorSpec]:
        return tensor_specs(shape, self)

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes of one matrix of this shape, tensors packed back to back."""
        return matrix_bytes(shape, self)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Stored bits per weight, state included (nf4 4.5, nf4-dq about 4.13 at block 64)."""
        return 8 * matrix_bytes(shape, self) / math.prod(shape)


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("bf16", 16, "plain", torch.bfloat16),
        WeightFormat("fp16", 16, "plain", torch.float16),
        WeightFormat("fp32", 32, "plain", torch.float32),
        WeightFormat("int8", 8, "int8", torch.int8),
        WeightFormat("nf4", 4, "4bit", torch.uint8, "nf4"),
        WeightFormat("nf4-dq", 4, "4bit", torch.uint8, "nf4", double_quant=True),
        WeightFormat("fp4", 4, "4bit", torch.uint8, "fp4"),
        WeightFormat("fp4-dq", 4, "4bit", torch.uint8, "fp4", double_quant=True),
        WeightFormat("nf4-cpu", 4, "4bit-cpu", torch.uint8, "nf4"),
        WeightFormat("fp4-cpu", 4, "4bit-cpu", torch.uint8, "fp4"),
    )
}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def get_format(fmt: str | WeightFormat) -> WeightFormat:
    """The format named ``fmt`` (torch dtype names are accepted for the plain ones)."""
    if isinstance(fmt, WeightFormat):
        return fmt
    key = str(fmt).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise SettingError(f"weight format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[key]


# ---- layout -----------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"a weight matrix shape is [out, in] with both at least 1, got {list(shape)}")
    return shape


def tensor_specs(shape: tuple[int, int], fmt: str | WeightFormat) -> list[TensorSpec]:
    """The tensors of an [out, in] matrix in ``fmt``, in storage order; no quantization needed."""
    fmt = get_format(fmt)
    out_f, in_f = _check_shape(shape)
    if fmt.kind == "plain":
        return [TensorSpec("data", fmt.dtype, (out_f, in_f))]
    if fmt.kind == "int8":
        return [TensorSpec("row_absmax", torch.float32, (out_f,)), TensorSpec("data", torch.int8, (out_f, in_f))]
    if fmt.kind == "4bit-cpu":
        if out_f % CPU_BLOCK_ROWS or in_f % BLOCKSIZE:
            raise SettingError(
                f"weight format {fmt.name}: needs out features a multiple of {CPU_BLOCK_ROWS} and in "
                f"features a multiple of {BLOCKSIZE}, got [{out_f}, {in_f}]"
            )
        return [
            TensorSpec("quant_map", torch.float32, (16,)),
            TensorSpec("absmax", torch.bfloat16, (in_f // BLOCKSIZE, out_f)),
            TensorSpec("data", torch.uint8, (out_f, in_f // 2)),
        ]
    n = out_f * in_f
    blocks = -(-n // BLOCKSIZE)
    data = TensorSpec("data", torch.uint8, ((n + 1) // 2, 1))
    quant_map = TensorSpec("quant_map", torch.float32, (16,))
    if not fmt.double_quant:
        return [TensorSpec("absmax", torch.float32, (blocks,)), quant_map, data]
    return [
        quant_map,
        TensorSpec("nested_absmax", torch.float32, (-(-blocks // NESTED_BLOCKSIZE),)),
        TensorSpec("nested_quant_map", torch.float32, (256,)),
        TensorSpec("nested_offset", torch.float32, ()),
        TensorSpec("absmax", torch.uint8, (blocks,)),
        data,
    ]


def matrix_bytes(shape: tuple[int, int], fmt: str | WeightFormat) -> int:
    """Bytes of one matrix: the sum of its tensors, packed back to back."""
    return sum(spec.nbytes for spec in tensor_specs(shape, fmt))


def packed_bytes(shape: tuple[int, int], fmt: str | WeightFormat, alignment: int = 1) -> int:
    """Bytes that ``views`` uses when every tensor starts on an ``alignment`` boundary."""
    end = 0
    for spec in tensor_specs(shape, fmt):
        end = _align_up(end, alignment) + spec.nbytes
    return end


def expert_bytes(fmt: str | WeightFormat, hidden_size: int = 4096, intermediate_size: int = 14336) -> int:
    """Bytes of one SwiGLU expert: w1 and w3 [I, D], w2 [D, I] (defaults: Mixtral-8x7B)."""
    I, D = intermediate_size, hidden_size
    return 2 * matrix_bytes((I, D), fmt) + matrix_bytes((D, I), fmt)


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def views(
    buffer: torch.Tensor, shape: tuple[int, int], fmt: str | WeightFormat, alignment: int = 1
) -> dict[str, torch.Tensor]:
    """Typed views of a matrix's tensors inside ``buffer`` (uint8 [>= packed_bytes]), laid out in
    ``tensor_specs`` order from its start, each on an ``alignment`` boundary. No copies."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 buffer, got {buffer.dtype} {list(buffer.shape)}")
    need = packed_bytes(shape, fmt, alignment)
    if buffer.numel() < need:
        name = get_format(fmt).name
        raise ValueError(f"buffer of {buffer.numel()} bytes is smaller than the {need} bytes of {list(shape)} {name}")
    out, offset = {}, 0
    for spec in tensor_specs(shape, fmt):
        offset = _align_up(offset, alignment)
        raw = buffer[offset : offset + spec.nbytes]  # [nbytes] uint8
        out[spec.name] = raw.view(spec.dtype).view(spec.shape)
        offset += spec.nbytes
    return out


# ---- the quantized matrix ---------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedMatrix:
    """An [out, in] weight in ``fmt``: its tensors, exactly as ``tensor_specs`` lists them."""

    fmt: WeightFormat
    shape: tuple[int, int]
    tensors: Mapping[str, torch.Tensor]

    @property
    def device(self) -> torch.device:
        return self.tensors["data"].device

    @property
    def nbytes(self) -> int:
        return matrix_bytes(self.shape, self.fmt)

    def quant_state(self, dtype: torch.dtype):
        """A bitsandbytes QuantState over these tensors (4-bit only; no copies), whose
        dequantization yields ``dtype``."""
        if self.fmt.kind != "4bit":
            raise ValueError(f"{self.fmt.name} has no bitsandbytes QuantState in the portable layout")
        functional = _bnb()
        t = self.tensors
        state2 = offset = None
        if self.fmt.double_quant:
            state2 = functional.QuantState(
                absmax=t["nested_absmax"],
                code=t["nested_quant_map"],
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
            offset = t["nested_offset"]
        return functional.QuantState(
            absmax=t["absmax"],
            shape=torch.Size(self.shape),
            code=t["quant_map"],
            blocksize=BLOCKSIZE,
            quant_type=self.fmt.quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )


@functools.cache
def _bnb():
    """bitsandbytes.functional, imported on first use (the import takes seconds) with its
    harmless startup line about the optional ``kernels`` package and torch's deprecation
    warnings from that import hidden."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch.compile at its import pulls in deprecated torch.jit code
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
        import bitsandbytes.functional as functional

    return functional


def int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of weight [Out, In] (bf16, fp16 or fp32) on its own device, in plain
    torch: (data [Out, In] int8, row_absmax [Out] fp32), data = round(w * (127 / row_absmax)).

    The arithmetic of bitsandbytes' ``int8_vectorwise_quant`` (its CPU kernel: the weight cast
    to fp32, multiplied by the fp32 reciprocal scale, rounded half to even), so the codes are
    bit-identical to bitsandbytes' on every device; its CUDA kernel is not used because it takes
    fp16 only. An all-zero row, where bitsandbytes divides 0 by 0, gets codes 0.
    """
    if weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"int8_rowwise expects a 2-D bf16, fp16 or fp32 weight, got {weight.dtype} {list(weight.shape)}")
    row_absmax = weight.abs().amax(dim=1).float()  # [Out] fp32 (a max of stored values: exact)
    scale = torch.where(row_absmax > 0, 127.0 / row_absmax, torch.zeros_like(row_absmax))  # [Out] fp32
    if weight.dtype == torch.float32:
        scaled = weight * scale.unsqueeze(1)  # [Out, In] fp32, a new tensor
    else:
        scaled = weight.float().mul_(scale.unsqueeze(1))  # [Out, In] fp32: the cast is the copy
    data = scaled.round_().to(torch.int8)  # [Out, In] int8, in [-127, 127]
    return data, row_absmax


def quantize(weight: torch.Tensor, fmt: str | WeightFormat) -> QuantizedMatrix:
    """weight [out, in] (bf16, fp16 or fp32) -> its representation in ``fmt``, on its device.

    Every format is quantized on the weight's device: int8 by ``int8_rowwise`` (plain torch,
    bit-identical to bitsandbytes' CPU quantizer; its CUDA kernel takes fp16 only, which would
    round bf16 weights first), 4-bit by bitsandbytes' ``quantize_4bit``. So a caller that wants
    the work on a GPU moves the weight there first (``offload.loader`` does, one tensor at a time).
    """
    fmt = get_format(fmt)
    shape = _check_shape(weight.shape)
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize expects a bf16, fp16 or fp32 weight, got {weight.dtype}")
    weight = weight.detach()
    if fmt.kind == "plain":
        data = weight.to(dtype=fmt.dtype, memory_format=torch.contiguous_format, copy=True)  # [Out, In]
        return QuantizedMatrix(fmt, shape, {"data": data})
    if fmt.kind == "int8":
        data, row_absmax = int8_rowwise(weight)  # [Out, In] int8, [Out] fp32
        return QuantizedMatrix(fmt, shape, {"row_absmax": row_absmax, "data": data})
    functional = _bnb()
    specs = tensor_specs(shape, fmt)  # refuses shapes the format cannot hold
    data, state = functional.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=fmt.double_quant,
        quant_type=fmt.quant_type,
        quant_storage=torch.uint8,
    )  # data [(n+1)//2, 1] uint8
    if fmt.kind == "4bit-cpu":
        out_f, in_f = shape
        tensors = {
            "quant_map": state.code,
            "absmax": state.absmax.view(out_f, in_f // BLOCKSIZE).t().to(torch.bfloat16).contiguous(),  # [In/64, Out]
            "data": _to_cpu_layout(data, shape),  # [Out, In/2]
        }
        return QuantizedMatrix(fmt, shape, tensors)
    tensors = {"data": data, "absmax": state.absmax, "quant_map": state.code}
    if fmt.double_quant:
        tensors |= {
            "nested_absmax": state.state2.absmax,
            "nested_quant_map": state.state2.code,
            "nested_offset": state.offset.reshape(()).to(torch.float32),
        }
    return QuantizedMatrix(fmt, shape, {spec.name: tensors[spec.name] for spec in specs})


def to_tensors(qm: QuantizedMatrix) -> dict[str, torch.Tensor]:
    """name -> tensor, in ``tensor_specs`` order (the matrix's own tensors, not copies)."""
    return dict(qm.tensors)


def from_tensors(
    tensors: Mapping[str, torch.Tensor],
    shape: tuple[int, int],
    fmt: str | WeightFormat,
    device: torch.device | str | None = None,
) -> QuantizedMatrix:
    """Rebuild a matrix from its tensors (e.g. ``views`` into a record), checked against
    ``tensor_specs``. Tensors already on ``device`` (default: where ``data`` is) are used as
    they are, without a copy."""
    fmt = get_format(fmt)
    shape = _check_shape(shape)
    specs = tensor_specs(shape, fmt)
    names = {spec.name for spec in specs}
    if set(tensors) != names:
        raise TensorShapeError(
            f"{fmt.name} matrix {list(shape)}: expected tensors {sorted(names)}, got {sorted(tensors)}"
        )
    device = torch.device(device) if device is not None else tensors["data"].device
    out = {}
    for spec in specs:
        t = tensors[spec.name]
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise TensorShapeError(
                f"{fmt.name} matrix {list(shape)}: tensor {spec.name!r} is {str(t.dtype).removeprefix('torch.')} "
                f"{list(t.shape)}, expected {str(spec.dtype).removeprefix('torch.')} {list(spec.shape)}"
            )
        out[spec.name] = t.to(device)  # no-op when already there
    return QuantizedMatrix(fmt, shape, out)


# ---- compute ----------------------------------------------------------------------------------


def dequantize(qm: QuantizedMatrix, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The matrix as a dense [out, in] tensor of ``dtype``, bit-exact with bitsandbytes' own
    dequantization (int8 is dequantized in fp32, then cast). A plain matrix already in ``dtype``
    is returned as it is stored, not copied."""
    t = qm.tensors
    if qm.fmt.kind == "plain":
        return t["data"].to(dtype)  # [Out, In]
    functional = _bnb()
    if qm.fmt.kind == "int8":
        # bitsandbytes' int8_vectorwise_dequant (data * row_absmax * (1/127) in fp32), in place:
        # the same rounding, one [Out, In] fp32 temporary instead of two (2.4x faster).
        w = t["data"].float().mul_(t["row_absmax"].view(-1, 1)).mul_(INT8_SCALE)  # [Out, In] fp32
        return w.to(dtype)
    if qm.fmt.kind == "4bit-cpu":
        data = _from_cpu_layout(t["data"], qm.shape)  # [n/2, 1] portable layout
        absmax = t["absmax"].t().reshape(-1).float()  # [B], row-major blocks
        return torch.ops.bitsandbytes.dequantize_4bit(data, absmax, BLOCKSIZE, qm.fmt.quant_type, list(qm.shape), dtype)
    if t["data"].device.type == "cpu" and qm.shape[1] % BLOCKSIZE:
        return _dequantize_4bit_flat(qm, dtype)
    return functional.dequantize_4bit(t["data"], qm.quant_state(dtype))  # [Out, In]


def _dequantize_4bit_flat(qm: QuantizedMatrix, dtype: torch.dtype) -> torch.Tensor:
    """Portable 4-bit codes -> [Out, In] in plain torch, for matrices whose rows are not whole
    blocks (In % 64 != 0): bitsandbytes 0.50's native CPU dequantize takes block i of row r to
    be r * ceil(In/64) + i there, while its quantizer (and its CUDA and pure-torch dequantizers)
    number blocks over the flattened matrix, so its numbers are wrong for such shapes. The
    arithmetic is its pure-torch one (quant_map[code] * absmax in fp32, then cast to dtype):
    bit-identical to that implementation, and to the native one wherever In % 64 == 0."""
    t = qm.tensors
    out_f, in_f = qm.shape
    n = out_f * in_f
    absmax = t["absmax"]
    if qm.fmt.double_quant:  # bitsandbytes' dequantize_4bit: the 8-bit scales first, then + offset
        absmax = _bnb().dequantize_blockwise(absmax, qm.quant_state(dtype).state2) + t["nested_offset"]
    b = t["data"].reshape(-1)  # [n/2] (rounded up)
    codes = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(-1)  # [2 * ceil(n/2)], high nibble first
    blocks = absmax.numel()
    padded = torch.zeros(blocks * BLOCKSIZE, dtype=torch.float32)  # [B * 64]
    padded[:n] = t["quant_map"][codes[:n].long()]
    w = (padded.view(blocks, BLOCKSIZE) * absmax.float().view(-1, 1)).to(dtype)  # [B, 64]
    return w.reshape(-1)[:n].reshape(out_f, in_f)


def _to_cpu_layout(data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Portable 4-bit codes [n/2, 1] (two consecutive codes a byte, high nibble first) -> the
    layout of bitsandbytes' fused CPU kernel, [Out, In/2]: per group of 32 rows and pair of
    columns, byte i holds (row i//2, column i%2) low and (row 16 + i//2, column i%2) high.
    The same permutation as bitsandbytes.functional._convert_weight_packed_for_cpu."""
    out_f, in_f = shape
    b = data.reshape(-1)  # [n/2]
    codes = torch.stack((b >> 4, b & 0xF), dim=-1)  # [n/2, 2], codes in row-major order
    codes = codes.reshape(out_f // CPU_BLOCK_ROWS, CPU_BLOCK_ROWS, in_f // 2, 2)  # [Out/32, 32, In/2, 2]
    codes = codes.transpose(1, 2).reshape(-1, 2 * CPU_BLOCK_ROWS)  # [Out/32 * In/2, 64]
    packed = (codes[:, CPU_BLOCK_ROWS:] << 4) | codes[:, :CPU_BLOCK_ROWS]  # [Out/32 * In/2, 32]
    return packed.reshape(out_f, in_f // 2)


def _from_cpu_layout(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``_to_cpu_layout``: [Out, In/2] -> portable [n/2, 1]."""
    out_f, in_f = shape
    p = packed.reshape(-1, CPU_BLOCK_ROWS)  # [Out/32 * In/2, 32]
    codes = torch.cat((p & 0xF, p >> 4), dim=-1)  # [Out/32 * In/2, 64]
    codes = codes.reshape(out_f // CPU_BLOCK_ROWS, in_f // 2, CPU_BLOCK_ROWS, 2)  # [Out/32, In/2, 32, 2]
    codes = codes.transpose(1, 2)  # [Out/32, 32, In/2, 2]
    codes = codes.reshape(-1, 2)  # [n/2, 2]
    return ((codes[:, 0] << 4) | codes[:, 1]).reshape(-1, 1)


def _linear_plain(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    return F.linear(x, qm.tensors["data"].to(x.dtype))  # [N, Out]


def _linear_int8_weight_only(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    """x @ (data * row_absmax / 127).T with the scale applied to the [N, Out] result, so the
    [Out, In] weight is only cast, never scaled. Activations stay in x's dtype."""
    t = qm.tensors
    y = F.linear(x, t["data"].to(x.dtype))  # [N, Out], exact integer weights
    scale = t["row_absmax"] * INT8_SCALE  # [Out] fp32
    return (y.float() * scale).to(x.dtype)  # [N, Out]


def _linear_4bit_dequantize(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    return F.linear(x, dequantize(qm, x.dtype))  # [N, Out]


# A matmul of more than one row on a 4-bit weight dequantizes it in slices of rows of at most
# this many bytes in the compute dtype (``linear_4bit_in_slices``): Mixtral's 14336 x 4096 expert
# matrix in four slices of 4096 rows, 32 MiB at a time instead of 112 MiB, which the runtime
# reserve counts.
DEQUANTIZE_SLICE_BYTES = 32 * 2**20


def slice_rows_step(shape: tuple[int, int], fmt: WeightFormat) -> int:
    """The fewest rows a slice of a portable 4-bit matrix may start at multiples of: rows whose
    weights fill whole blocks of 64 (and, double-quantized, whole nested blocks of 256 blocks),
    so a slice's scales are a run of the whole's."""
    unit = BLOCKSIZE * (NESTED_BLOCKSIZE if fmt.double_quant else 1)
    return unit // math.gcd(unit, shape[1])


def slice_rows(qm: QuantizedMatrix, first: int, end: int) -> QuantizedMatrix:
    """Rows first .. end-1 of a portable 4-bit matrix as a matrix of its own: views of the codes
    and scales, no copies. ``first`` must be a multiple of ``slice_rows_step`` (and so must
    ``end``, unless it is the last row)."""
    out_f, in_f = qm.shape
    step = slice_rows_step(qm.shape, qm.fmt)
    if qm.fmt.kind != "4bit" or first % step or (end % step and end != out_f) or not 0 <= first < end <= out_f:
        raise ValueError(f"rows {first}..{end} of a {qm.fmt.name} {list(qm.shape)} matrix: not a slice of whole blocks")
    t = qm.tensors
    lo, hi = first * in_f, end * in_f  # weights
    b_lo, b_hi = lo // BLOCKSIZE, -(-hi // BLOCKSIZE)  # blocks
    tensors = dict(t, data=t["data"][lo // 2 : (hi + 1) // 2], absmax=t["absmax"][b_lo:b_hi])
    if qm.fmt.double_quant:
        tensors["nested_absmax"] = t["nested_absmax"][b_lo // NESTED_BLOCKSIZE : -(-b_hi // NESTED_BLOCKSIZE)]
    return QuantizedMatrix(qm.fmt, (end - first, in_f), tensors)


def _slice_rows_count(shape: tuple[int, int], fmt: WeightFormat, itemsize: int, slice_bytes: int) -> int:
    step = slice_rows_step(shape, fmt)
    return min(shape[0], max(step, slice_bytes // (shape[1] * itemsize) // step * step))


def dequantized_slice_bytes(shape: tuple[int, int], fmt: str | WeightFormat, dtype: torch.dtype,
                            slice_bytes: int = DEQUANTIZE_SLICE_BYTES) -> int:
    """Bytes of the largest slice ``linear_4bit_in_slices`` dequantizes of an [out, in] matrix."""
    fmt, itemsize = get_format(fmt), dtype.itemsize
    return _slice_rows_count(shape, fmt, itemsize, slice_bytes) * shape[1] * itemsize


def linear_4bit_in_slices(x: torch.Tensor, qm: QuantizedMatrix, slice_bytes: int = DEQUANTIZE_SLICE_BYTES) -> torch.Tensor:
    """x [N, In] @ W.T for a portable 4-bit W, dequantized a slice of rows at a time (at most
    ``slice_bytes`` in x's dtype, whole blocks each): [N, Out] in x's dtype. Every weight is
    dequantized exactly as ``dequantize`` makes it; only the matmul is split by output columns."""
    out_f, in_f = qm.shape
    rows = _slice_rows_count(qm.shape, qm.fmt, x.element_size(), slice_bytes)
    if rows >= out_f:
        return F.linear(x, dequantize(qm, x.dtype))  # [N, Out]
    out = x.new_empty(*x.shape[:-1], out_f)  # [N, Out]
    for first in range(0, out_f, rows):
        end = min(out_f, first + rows)
        out[..., first:end] = F.linear(x, dequantize(slice_rows(qm, first, end), x.dtype))  # [N, rows]
    return out


def _rows(x: torch.Tensor) -> int:
    """Rows of x [..., In]: the tokens a matmul runs."""
    return x.numel() // max(1, x.shape[-1])


def _linear_4bit_bnb(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    """bitsandbytes' matmul_4bit at one row of x (its fused kernel, no dequantized weight);
    more rows (a prompt chunk): dequantize + matmul a slice of rows at a time
    (``linear_4bit_in_slices``), so no whole matrix in the compute dtype is ever made."""
    import bitsandbytes

    if _rows(x) > 1:
        return linear_4bit_in_slices(x, qm)  # [N, Out]
    return bitsandbytes.matmul_4bit(x, qm.tensors["data"].t(), quant_state=qm.quant_state(x.dtype))  # [N, Out]


def _linear_4bit_cpu_fused(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    """bitsandbytes' fused CPU kernel (AVX-512 bf16) straight on the CPU-layout tensors. It
    computes in bf16: x is rounded to bf16 first, the result cast back to x's dtype."""
    t = qm.tensors
    shape = list(qm.shape)
    return torch.ops.bitsandbytes.gemv_4bit(x, t["data"], shape, t["absmax"], t["quant_map"], BLOCKSIZE)  # [N, Out]


def _linear_4bit_kernel(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    """offload's CPU 4-bit kernel on the portable layout, up to ``cpu4.MAX_ROWS`` rows of x (and
    without autograd); dequantize + matmul otherwise."""
    rows = _rows(x)
    if rows > cpu4.MAX_ROWS or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return _linear_4bit_dequantize(x, qm)
    y = cpu4.linear(x.reshape(rows, x.shape[-1]), qm.tensors, qm.shape)  # [rows, Out] in x's dtype
    return y.reshape(*x.shape[:-1], qm.shape[0])  # [N, Out]


@dataclass(frozen=True)
class Kernels:
    """The functions ``linear`` uses on one device type, chosen once."""

    device_type: str
    int8: Callable[[torch.Tensor, QuantizedMatrix], torch.Tensor]
    four_bit: Callable[[torch.Tensor, QuantizedMatrix], torch.Tensor]  # portable 4-bit layout
    four_bit_cpu: Callable[[torch.Tensor, QuantizedMatrix], torch.Tensor]  # "nf4-cpu", "fp4-cpu"
    description: str


def _fused_cpu_kernel_works() -> bool:
    """Whether bitsandbytes' fused CPU 4-bit kernel is registered here and reads the layout that
    ``_to_cpu_layout`` writes: one tiny product against the dequantize path. Without AVX-512
    bf16 the op name falls through to a generic kernel that expects the portable layout, which
    would give wrong numbers silently; the probe turns that into a fallback instead."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=generator)  # [Out, In]
    x = torch.randn(2, 128, generator=generator).to(torch.bfloat16)  # [N, In]
    qm = quantize(w, "nf4-cpu")
    try:
        with torch.inference_mode():
            got = _linear_4bit_cpu_fused(x, qm).float()  # [N, Out]
    except Exception:  # a missing or refusing kernel means: use the fallback
        return False
    want = x.float() @ dequantize(qm, torch.float32).T  # [N, Out]
    return bool((got - want).norm() <= 1e-2 * want.norm())


@functools.cache
def _kernels(device_type: str) -> Kernels:
    _bnb()
    if device_type == "cuda":
        return Kernels(
            "cuda",
            int8=_linear_int8_weight_only,
            four_bit=_linear_4bit_bnb,
            four_bit_cpu=_linear_4bit_dequantize,
            description="int8: weight-only (cast, matmul, scale rows); 4-bit: bitsandbytes matmul_4bit; "
            "CPU-layout 4-bit: unpack, dequantize, matmul (slow: that layout is for CPU compute)",
        )
    fused = _fused_cpu_kernel_works()
    cpu_layout = "bitsandbytes' fused AVX-512 bf16 kernel" if fused else "unpack, dequantize, matmul"
    kernel = cpu4.status() if device_type == "cpu" else None  # SettingError for a bad OFFLOAD_CPU_KERNEL
    on_kernel = kernel is not None and kernel.path != "torch"
    if on_kernel:
        four_bit = f"{kernel.describe()} up to {cpu4.MAX_ROWS} rows of x, dequantize + matmul above"
    else:
        four_bit = kernel.describe() if kernel is not None else "dequantize, then matmul"
    return Kernels(
        device_type,
        int8=_linear_int8_weight_only,
        four_bit=_linear_4bit_kernel if on_kernel else _linear_4bit_dequantize,
        four_bit_cpu=_linear_4bit_cpu_fused if fused else _linear_4bit_dequantize,
        description=f"int8: weight-only (cast, matmul, scale rows); 4-bit: {four_bit}; "
        f"CPU-layout 4-bit: {cpu_layout}",
    )


def select_kernels(device: torch.device | str) -> Kernels:
    """The compute path for ``device``'s type (cached: chosen once per device type)."""
    return _kernels(torch.device(device).type)


def linear(x: torch.Tensor, qm: QuantizedMatrix, kernels: Kernels | None = None) -> torch.Tensor:
    """x [N, In] (bf16, fp16 or fp32) @ W.T -> [N, Out] in x's dtype, for every format."""
    kind = qm.fmt.kind
    if kind == "plain":
        return _linear_plain(x, qm)
    kernels = kernels or _kernels(x.device.type)
    if kind == "int8":
        return kernels.int8(x, qm)
    return kernels.four_bit(x, qm) if kind == "4bit" else kernels.four_bit_cpu(x, qm)


BITS_CHOICES = (4, 8, 16)
FOUR_BIT = "nf4-dq"  # the format of 4 bits (``format_for_bits``)


def format_for_bits(
    bits: int,
    compute_dtype: torch.dtype,
    device_type: str,
    shapes: tuple[tuple[int, int], ...] = (),
    setting: str = "bits",
) -> WeightFormat:
    """The format behind ``--expert-bits`` / ``--attn-bits``: 16 is unquantized in the compute
    dtype, 8 is int8, 4 is ``FOUR_BIT``, the portable double-quantized nf4 ("nf4-dq", 4.13 bits
    a weight at block 64; bitsandbytes' own default for ``Linear4bit``) on every device: the
    layout the CUDA kernels read is the one offload's CPU kernel reads (``offload.kernels.cpu4``),
    so one record format serves both. Against plain nf4 (4.5 bits) a Mixtral-8x7B expert is
    86.7 MiB instead of 94.5: 8% more slots on a card and 8% fewer bytes a miss, at the same
    perplexity as nf4 on the demo model (benchmarks/demo_quality.py). ("nf4" and
    "nf4-cpu", the layout of bitsandbytes' fused CPU kernel, stay available by name.)
    ``device_type`` and ``shapes`` are kept for callers; no choice depends on them now."""
    if bits == 16:
        return get_format(str(compute_dtype).removeprefix("torch."))
    if bits == 8:
        return FORMATS["int8"]
    if bits == 4:
        return FORMATS[FOUR_BIT]
    raise SettingError(f"{setting} {bits}: choose one of {', '.join(map(str, BITS_CHOICES))}")
