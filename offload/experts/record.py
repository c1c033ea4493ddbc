"""The expert record: one expert's matrices packed into one contiguous byte range.

What it is: the layout shared by every tier (device slots, host RAM, the pack file) so that a
move is one read and one copy: w1 [I, D], then w3 [I, D], then w2 [D, I], each in the record's
weight format (``offload.quant``: plain bf16/fp16/fp32, int8, or 4-bit with its quantization
state), each matrix and each of its tensors starting on a 64-byte boundary; records in a file
start on 4 KiB boundaries (``RECORD_ALIGNMENT``). It turns a record's bytes into
``ExpertWeights`` views without copying: plain tensors for plain formats, ``QuantizedMatrix``
objects over views otherwise. What it is not: I/O or caching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload import quant
from offload.config import ModelConfig
from offload.model import ExpertWeights

RECORD_ALIGNMENT = 4096  # records in the experts file start on this boundary
MATRIX_ALIGNMENT = 64  # matrices, and the tensors inside them, start on this boundary

MATRICES = ("w1", "w3", "w2")


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class MatrixSlot:
    name: str
    offset: int  # bytes from the record start
    shape: tuple[int, int]
    nbytes: int  # the matrix's tensors, each 64-byte aligned


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one expert record for a model shape and weight format."""

    fmt: quant.WeightFormat
    matrices: tuple[MatrixSlot, ...]
    nbytes: int  # bytes of one record, without the file's padding

    @classmethod
    def for_config(cls, config: ModelConfig, fmt: quant.WeightFormat | str | torch.dtype) -> RecordLayout:
        if isinstance(fmt, torch.dtype):
            fmt = str(fmt).removeprefix("torch.")
        fmt = quant.get_format(fmt)
        I, D = config.intermediate_size, config.hidden_size
        shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
        slots, offset = [], 0
        for name in MATRICES:
            nbytes = quant.packed_bytes(shapes[name], fmt, MATRIX_ALIGNMENT)
            slots.append(MatrixSlot(name, offset, shapes[name], nbytes))
            offset = align_up(offset + nbytes, MATRIX_ALIGNMENT)
        return cls(fmt, tuple(slots), offset)

    @property
    def plain(self) -> bool:
        """Whether matrices are stored as plain tensors (no quantization state)."""
        return self.fmt.kind == "plain"

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of a plain format (the data dtype otherwise)."""
        return self.fmt.dtype

    @property
    def stride(self) -> int:
        """Distance between consecutive records in the experts file."""
        return align_up(self.nbytes, RECORD_ALIGNMENT)

    def _tensors(self, record: torch.Tensor, slot: MatrixSlot) -> dict[str, torch.Tensor]:
        raw = record[slot.offset : slot.offset + slot.nbytes]  # [nbytes] uint8
        return quant.views(raw, slot.shape, self.fmt, MATRIX_ALIGNMENT)

    def views(self, record: torch.Tensor) -> ExpertWeights:
        """The expert inside ``record`` (uint8, at least ``nbytes``), as views: w1 [I, D],
        w3 [I, D], w2 [D, I]; tensors for plain formats, QuantizedMatrix otherwise."""
        parts = []
        for slot in self.matrices:
            tensors = self._tensors(record, slot)
            parts.append(tensors["data"] if self.plain else quant.QuantizedMatrix(self.fmt, slot.shape, tensors))
        return ExpertWeights(*parts)

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> torch.Tensor:
        """Write w1, w3, w2 (float tensors in any dtype) into ``out`` (uint8 [nbytes]), cast or
        quantized to the record's format."""
        for slot in self.matrices:
            weight = getattr(weights, slot.name)
            targets = self._tensors(out, slot)
            if self.plain:
                targets["data"].copy_(weight)
                continue
            quantized = quant.quantize(weight, self.fmt)
            for name, tensor in quant.to_tensors(quantized).items():
                targets[name].copy_(tensor)
        return out

    def to_dict(self) -> dict:
        return {
            "format": self.fmt.name,
            "nbytes": self.nbytes,
            "stride": self.stride,
            "matrices": [
                {"name": m.name, "offset": m.offset, "shape": list(m.shape), "nbytes": m.nbytes}
                for m in self.matrices
            ],
        }
