"""The three places an expert record can be: device slots, host RAM, and its source on disk.

What it is: storage with fixed capacity, allocated once. ``DeviceSlots`` is the pool of
expert-sized buffers on the compute device (on CPU, a budgeted pool in RAM), each with typed
views made at start so that using a resident expert allocates nothing. ``HostTier`` holds a
fixed set of records in RAM (pinned when the device is CUDA) up to its budget. Record sources read one expert into a caller's buffer: a pack (``offload.pack.Pack``,
one read per record) or a Hugging Face checkpoint (``CheckpointRecords``, three reads, packed).
What it is not: the policy deciding what to keep (policy.py) or the orchestration (cache.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from offload.checkpoint import Checkpoint
from offload.device import empty_host_buffer
from offload.experts.record import RecordLayout
from offload.model import ExpertWeights

ExpertKey = tuple[int, int]  # (layer, expert)


class RecordSource(Protocol):
    """Something that can read one expert record into a buffer."""

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor: ...


class CheckpointRecords:
    """A Hugging Face checkpoint as a record source: reads w1, w3, w2 and packs them."""

    def __init__(self, checkpoint: Checkpoint, layout: RecordLayout):
        self.checkpoint = checkpoint
        self.layout = layout

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor:
        record = out[: self.layout.nbytes]
        return self.layout.pack(ExpertWeights(*self.checkpoint.expert(layer, expert)), record)


class DeviceSlots:
    """``slots_per_layer`` expert buffers for each layer on ``device``, allocated once."""

    def __init__(self, layout: RecordLayout, num_layers: int, slots_per_layer: int, device: torch.device):
        self.layout = layout
        self.slots_per_layer = slots_per_layer
        # [L * S, record bytes]; a record's views are made here, once
        self.storage = torch.zeros((num_layers * slots_per_layer, layout.nbytes), dtype=torch.uint8, device=device)
        self.weights: list[ExpertWeights] = [layout.views(self.storage[i]) for i in range(self.storage.shape[0])]

    def index(self, layer: int, slot: int) -> int:
        return layer * self.slots_per_layer + slot

    @property
    def nbytes(self) -> int:
        return self.storage.numel()


class HostTier:
    """Up to ``capacity`` records in host RAM, filled once at start and then left in place.

    A fixed set, not a cache: decode asks for experts layer after layer, so by the time an
    expert is wanted again more experts have been loaded than a partial RAM tier holds, and
    an LRU tier would only churn (measured: a quarter-size LRU tier served 0.5% of misses, a
    fixed quarter served ~25%). Experts outside the set are read from disk each time.
    """

    def __init__(self, layout: RecordLayout, capacity: int, device: torch.device):
        self.layout = layout
        self.capacity = capacity
        self.buffer = empty_host_buffer(layout.nbytes, capacity, device) if capacity else None
        self.rows: dict[ExpertKey, int] = {}

    def add(self, key: ExpertKey) -> torch.Tensor:
        """The next free row, now holding ``key`` (the caller fills it)."""
        row = len(self.rows)
        if row >= self.capacity:
            raise ValueError("host tier is full")
        self.rows[key] = row
        return self.buffer[row]

    def get(self, key: ExpertKey) -> torch.Tensor | None:
        row = self.rows.get(key)
        return None if row is None else self.buffer[row]

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self.rows

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()
