"""ExpertCache: the expert provider that keeps hot experts in device slots and loads the rest.

What it is: per-layer device slots with a pluggable eviction policy, fed from the host tier
(RAM) or, below it, the record source on disk; per-layer statistics (hits, misses, loads, copies
and bytes from each tier, stall time). It serves ``MixtralModel``'s MoE block through the
``ExpertProvider`` contract: ``get(layer, experts)`` with at most ``max_experts_per_call``
experts returns their weights as views into device slots, valid until the next call.

Guarantees: it never evicts an expert that the current request asks for; every layer owns at
least top-k slots, so any request fits; the bytes in a slot are an exact copy of the record, so
results are bit-identical to the all-resident run.

Batched moves: the misses of one ``get`` are brought in as one load. Their slots are taken
together (free slots first, a contiguous run of them where the free list has one, then the
policy's victims, the same victims as one miss at a time would evict) and paired with the
misses so that records in consecutive RAM rows land in consecutive slots: each such run is one
copy, and the ordering waits, the event and the stall timing are paid once per call, not once
per record. Disk misses are still one read each. ``batch_moves=False`` loads each miss by itself
(one copy per record), for comparison. What it is not: a predictor (prefetch comes
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
    host_copies: int = 0  # copy operations issued for host loads (a run of consecutive records is one)
    disk_reads: int = 0  # read operations issued for disk loads (one per record)

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

    @property
    def copies(self) -> int:
        """Moves issued towards the device: host copies and disk reads (at most the loads)."""
        return self.host_copies + self.disk_reads


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
            "host_copies": total.host_copies,
            "disk_reads": total.disk_reads,
            "copies": total.copies,
            "layers": [dict(asdict(s), hit_rate=s.hit_rate, copies=s.copies) for s in self.layers],
        }


ProgressFn = Callable[[int, int, str], None]

# --cpu-experts: "off" every miss is loaded into a slot (the device computes every expert); "all"
# every miss whose record is in the RAM tier runs on the CPU on that copy (llama.cpp's
# --cpu-moe); "auto" the same on a CPU device, and on CUDA the placer's cost model per miss
CPU_EXPERTS = ("auto", "off", "all")
CPU_MAX_TOKENS = 16  # a forward of more tokens runs every expert on the device (CUDA)
# placer(layer, misses in RAM, cache) -> the experts among them to run on the CPU
Placer = Callable[[int, list, "ExpertCache"], Sequence[int]]


def pair_runs(sources: Sequence[tuple[int, int]], slots: Sequence[int]) -> list[int]:
    """A distinct slot from ``slots`` for each of ``sources`` ((block, row) of RAM records,
    ascending), so that sources in consecutive rows of one block get consecutive slots as far as
    the slots allow: each run of sources, longest first, goes into the shortest run of
    consecutive slots that holds it whole, else is split over the longest ones. Then a run of
    sources is one copy where it found a run of slots. Uses len(sources) of the slots."""
    runs: list[tuple[int, int]] = []  # (first source position, length)
    for i, (block, row) in enumerate(sources):
        if runs and i > 0 and sources[i - 1] == (block, row - 1):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    free: list[list[int]] = []  # [first slot, length], slots ascending
    for slot in sorted(slots):
        if free and free[-1][0] + free[-1][1] == slot:
            free[-1][1] += 1
        else:
            free.append([slot, 1])
    out = [0] * len(sources)
    for first, length in sorted(runs, key=lambda r: (-r[1], r[0])):
        while length:
            fits = [r for r in free if r[1] >= length]
            run = min(fits, key=lambda r: (r[1], r[0])) if fits else max(free, key=lambda r: (r[1], -r[0]))
            n = min(length, run[1])
            out[first : first + n] = range(run[0], run[0] + n)
            run[0] += n
            run[1] -= n
            if not run[1]:
                free.remove(run)
            first, length = first + n, length - n
    return out


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
        batch_moves: bool = True,
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
        self.batch_moves = batch_moves  # a get's misses from RAM in runs, one load (else one copy each)
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
        chosen: list = [None] * len(experts)
        outcomes, sides, waits = [], [], []  # waits: (expert, slot index, load handle)
        misses: list[int] = []  # experts not resident: slots taken for them all at once, below
        moves: dict[int, int] = {}  # expert -> slot index this call loads it into
        issued: set[int] = set()  # experts of ``moves`` whose load has started
        for expert in experts:  # (only the victims' recency matters to eviction: never these)
            self.policy.use(layer, expert)
        on_cpu = self._place(layer, [e for e in experts if e not in resident], tokens)
        expert = None
        try:
            for position, expert in enumerate(experts):
                slot = resident.get(expert)
                if expert in on_cpu:  # computed where it lies in RAM: no slot taken, nothing moved
                    stats.misses += 1
                    stats.cpu_runs += 1
                    outcomes.append("cpu")
                    sides.append("cpu")
                    chosen[position] = self.host_views[(layer, expert)]
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
                                moves[expert] = index  # with this call's misses
                            else:
                                waits.append((expert, index, handle))
                    chosen[position] = self.slots.weights[index]
                elif expert in misses:  # asked twice in one call (the contract says never): one slot
                    outcome = "hit"
                    stats.hits += 1
                else:
                    outcome = "miss"
                    stats.misses += 1
                    misses.append(expert)
                outcomes.append(outcome)
                sides.append("device")
            expert = None
            if misses:
                for expert, slot in self._take_slots(layer, misses, protected).items():
                    resident[expert] = slot
                    moves[expert] = self.slots.index(layer, slot)
                expert = None
                for position, expert in enumerate(experts):
                    if chosen[position] is None:
                        chosen[position] = self.slots.weights[moves[expert]]
                expert = None
            if moves:
                waits.extend(self._move(layer, moves, stats, issued))
            if waits:
                started = self.stall.start()
                waited: set[int] = set()  # a batched load's one handle serves several slots
                for expert, index, handle in waits:
                    if id(handle) not in waited:
                        self.transfers.wait(handle)
                        waited.add(id(handle))
                    self.loads[index] = None  # compute now follows it (host or stream order)
                expert = None
                seconds = self.stall.stop(started, layer)
                if seconds is not None:
                    stats.stall_seconds += seconds
        except BaseException:
            # a failed or abandoned load: its slot holds no known expert, so forget it, every
            # expert given a slot here whose load never started (the slot holds its last
            # expert's bytes), and every other expert of this request whose load compute has not
            # yet waited for (it may have failed too), rather than serve their bytes later
            for other in set(experts):
                slot = resident.get(other)
                if (
                    other == expert
                    or (other in moves and other not in issued)
                    or (slot is not None and self.loads[self.slots.index(layer, slot)] is not None)
                ):
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

    def _take_slots(self, layer: int, misses: list[int], protected: set[int]) -> dict[int, int]:
        """A slot of ``layer`` for each miss: free slots first (a contiguous run of them where the
        free list holds one), then the policy's victims among experts ``protected`` does not
        hold, exactly the victims that taking one slot per miss would evict; paired so that
        records in consecutive RAM rows get consecutive slots where the slots allow
        (``pair_runs``). Returns expert -> slot."""
        free = self.free[layer]
        taken = self._free_run(layer, min(len(misses), len(free)))
        while len(taken) < len(misses):
            taken.append(self._take_slot(layer, protected))
        in_ram, on_disk = [], []
        for expert in misses:
            where = self.host.locate((layer, expert))
            (on_disk if where is None else in_ram).append((where, expert))
        in_ram.sort()
        slots = pair_runs([where for where, _ in in_ram], taken)
        out = {expert: slot for (_, expert), slot in zip(in_ram, slots)}
        rest = sorted(set(taken) - set(slots))
        out.update(zip((expert for _, expert in on_disk), rest))
        return out

    def _free_run(self, layer: int, n: int) -> list[int]:
        """Take ``n`` free slots of ``layer``: the lowest run of ``n`` consecutive ones, else the
        ``n`` lowest. The rest stay free, lowest popped first (``_take_slot``)."""
        if n == 0:
            return []
        free = sorted(self.free[layer])
        start = next((i for i in range(len(free) - n + 1) if free[i + n - 1] - free[i] == n - 1), 0)
        self.free[layer] = (free[:start] + free[start + n :])[::-1]
        return free[start : start + n]

    def _move(self, layer: int, moves: dict[int, int], stats: LayerStats, issued: set[int]) -> list:
        """Load ``moves`` (expert -> slot index of ``layer``) as demand loads; returns
        (expert, slot index, handle) for each load still to wait for. Batched: the RAM records
        go in runs (consecutive rows of one RAM block into consecutive slots), one copy per run,
        all in one ``Transfers.copy_runs`` load with one handle; disk records one read each.
        Each expert whose load started is added to ``issued``."""
        waits = []
        if not self.batch_moves:  # one load per record, each with its own handle
            for expert, index in moves.items():
                handle = self._load(layer, expert, index, stats, needed_now=True)
                issued.add(expert)
                if handle is not None:
                    waits.append((expert, index, handle))
            return waits
        nbytes = self.layout.nbytes
        started = self.stall.start()
        in_ram, on_disk = [], []  # in_ram: (block, row, slot index, expert)
        for expert, index in moves.items():
            where = self.host.locate((layer, expert))
            if where is None:
                on_disk.append((expert, index))
            else:
                in_ram.append((*where, index, expert))
        if in_ram:
            in_ram.sort()
            runs: list[list[int]] = []  # [block, first row, first slot index, records]
            for block, row, index, _ in in_ram:
                last = runs[-1] if runs else None
                if last is not None and block == last[0] and row == last[1] + last[3] and index == last[2] + last[3]:
                    last[3] += 1
                else:
                    runs.append([block, row, index, 1])
            previous = [self.loads[index] for _, _, index, _ in in_ram if self.loads[index] is not None]
            pairs = [(self.slots.run(index, n), self.host.run(block, row, n)) for block, row, index, n in runs]
            handle = self.transfers.copy_runs(pairs, None, True, previous)  # [n, record bytes] each
            stats.host_loads += len(in_ram)
            stats.host_bytes += len(in_ram) * nbytes
            stats.host_copies += len(runs)
            for _, _, index, expert in in_ram:
                self.loads[index] = handle
                self._tier[index] = "host"
                issued.add(expert)
                if handle is not None:
                    waits.append((expert, index, handle))
        for expert, index in on_disk:
            handle = self._read(layer, expert, index, stats, None, True)
            self.loads[index] = handle
            issued.add(expert)
            if handle is not None:
                waits.append((expert, index, handle))
        seconds = self.stall.stop(started, layer)
        if seconds is not None:
            stats.stall_seconds += seconds
        return waits

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
        started = self.stall.start()
        record = self.host.get((layer, expert))
        if record is not None:
            self._tier[slot_index] = "host"
            stats.host_loads += 1
            stats.host_bytes += self.layout.nbytes
            stats.host_copies += 1
            previous = self.loads[slot_index]  # a load into this slot that may not have landed
            # host rows never change: no reuse hazard
            handle = self.transfers.copy(self.slots.storage[slot_index], record, after, needed_now, previous)
        else:
            handle = self._read(layer, expert, slot_index, stats, after, needed_now)
        seconds = self.stall.stop(started, layer)
        if seconds is not None:
            stats.stall_seconds += seconds
        self.loads[slot_index] = handle
        return handle

    def _read(self, layer: int, expert: int, slot_index: int, stats: LayerStats, after, needed_now: bool):
        """Start the disk read of one record into a slot (counted as one read); its handle."""
        self._tier[slot_index] = "disk"
        stats.disk_loads += 1
        stats.disk_bytes += self.layout.nbytes
        stats.disk_reads += 1
        source = self.source
        read = lambda buffer: source.read_record(layer, expert, buffer)  # noqa: E731
        # a prefetch reads on the loader thread, a demand load here; never one behind the other;
        # after the last load into the slot, which may not have landed
        target = self.slots.storage[slot_index]
        return self.transfers.read(read, target, after, needed_now, self.loads[slot_index])

    def _uncount(self, slot_index: int, stats: LayerStats) -> None:
        """Take back the load, copy and bytes counted for a load into ``slot_index`` that was
        cancelled (only a single load can be: a batched one is a demand load, never queued)."""
        if self._tier[slot_index] == "host":
            stats.host_loads -= 1
            stats.host_bytes -= self.layout.nbytes
            stats.host_copies -= 1
        else:
            stats.disk_loads -= 1
            stats.disk_bytes -= self.layout.nbytes
            stats.disk_reads -= 1

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
