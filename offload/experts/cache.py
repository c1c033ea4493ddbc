"""ExpertCache: the expert provider that keeps hot experts in device slots and loads the rest.

What it is: per-layer device slots with a pluggable eviction policy, fed from the host tier
(RAM) or, below it, the record source on disk; per-layer statistics (hits, misses, loads and
bytes from each tier, stall time). It serves ``MixtralModel``'s MoE block through the
``ExpertProvider`` contract: ``get(layer, experts)`` with at most ``max_experts_per_call``
experts returns their weights as views into device slots, valid until the next call.

Guarantees: it never evicts an expert that the current request asks for; every layer owns at
least top-k slots, so any request fits; the bytes in a slot are an exact copy of the record, so
results are bit-identical to the all-resident run. What it is not: a predictor (prefetch comes
with predict.py) or a memory planner (plan.py sizes it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from offload.device import StallClock, Transfers
from offload.errors import BudgetError
from offload.experts.policy import EvictionPolicy, make_policy
from offload.experts.record import RecordLayout
from offload.experts.tiers import DeviceSlots, HostTier, RecordSource
from offload.model import ExpertWeights


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    host_loads: int = 0  # misses served from RAM
    disk_loads: int = 0  # misses read from the source on disk
    host_bytes: int = 0  # bytes copied host -> device for host loads
    disk_bytes: int = 0  # bytes read from disk
    stall_seconds: float = 0.0  # time compute waited for loads
    prefetches: int = 0  # loads started ahead of need (counted in host/disk loads too)
    prefetch_used: int = 0  # prefetched experts the layer then asked for (they count as hits)
    late: int = 0  # of those, still in flight when asked for (compute waited)

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def bytes_moved(self) -> int:
        """Bytes brought to the device: from RAM and from disk."""
        return self.host_bytes + self.disk_bytes

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


@dataclass
class CacheStats:
    layers: list[LayerStats] = field(default_factory=list)

    def total(self) -> LayerStats:
        out = LayerStats()
        for s in self.layers:
            for name, value in asdict(s).items():
                setattr(out, name, getattr(out, name) + value)
        return out

    def copy(self) -> CacheStats:
        return CacheStats([LayerStats(**asdict(s)) for s in self.layers])

    def since(self, earlier: CacheStats) -> CacheStats:
        """What happened after ``earlier`` (a copy taken before)."""
        out = []
        for now, then in zip(self.layers, earlier.layers):
            out.append(LayerStats(**{k: v - getattr(then, k) for k, v in asdict(now).items()}))
        return CacheStats(out)

    def to_dict(self) -> dict:
        total = self.total()
        return {
            "hits": total.hits,
            "misses": total.misses,
            "hit_rate": total.hit_rate,
            "host_loads": total.host_loads,
            "disk_loads": total.disk_loads,
            "host_bytes": total.host_bytes,
            "disk_bytes": total.disk_bytes,
            "stall_seconds": total.stall_seconds,
            "prefetches": total.prefetches,
            "prefetch_used": total.prefetch_used,
            "late": total.late,
            "layers": [dict(asdict(s), hit_rate=s.hit_rate) for s in self.layers],
        }


ProgressFn = Callable[[int, int, str], None]


class ExpertCache:
    """Device slots per layer + host tier + record source, with per-layer statistics."""

    def __init__(
        self,
        source: RecordSource,
        layout: RecordLayout,
        num_layers: int,
        num_experts: int,
        top_k: int,
        device: torch.device,
        slots_per_layer: int | Sequence[int],
        host_capacity: int,
        policy: str | EvictionPolicy = "lru",
        progress: ProgressFn | None = None,
        staged: bool | None = None,
        host_chunks: Sequence[int] | None = None,
    ):
        capacity = [slots_per_layer] * num_layers if isinstance(slots_per_layer, int) else list(slots_per_layer)
        if len(capacity) != num_layers or not all(top_k <= n <= num_experts for n in capacity):
            raise BudgetError(
                f"experts per layer on the device must be in [{top_k}, {num_experts}] "
                f"(top-k to all), got {slots_per_layer}"
            )
        total = num_layers * num_experts
        self.source = source
        self.layout = layout
        self.device = device
        self.num_layers, self.num_experts = num_layers, num_experts
        self.capacity = capacity  # device slots of each layer
        self.max_experts_per_call = min(capacity)  # every layer can serve a request this large
        self.policy = make_policy(policy, num_layers, num_experts) if isinstance(policy, str) else policy
        self.slots = DeviceSlots(layout, num_layers, capacity, device)
        host_capacity = min(host_capacity, total)
        chunks = host_chunks if host_chunks and sum(host_chunks) == host_capacity else None
        self.host = HostTier(layout, host_capacity, device, chunks)
        # disk reads go through pinned staging on CUDA (``staged``); a CPU device reads into its slot
        self.transfers = Transfers(device, layout.nbytes, staged=staged)
        self.stall = StallClock(device)
        # residency: layer -> {expert: slot}, and each layer's free slots
        self.where: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self.free: list[list[int]] = [list(range(n - 1, -1, -1)) for n in capacity]
        # per slot (DeviceSlots index): the handle of the last load into it, until compute has
        # waited for it; a slot is never read while its load may be running or has failed
        self.loads: list[object] = [None] * sum(capacity)
        self._tier: list[str] = [""] * sum(capacity)  # per slot: where its last load came from
        self.prefetched: set[tuple[int, int]] = set()  # (layer, expert) prefetched, not yet asked for
        self._inflight: list[object] = []  # handles of prefetches that may still be running
        self.max_inflight = 2 * top_k  # prefetch loads not yet finished, at most
        # per layer: a mark on the compute stream queued after that layer's last expert compute,
        # so a prefetch into its slots waits for that compute only, not for everything queued
        self.slots_free: list[object] = [None] * num_layers
        self._last_layer: int | None = None
        self.last_outcomes: list[str] = []  # per expert of the last get: hit, prefetched, late, miss
        self._stats = CacheStats([LayerStats() for _ in range(num_layers)])
        self._fill_host(progress)

    # ---- set-up -------------------------------------------------------------------------------

    def _fill_host(self, progress: ProgressFn | None) -> None:
        """Load RAM with records in layer-major order, up to its capacity, once."""
        n = self.host.capacity
        for i in range(n):
            layer, expert = divmod(i, self.num_experts)
            self.source.read_record(layer, expert, self.host.add((layer, expert)))
            if progress is not None:
                progress(i + 1, n, f"layer {layer} expert {expert} -> RAM")

    # ---- the provider contract ----------------------------------------------------------------

    def get(self, layer: int, experts: Sequence[int]) -> list[ExpertWeights]:
        if len(experts) > self.capacity[layer]:
            raise ValueError(f"{len(experts)} experts requested, layer {layer} has {self.capacity[layer]} slots")
        if self._last_layer is not None and self._last_layer != layer:
            self.slots_free[self._last_layer] = self.transfers.mark()  # its compute is queued by now
        self._last_layer = layer
        stats = self._stats.layers[layer]
        resident = self.where[layer]
        protected = set(experts)
        slots, waits, outcomes = [], [], []  # waits: (expert, slot index, load handle)
        expert = None
        try:
            for expert in experts:
                self.policy.use(layer, expert)
                slot = resident.get(expert)
                if slot is not None:
                    index = self.slots.index(layer, slot)
                    stats.hits += 1
                    outcome = "hit"
                    if (layer, expert) in self.prefetched:
                        self.prefetched.discard((layer, expert))
                        stats.prefetch_used += 1
                        outcome = "prefetched"
                    handle = self.loads[index]
                    if handle is not None:  # a load into this slot may still be running, or have failed
                        if self.transfers.done(handle):
                            self.transfers.check(handle)
                            self.loads[index] = None
                        else:
                            if outcome == "prefetched":
                                stats.late += 1
                                outcome = "late"
                            if self.transfers.cancel(handle):  # queued behind other prefetches: load it now
                                self._uncount(index, stats)  # the cancelled load moved nothing
                                self.loads[index] = None
                                handle = self._load(layer, expert, index, stats, needed_now=True)
                            if handle is not None:
                                waits.append((expert, index, handle))
                else:
                    outcome = "miss"
                    stats.misses += 1
                    slot = self._take_slot(layer, protected)
                    resident[expert] = slot
                    index = self.slots.index(layer, slot)
                    handle = self._load(layer, expert, index, stats, needed_now=True)
                    if handle is not None:
                        waits.append((expert, index, handle))
                outcomes.append(outcome)
                slots.append(index)
            expert = None
            if waits:
                started = self.stall.start()
                for expert, index, handle in waits:
                    self.transfers.wait(handle)
                    self.loads[index] = None  # compute now follows it (host or stream order)
                expert = None
                seconds = self.stall.stop(started, layer)
                if seconds is not None:
                    stats.stall_seconds += seconds
        except BaseException:
            # a failed or abandoned load: its slot holds no known expert, so forget it, and every
            # other expert of this request whose load compute has not yet waited for (it may
            # have failed too), rather than serve their bytes later
            for other in set(experts):
                slot = resident.get(other)
                if other == expert or (slot is not None and self.loads[self.slots.index(layer, slot)] is not None):
                    self._forget(layer, other)
            raise
        self.last_outcomes = outcomes
        return [self.slots.weights[i] for i in slots]

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Start loading ``experts`` of an upcoming ``layer`` into its slots; returns how many
        loads began (at most ``max_inflight`` unfinished at once). Only experts not yet resident
        are loaded, and at most the layer's free
        slots plus those whose experts are neither in ``experts`` nor prefetched and unused: a
        prefetch never evicts another prediction, and never touches another layer's slots (so
        never the current layer's). A wrong guess costs bytes, never correctness."""
        stats = self._stats.layers[layer]
        resident = self.where[layer]
        wanted = [e for e in dict.fromkeys(experts) if e not in resident]
        self._inflight = [h for h in self._inflight if not self.transfers.done(h)]
        started = 0
        for expert in wanted:
            if len(self._inflight) >= self.max_inflight:
                break
            keep = set(experts) | {e for (l, e) in self.prefetched if l == layer}
            if not self.free[layer] and not any(e not in keep for e in resident):
                break
            slot = self._take_slot(layer, keep)
            resident[expert] = slot
            try:
                handle = self._load(layer, expert, self.slots.index(layer, slot), stats, after=self.slots_free[layer])
            except BaseException:
                self._forget(layer, expert)
                raise
            self.prefetched.add((layer, expert))
            if handle is not None:
                self._inflight.append(handle)
            stats.prefetches += 1
            started += 1
        return started

    # ---- internals ----------------------------------------------------------------------------

    def _take_slot(self, layer: int, protected: set[int]) -> int:
        if self.free[layer]:
            return self.free[layer].pop()
        resident = self.where[layer]
        victim = self.policy.victim(layer, (e for e in resident if e not in protected))
        self.prefetched.discard((layer, victim))  # a prefetch evicted unused: bytes wasted
        return resident.pop(victim)  # a load still running into it lands before any later one

    def _forget(self, layer: int, expert: int) -> None:
        """Drop ``expert`` from ``layer``'s slots (its load failed or was abandoned): the slot
        goes back to the free list, and a later load into it is ordered after the old one."""
        slot = self.where[layer].pop(expert, None)
        self.prefetched.discard((layer, expert))
        if slot is not None:  # its load handle stays: the next load into the slot must follow it
            self.free[layer].append(slot)

    def _load(self, layer: int, expert: int, slot_index: int, stats: LayerStats, after=None, needed_now=False):
        """Bring one record into a device slot; returns the copy handle (None when done).
        ``after``: a compute-stream mark the copy must follow (default: all queued compute).
        ``needed_now``: a demand miss, waited for at once (a prefetch otherwise)."""
        key = (layer, expert)
        nbytes = self.layout.nbytes
        target = self.slots.storage[slot_index]
        previous = self.loads[slot_index]  # a load into this slot that may not have landed
        started = self.stall.start()
        record = self.host.get(key)
        self._tier[slot_index] = "host" if record is not None else "disk"
        if record is not None:
            stats.host_loads += 1
            stats.host_bytes += nbytes
            # host rows never change: no reuse hazard
            handle = self.transfers.copy(target, record, after, needed_now, previous)
        else:
            stats.disk_loads += 1
            stats.disk_bytes += nbytes
            source = self.source
            read = lambda buffer: source.read_record(layer, expert, buffer)  # noqa: E731
            # a prefetch reads on the loader thread, a demand load here; never one behind the other
            handle = self.transfers.read(read, target, after, needed_now, previous)
        seconds = self.stall.stop(started, layer)
        if seconds is not None:
            stats.stall_seconds += seconds
        self.loads[slot_index] = handle
        return handle

    def _uncount(self, slot_index: int, stats: LayerStats) -> None:
        """Take back the load and bytes counted for a load into ``slot_index`` that was cancelled."""
        if self._tier[slot_index] == "host":
            stats.host_loads -= 1
            stats.host_bytes -= self.layout.nbytes
        else:
            stats.disk_loads -= 1
            stats.disk_bytes -= self.layout.nbytes

    def close(self) -> None:
        """Finish the loads in flight and stop the loader (the cache still serves after, with
        a new loader started on demand)."""
        self.transfers.close()

    # ---- inspection ---------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        for layer, seconds in self.stall.resolve():
            self._stats.layers[layer].stall_seconds += seconds
        return self._stats

    def resident(self, layer: int) -> list[int]:
        return sorted(self.where[layer])

    @property
    def device_bytes(self) -> int:
        return self.slots.nbytes

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes
