"""The three places an expert record can be: device slots, host RAM, and its source on disk.

What it is: storage with fixed capacity, allocated once. ``DeviceSlots`` is the pool of
expert-sized buffers on the compute device (on CPU, a budgeted pool in RAM), each with typed
views made at start so that using a resident expert allocates nothing. ``HostTier`` holds a
fixed set of records in RAM (pinned when the device is CUDA) up to its budget; records filled
one after another sit in consecutive rows, so both tiers can hand out a run of records as one
contiguous buffer (``run``) and a batched move copies it at once. Record sources read one expert
into a caller's buffer: a pack (``offload.pack.Pack``, one read per record) or a Hugging Face
checkpoint (``CheckpointRecords``, three reads, packed).
What it is not: the policy deciding what to keep (policy.py) or the orchestration (cache.py).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from offload.checkpoint import Checkpoint, check_cast
from offload.device import empty_host_buffer
from offload.experts.record import MATRICES, RecordLayout
from offload.model import ExpertWeights

ExpertKey = tuple[int, int]  # (layer, expert)


class RecordSource(Protocol):
    """Something that can read one expert record into a buffer."""

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor: ...


class CheckpointRecords:
    """A Hugging Face checkpoint as a record source: reads w1, w3, w2 and packs them.

    Quantized formats are quantized on ``device`` (default the CPU), one matrix at a time: the
    checkpoint's own tensor is moved there, quantized, and its packed tensors copied back into
    the host record, so on a GPU the CPU only reads and copies. Quantizing on the compute device
    makes the same numbers as ``offload.loader.load_resident_experts`` there.
    """

    def __init__(self, checkpoint: Checkpoint, layout: RecordLayout, device: torch.device | str | None = None):
        self.checkpoint = checkpoint
        self.layout = layout
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._stream = None  # CUDA: a side stream, so a read's quantization never queues behind compute

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor:
        record = out[: self.layout.nbytes]  # [nbytes] uint8, host
        weights = ExpertWeights(*self.checkpoint.expert(layer, expert))  # w1, w3 [I, D], w2 [D, I], CPU
        if self.layout.plain or self.device.type == "cpu":
            self.layout.pack(weights, record)
            if self.layout.plain:
                self._check_cast(layer, expert, weights, record)
            return record
        from offload import quant

        if self.device.type != "cuda":
            self._quantize_into(record, weights, quant)
            return record
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._quantize_into(record, weights, quant)
        self._stream.synchronize()
        return record

    def _check_cast(self, layer: int, expert: int, weights: ExpertWeights, record: torch.Tensor) -> None:
        """A plain record cast from the checkpoint's dtype must stay finite (float16 holds at most
        65504): refuse, naming the checkpoint tensor and its largest magnitude (``check_cast``).
        One finite pass over the record (~40 ms for a bf16 Mixtral expert), only when the dtypes
        differ."""
        ranges = self.checkpoint.expert_ranges(layer, expert)
        if all(r.entry.dtype == self.layout.dtype for r in ranges.values()):
            return
        for matrix, source, cast in zip(MATRICES, weights, self.layout.views(record)):
            entry = ranges[matrix].entry
            part = f" (expert {expert}, {matrix})" if entry.shape != ranges[matrix].shape else ""
            check_cast(f"{entry.file}: tensor '{entry.name}'{part}", source, cast)

    def _quantize_into(self, record: torch.Tensor, weights: ExpertWeights, quant) -> None:
        for target, weight in zip(self.layout.views(record), weights):  # QuantizedMatrix views into record
            quantized = quant.quantize(weight.to(self.device), self.layout.fmt)  # on the device
            for name, tensor in quantized.tensors.items():
                target.tensors[name].copy_(tensor)  # device -> host record


class DeviceSlots:
    """Expert buffers on ``device``, ``layer_slots[l]`` for layer l (an int: that many for every
    layer), allocated once in one tensor; each slot's typed views are made here, once."""

    def __init__(self, layout: RecordLayout, num_layers: int, layer_slots: int | Sequence[int], device: torch.device):
        self.layout = layout
        counts = [layer_slots] * num_layers if isinstance(layer_slots, int) else list(layer_slots)
        if len(counts) != num_layers:
            raise ValueError(f"{len(counts)} slot counts for {num_layers} layers")
        self.layer_slots = tuple(counts)
        self.first = [0]  # index of layer l's first slot
        for count in counts:
            self.first.append(self.first[-1] + count)
        # [sum of slots, record bytes]; a record's views are made here, once
        self.storage = torch.zeros((self.first[-1], layout.nbytes), dtype=torch.uint8, device=device)
        self.weights: list[ExpertWeights] = [layout.views(self.storage[i]) for i in range(self.storage.shape[0])]

    def index(self, layer: int, slot: int) -> int:
        return self.first[layer] + slot

    def run(self, index: int, count: int) -> torch.Tensor:
        """Slots ``index`` .. ``index + count - 1`` as one buffer: [count, record bytes], contiguous
        (consecutive slots are consecutive rows of the one storage tensor)."""
        return self.storage[index : index + count]

    @property
    def nbytes(self) -> int:
        return self.storage.numel()


class HostTier:
    """Up to ``capacity`` records in host RAM, filled once at start and then left in place.

    A fixed set, not a cache: decode asks for experts layer after layer, so by the time an
    expert is wanted again more experts have been loaded than a partial RAM tier holds, and
    an LRU tier would only churn (measured: a quarter-size LRU tier served 0.5% of misses, a
    fixed quarter served ~25%). Experts outside the set are read from disk each time.

    On CUDA the records are pinned, in blocks of ``chunk_rows[i]`` records each
    (``offload.plan.pinned_chunks``): torch's pinned allocator rounds every block up to a power
    of two, so one block for all of them could ask for a third more than they take.
    """

    def __init__(
        self, layout: RecordLayout, capacity: int, device: torch.device, chunk_rows: Sequence[int] | None = None
    ):
        self.layout = layout
        self.capacity = capacity
        rows = list(chunk_rows) if chunk_rows else ([capacity] if capacity else [])
        if sum(rows) != capacity:
            raise ValueError(f"chunks of {rows} records do not hold {capacity}")
        self.buffers = [empty_host_buffer(layout.nbytes, n, device) for n in rows]  # [n, record bytes] each
        self._row_of = [(b, r) for b, n in enumerate(rows) for r in range(n)]  # record index -> (block, row)
        self.rows: dict[ExpertKey, int] = {}

    def add(self, key: ExpertKey) -> torch.Tensor:
        """The next free row, now holding ``key`` (the caller fills it)."""
        row = len(self.rows)
        if row >= self.capacity:
            raise ValueError("host tier is full")
        self.rows[key] = row
        return self._row(row)

    def _row(self, row: int) -> torch.Tensor:
        block, r = self._row_of[row]
        return self.buffers[block][r]

    def get(self, key: ExpertKey) -> torch.Tensor | None:
        row = self.rows.get(key)
        return None if row is None else self._row(row)

    def locate(self, key: ExpertKey) -> tuple[int, int] | None:
        """(block, row within the block) of ``key``'s record, None when RAM does not hold it:
        records at consecutive rows of one block are one contiguous range (``run``)."""
        row = self.rows.get(key)
        return None if row is None else self._row_of[row]

    def run(self, block: int, row: int, count: int) -> torch.Tensor:
        """Rows ``row`` .. ``row + count - 1`` of ``block`` as one buffer: [count, record bytes]."""
        return self.buffers[block][row : row + count]

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self.rows

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)
