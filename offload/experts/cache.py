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
from offload.errors import BudgetError, SettingError
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
    cpu_runs: int = 0  # misses computed on the CPU, on their RAM copy (counted in misses; nothing moved)
    cpu_seconds: float = 0.0  # wall time of those CPU experts (reported by the model)

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
            "cpu_runs": total.cpu_runs,
            "cpu_seconds": total.cpu_seconds,
            "layers": [dict(asdict(s), hit_rate=s.hit_rate) for s in self.layers],
        }


ProgressFn = Callable[[int, int, str], None]

# --cpu-experts: "off" every miss is loaded into a slot (the device computes every expert); "all"
# every miss whose record is in the RAM tier runs on the CPU on that copy (llama.cpp's
# --cpu-moe); "auto" the same on a CPU device, and on CUDA the placer's cost model per miss
CPU_EXPERTS = ("auto", "off", "all")
CPU_MAX_TOKENS = 16  # a forward of more tokens runs every expert on the device (CUDA)
# placer(layer, misses in RAM, cache) -> the experts among them to run on the CPU
Placer = Callable[[int, list, "ExpertCache"], Sequence[int]]


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
        cpu_experts: str = "off",
        placer: Placer | None = None,
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
        if cpu_experts not in CPU_EXPERTS:
            raise SettingError(f"--cpu-experts {cpu_experts!r}: choose one of {', '.join(CPU_EXPERTS)}")
        self.cpu_experts = cpu_experts
        # which of a layer's misses run on the CPU, on their RAM copy: on a CPU device every one
        # there is (the "device" is RAM too: a copy would only move bytes); on CUDA the placer's
        # cost model decides ("auto"), or every one ("all")
        self.placer = placer
        self.last_sides: list[str] = []  # per expert of the last get: "device" or "cpu"
        # a CUDA model brings each decode layer's input to the host when misses may run there
        self.wants_host_input = cpu_experts != "off" and device.type != "cpu"
        # "auto" on a device that is not the host: a miss run on the CPU is also copied into a slot
        # in the background when the link is idle (``_admit``); on a CPU device a copy gains nothing
        self.admit = cpu_experts == "auto" and device.type != "cpu"
        self._fill_host(progress)
        self.host_views = {key: layout.views(self.host.get(key)) for key in self.host.rows}  # made once

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

    def get(self, layer: int, experts: Sequence[int], tokens: int = 1) -> list[ExpertWeights]:
        if len(experts) > self.capacity[layer]:
            raise ValueError(f"{len(experts)} experts requested, layer {layer} has {self.capacity[layer]} slots")
        if self._last_layer is not None and self._last_layer != layer:
            self.slots_free[self._last_layer] = self.transfers.mark()  # its compute is queued by now
        self._last_layer = layer
        stats = self._stats.layers[layer]
        resident = self.where[layer]
        protected = set(experts)
        chosen, waits, outcomes, sides = [], [], [], []  # waits: (expert, slot index, load handle)
        for expert in experts:  # (only the victims' recency matters to eviction: never these)
            self.policy.use(layer, expert)
        on_cpu = self._place(layer, [e for e in experts if e not in resident], tokens)
        expert = None
        try:
            for expert in experts:
                slot = resident.get(expert)
                if expert in on_cpu:  # computed where it lies in RAM: no slot taken, nothing moved
                    stats.misses += 1
                    stats.cpu_runs += 1
                    outcomes.append("cpu")
                    sides.append("cpu")
                    chosen.append(self.host_views[(layer, expert)])
                    continue
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
                sides.append("device")
                chosen.append(self.slots.weights[index])
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
        self.last_outcomes, self.last_sides = outcomes, sides
        if on_cpu and self.admit:
            self._admit(layer, [e for e in experts if e in on_cpu], protected)
        return chosen

    def _place(self, layer: int, misses: list[int], tokens: int = 1) -> set[int]:
        """The misses of ``layer`` that run on the CPU, on their RAM copy (only experts the RAM
        tier holds can: the rest come from disk into a slot either way). A device that is not
        the host takes every expert of a forward over more than ``CPU_MAX_TOKENS`` tokens (a
        prompt chunk: the CPU's batch-1 kernel is no match for the device there)."""
        if self.cpu_experts == "off" or not misses:
            return set()
        if self.device.type != "cpu" and tokens > CPU_MAX_TOKENS:
            return set()
        in_ram = [e for e in misses if (layer, e) in self.host]
        if not in_ram:
            return set()
        if self.cpu_experts == "all" or self.placer is None:  # (a CPU device has no placer: all in place)
            return set(in_ram)
        return set(self.placer(layer, in_ram, self, tokens))

    def prefetch_in_flight(self) -> bool:
        """Whether a prefetch (or admission) copy may still be running."""
        self._inflight = [h for h in self._inflight if not self.transfers.done(h)]
        return bool(self._inflight)

    def _admit(self, layer: int, experts: Sequence[int], protected: set[int]) -> None:
        """Copy misses that ran on the CPU into slots of ``layer`` in the background, when no
        other prefetch is on the link (so it never delays a copy that is waited for or predicted):
        without it, misses run on the CPU never refill the slots, and the hit rate decays. Each
        takes a free slot or the policy's victim among experts neither in this request nor
        prefetched and unused; counted as a prefetch (a load ahead of need)."""
        if self.prefetch_in_flight():
            return
        stats = self._stats.layers[layer]
        resident = self.where[layer]
        for expert in experts:
            keep = protected | {e for (l, e) in self.prefetched if l == layer}
            if expert in resident or (not self.free[layer] and not any(e not in keep for e in resident)):
                continue
            slot = self._take_slot(layer, keep)
            resident[expert] = slot
            try:
                handle = self._load(layer, expert, self.slots.index(layer, slot), stats)  # after all queued compute
            except BaseException:
                self._forget(layer, expert)
                raise
            self.prefetched.add((layer, expert))
            if handle is not None:
                self._inflight.append(handle)
            stats.prefetches += 1
            return  # one at a time: the next layer's misses may need the link

    def add_cpu_seconds(self, layer: int, seconds: float) -> None:
        """The model's report of the time its CPU experts of ``layer`` took."""
        self._stats.layers[layer].cpu_seconds += seconds

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
        if self.cpu_experts != "off" and (self.device.type == "cpu" or self.cpu_experts == "all"):
            wanted = [e for e in wanted if (layer, e) not in self.host]  # they run where they lie
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
