"""The expert record: one expert's matrices packed into one contiguous byte range.

What it is: the layout shared by every tier (device slots, host RAM, the pack file) so that a
move is one read and one copy: w1 [I, D], then w3 [I, D], then w2 [D, I], in one dtype, each
matrix starting at a 64-byte boundary inside the record; records in a file start on 4 KiB
boundaries (``RECORD_ALIGNMENT``). It turns a record's bytes into ``ExpertWeights`` views
without copying. What it is not: I/O or caching. Quantized records (their state alongside the
data) extend this layout in a later format version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.config import ModelConfig
from offload.model import ExpertWeights

RECORD_ALIGNMENT = 4096  # records in the experts file start on this boundary
MATRIX_ALIGNMENT = 64  # matrices inside a record start on this boundary

MATRICES = ("w1", "w3", "w2")


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class MatrixSlot:
    name: str
    offset: int  # bytes from the record start
    shape: tuple[int, ...]

    def nbytes(self, dtype: torch.dtype) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one expert record for a model shape and dtype."""

    dtype: torch.dtype
    matrices: tuple[MatrixSlot, ...]
    nbytes: int  # bytes of one record, without the file's padding

    @classmethod
    def for_config(cls, config: ModelConfig, dtype: torch.dtype) -> RecordLayout:
        I, D = config.intermediate_size, config.hidden_size
        shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
        slots, offset = [], 0
        for name in MATRICES:
            slot = MatrixSlot(name, offset, shapes[name])
            slots.append(slot)
            offset = align_up(offset + slot.nbytes(dtype), MATRIX_ALIGNMENT)
        return cls(dtype, tuple(slots), offset)

    @property
    def stride(self) -> int:
        """Distance between consecutive records in the experts file."""
        return align_up(self.nbytes, RECORD_ALIGNMENT)

    def views(self, record: torch.Tensor) -> ExpertWeights:
        """Typed views [I, D], [I, D], [D, I] into ``record`` (uint8, at least ``nbytes``)."""
        parts = []
        for slot in self.matrices:
            raw = record[slot.offset : slot.offset + slot.nbytes(self.dtype)]
            parts.append(raw.view(self.dtype).view(slot.shape))
        return ExpertWeights(*parts)

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> torch.Tensor:
        """Write w1, w3, w2 (any float dtype, cast to the record's) into ``out`` (uint8 [nbytes])."""
        for slot, view in zip(self.matrices, self.views(out)):
            view.copy_(getattr(weights, slot.name))
        return out

    def to_dict(self) -> dict:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "nbytes": self.nbytes,
            "stride": self.stride,
            "matrices": [{"name": m.name, "offset": m.offset, "shape": list(m.shape)} for m in self.matrices],
        }
