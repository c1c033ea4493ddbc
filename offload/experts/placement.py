"""Hybrid placement: where each miss of a layer runs, on the GPU after a copy or on the CPU in place.

What it is: a cost model, pure Python (no torch), for ``--cpu-experts auto|off|all``. For each
miss of a layer (an expert the layer needs that has no device slot) it chooses "gpu" (copy the
record over the host-to-device link into a slot, then compute it on the GPU) or "cpu" (compute it
on its RAM copy: the hidden state goes to the host, the result comes back), so that the layer
finishes soonest, given measured costs (``Costs``) and what is already queued on the link, the
CPU, the GPU and the disk (``Queues``). What it is not: the engine's cache (which moves bytes and
keeps the slots; ``offload.experts.cache``), the CPU kernel, or a simulator of whole tokens
(``offload.timeline`` replays traces through this model).

The model of one layer, in seconds from the moment its routing is known (``Queues`` gives each
resource's backlog then; ``Costs`` each piece of work):

    read(i)      = a miss not in the RAM tier is read from disk first, whichever side runs it:
                   the reads go one after another, in the given order, from ``queues.disk_s``;
                   ready(i) = the end of its read (0 for a record in RAM)
    link         : the "gpu" misses' copies, in the given order, one at a time, from
                   ``queues.link_s`` (what the link must finish first: the copy in flight and
                   earlier demand copies; queued prefetches wait behind demand copies):
                   copy(i) ends at max(link, ready(i)) + link_s; a miss whose copy is already
                   on the link (a prefetch still running: ``Miss.lands_s``) takes no new copy,
                   copy(i) = lands_s
    GPU          : from ``queues.gpu_s`` (the layer's resident experts, computed first), each
                   copied-in miss once its copy has landed: gpu = max(gpu, copy(i)) + gpu_s
    CPU          : from ``queues.cpu_s``, the "cpu" misses one after another (each reads its
                   record at the CPU kernel's memory speed): cpu = max(cpu, ready(i)) + cpu_s,
                   then one ``round_trip_s`` for the layer (the result up and the GPU waiting for
                   it; the hidden state goes down with the routing's read), if any miss runs there
    finish       = max(GPU side, CPU side)

``place`` minimises ``finish`` over every split (up to
``EXACT_MISSES`` misses; beyond, over how many of each kind go to the CPU, the last ones of each
kind). Ties (finishes within ``TIE_S``) go to fewer CPU experts, then to the split that keeps the
first misses in the given order on the GPU: a copy leaves the expert resident for the next
token, and "off" is the engine's old behaviour. Deterministic: the same inputs give the same
choice. The model is myopic: it does not price the link time a copy takes from later
prefetches, nor the future hits a copy buys (a miss run on the CPU takes no slot);
``offload.timeline`` measures what that costs on real routing (README: the hybrid, simulated).

Modes (``CPU_EXPERTS``): "off": every miss over the link (the engine before issue 13); "all":
every miss on the CPU (llama.cpp's ``--cpu-moe``); "auto": the cost model.

For the engine: ``engine_placer(device, layout, config)`` returns the ``placer(layer, misses,
cache)`` that ``offload.experts.cache.ExpertCache`` calls with a layer's misses whose records
are in RAM; it returns the experts to run on the CPU (see its docstring for the queue state it
assumes). Costs from a profile: ``Costs.from_profile``; from measurements: ``Costs(...)`` or
``Costs.from_bandwidths``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Sequence

from offload.errors import SettingError

CPU_EXPERTS = ("auto", "off", "all")
GPU, CPU = "gpu", "cpu"

# The 4-bit CPU kernel's target share of the machine's measured memory read bandwidth (issue 13:
# ">= 60% of the machine's memory read bandwidth on AVX2 and AVX-512"): a stated target, not a
# measurement; a profile's measured ``cpu_expert_gbps`` replaces it.
CPU_KERNEL_EFFICIENCY = 0.6
# The share of the card's memory bandwidth a batch-1 4-bit expert reaches on the GPU: the same
# stated figure as ``offload.estimate.MEMORY_EFFICIENCY`` (a test keeps them equal).
GPU_KERNEL_EFFICIENCY = 0.6
# One layer's round trip for its CPU experts: the result (one hidden state, 8 KiB for Mixtral
# in bf16) copied up, a CUDA event the GPU stream waits on, the CPU thread's hand-off; the hidden
# state goes down with the routing's device-to-host read, which the engine makes anyway. Small
# copies cost ~10-20 us each and a sync some tens: 0.1 ms is a stated, conservative figure.
ROUND_TRIP_S = 0.1e-3
# Finish times closer than this are a tie (1 ns: far below any cost here, far above rounding).
TIE_S = 1e-9
# Every split is tried up to this many misses (2^10 timelines); beyond, splits by kind of miss
# (``_candidates``). A layer's misses at decode are at most top-k, a prefill chunk's its experts.
EXACT_MISSES = 10
# The most misses one layer may place (the search by kind is cubic in them).
MAX_MISSES = 1024


@dataclass(frozen=True)
class Miss:
    """One miss of a layer: the expert, whether its record is in the RAM tier (else it is on
    disk only and must be read first, whichever side runs it), and, for an expert whose copy is
    already on the link (a prefetch still running), when that copy lands (seconds from the
    routing): the GPU side then waits for it, with no new copy, or the CPU runs it meanwhile."""

    expert: int
    in_ram: bool = True
    lands_s: float | None = None

    def __post_init__(self) -> None:
        if self.lands_s is not None and not 0 <= self.lands_s < math.inf:
            raise SettingError(f"miss of expert {self.expert}: lands_s {self.lands_s!r}: expected seconds >= 0")


@dataclass(frozen=True)
class Costs:
    """Seconds per piece of work, for one expert record at the batch in hand.

    ``link_s``: one record over the host-to-device link. ``gpu_s``: one expert's FFN on the GPU.
    ``cpu_s``: one expert's FFN on the CPU from its RAM copy. ``round_trip_s``: once per layer
    that runs experts on the CPU. ``disk_s``: reading one record from disk (a miss not in RAM).
    ``gpu_token_s`` / ``cpu_token_s``: each token's compute on one expert, for batches where
    compute, not the weights' read, bounds the time (0: memory-bound at any batch): an expert
    at batch N takes max(gpu_s, N * gpu_token_s) (``for_tokens``)."""

    link_s: float
    gpu_s: float
    cpu_s: float
    round_trip_s: float = ROUND_TRIP_S
    disk_s: float = 0.0
    gpu_token_s: float = 0.0
    cpu_token_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise SettingError(f"placement cost {f.name} {value!r}: expected a finite number of seconds >= 0")

    def for_tokens(self, tokens: int) -> Costs:
        """The costs at a batch of ``tokens`` tokens per expert (roofline: the read of the
        weights, or the tokens' compute, whichever is longer)."""
        if tokens < 1:
            raise SettingError(f"tokens per expert {tokens!r}: expected at least 1")
        return replace(self, gpu_s=max(self.gpu_s, tokens * self.gpu_token_s),
                       cpu_s=max(self.cpu_s, tokens * self.cpu_token_s))

    @classmethod
    def from_bandwidths(
        cls,
        record_bytes: int,
        *,
        link_gbps: float,
        gpu_gbps: float | None = None,
        cpu_gbps: float | None = None,
        disk_gbps: float | None = None,
        gpu_s: float | None = None,
        cpu_s: float | None = None,
        round_trip_s: float = ROUND_TRIP_S,
        gpu_efficiency: float = GPU_KERNEL_EFFICIENCY,
        cpu_efficiency: float = CPU_KERNEL_EFFICIENCY,
    ) -> Costs:
        """Costs of a record of ``record_bytes`` from bandwidths in GB/s (1e9 bytes/s): the
        link's; the card's memory (``gpu_gbps``, read at ``gpu_efficiency`` of it); the CPU's RAM
        (``cpu_gbps``, read by the CPU kernel at ``cpu_efficiency`` of it); the disk's (None: no
        disk tier). A measured ``gpu_s`` / ``cpu_s`` (seconds per expert) replaces its bandwidth."""
        def seconds(gbps: float | None, share: float, what: str) -> float:
            if gbps is None or not gbps > 0 or not share > 0:
                raise SettingError(f"placement costs: {what} needs a bandwidth > 0 (GB/s) or a measured time")
            return record_bytes / (gbps * 1e9 * share)

        if not link_gbps > 0:
            raise SettingError(f"placement costs: link {link_gbps!r} GB/s: must be above 0")
        return cls(
            link_s=record_bytes / (link_gbps * 1e9),
            gpu_s=gpu_s if gpu_s is not None else seconds(gpu_gbps, gpu_efficiency, "the GPU expert"),
            cpu_s=cpu_s if cpu_s is not None else seconds(cpu_gbps, cpu_efficiency, "the CPU expert"),
            round_trip_s=round_trip_s,
            disk_s=0.0 if disk_gbps is None else seconds(disk_gbps, 1.0, "the disk"),
        )

    @classmethod
    def from_profile(cls, profile: Any, record_bytes: int, **overrides: Any) -> Costs:
        """Costs from a machine profile (``offload.profile.Profile``): the link's ``h2d_gbps``,
        the disk's ``disk_gbps``; the GPU expert from the 4-bit GPU kernel's measured
        ``gpu_expert_gbps`` when the profile has it, else the card's ``mem_gbps`` at
        ``GPU_KERNEL_EFFICIENCY``; the CPU expert from the CPU kernel's measured ``cpu_expert_gbps``,
        else the CPU's ``ram_gbps`` at ``CPU_KERNEL_EFFICIENCY``; the round trip from
        ``round_trip_ms``, else ``ROUND_TRIP_S`` (``offload profile`` measures all of them).
        ``overrides`` (None values ignored) replace fields of the result. Raises SettingError
        naming the field when the profile gives neither a time nor a bandwidth for a side."""
        where = getattr(profile, "source", "") or getattr(profile, "name", "") or "profile"

        def ms(name: str) -> float | None:
            value = getattr(profile, name, None)
            return None if value is None else value * 1e-3

        def measured(name: str) -> float | None:  # seconds per record at a measured GB/s
            value = getattr(profile, name, None)
            return record_bytes / (value * 1e9) if value else None

        try:
            costs = cls.from_bandwidths(
                record_bytes,
                link_gbps=profile.h2d_gbps,
                gpu_gbps=getattr(profile, "mem_gbps", None),
                cpu_gbps=getattr(profile, "ram_gbps", None),
                disk_gbps=getattr(profile, "disk_gbps", None) or None,
                gpu_s=measured("gpu_expert_gbps"),
                cpu_s=measured("cpu_expert_gbps"),
                round_trip_s=ms("round_trip_ms") if ms("round_trip_ms") is not None else ROUND_TRIP_S,
            )
        except SettingError as exc:
            field = ("machine.ram_gbps or machine.cpu_expert_gbps" if "CPU" in str(exc)
                     else "machine.mem_gbps or machine.gpu_expert_gbps" if "GPU" in str(exc) else "machine.h2d_gbps")
            raise SettingError(f"{where}: {field}: {exc}") from None
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(costs, **given) if given else costs

    def describe(self) -> str:
        return (f"link {self.link_s * 1e3:.2f} ms, GPU {self.gpu_s * 1e3:.2f} ms, CPU {self.cpu_s * 1e3:.2f} ms "
                f"per expert, round trip {self.round_trip_s * 1e3:.2f} ms")


@dataclass(frozen=True)
class Queues:
    """What each resource must finish before this layer's misses can use it, in seconds from
    the moment the layer's routing is known. ``link_s``: copies ahead of a demand copy (the one
    in flight, earlier demand copies; not queued prefetches, which wait behind demand copies).
    ``cpu_s``: CPU work already queued. ``gpu_s``: GPU work queued before the copied-in misses
    compute (the layer's resident experts, run first). ``disk_s``: reads ahead of this layer's."""

    link_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    disk_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise SettingError(f"queue {f.name} {value!r}: expected a finite number of seconds >= 0")


@dataclass(frozen=True)
class Placement:
    """A layer's split and its timeline (seconds from the routing, as ``Queues``)."""

    sides: tuple[str, ...]  # "gpu" or "cpu" per miss, in the given order
    finish_s: float  # the layer's experts are done: max(gpu_done_s, cpu_done_s)
    gpu_done_s: float  # the GPU's last expert of the layer (at least queues.gpu_s)
    cpu_done_s: float  # the CPU side's results back on the GPU (0: no CPU expert)
    cpu_free_s: float  # the CPU's last expert ends (queues.cpu_s when none runs there)
    link_free_s: float  # the link's last demand copy of the layer ends (queues.link_s when none)
    disk_free_s: float  # the last disk read ends (queues.disk_s when none)
    copy_done_s: tuple[float | None, ...]  # per miss: its copy's end ("gpu"), else None
    ready_s: tuple[float, ...]  # per miss: its record in RAM (0), or its disk read's end

    @property
    def cpu_experts(self) -> int:
        return sum(1 for s in self.sides if s == CPU)


def _misses(misses: Iterable[Miss | int]) -> list[Miss]:
    out = [m if isinstance(m, Miss) else Miss(int(m)) for m in misses]
    if len(out) > MAX_MISSES:
        raise SettingError(f"{len(out)} misses in one layer: at most {MAX_MISSES} are placed")
    return out


def timing(misses: Sequence[Miss | int], sides: Sequence[str], costs: Costs, queues: Queues = Queues()) -> Placement:
    """The layer's timeline for a given split (the module's model). ``misses``: Miss, or an
    expert id (its record in RAM); ``sides``: "gpu" or "cpu" for each."""
    ms = _misses(misses)
    sides = tuple(sides)
    if len(sides) != len(ms) or any(s not in (GPU, CPU) for s in sides):
        raise SettingError(f"sides {sides!r}: expected 'gpu' or 'cpu' for each of {len(ms)} misses")
    disk = queues.disk_s
    ready = []
    for m in ms:
        if m.in_ram or m.lands_s is not None:
            ready.append(0.0)
        else:
            disk += costs.disk_s
            ready.append(disk)
    link = queues.link_s
    copies: list[float | None] = [None] * len(ms)
    for i, side in enumerate(sides):
        if side == GPU and ms[i].lands_s is not None:
            copies[i] = ms[i].lands_s  # already on the link
        elif side == GPU:
            link = max(link, ready[i]) + costs.link_s
            copies[i] = link
    gpu = queues.gpu_s
    for end in sorted(c for c in copies if c is not None):
        gpu = max(gpu, end) + costs.gpu_s
    cpu = queues.cpu_s
    on_cpu = [i for i, side in enumerate(sides) if side == CPU]
    for i in on_cpu:
        cpu = max(cpu, ready[i]) + costs.cpu_s
    cpu_done = cpu + costs.round_trip_s if on_cpu else 0.0
    return Placement(sides, max(gpu, cpu_done), gpu, cpu_done, cpu, link, disk, tuple(copies), tuple(ready))


def place_layer(
    misses: Sequence[Miss | int], costs: Costs, queues: Queues = Queues(), mode: str = "auto"
) -> Placement:
    """The split of ``mode`` ("off": all "gpu"; "all": all "cpu"; "auto": the split that
    finishes soonest, ties to fewer CPU experts) with its timeline."""
    if mode not in CPU_EXPERTS:
        raise SettingError(f"--cpu-experts {mode!r}: choose one of {', '.join(CPU_EXPERTS)}")
    ms = _misses(misses)
    if mode == "off":
        return timing(ms, [GPU] * len(ms), costs, queues)
    if mode == "all":
        return timing(ms, [CPU] * len(ms), costs, queues)
    best: Placement | None = None
    for to_cpu in _candidates(ms):
        got = timing(ms, [CPU if i in to_cpu else GPU for i in range(len(ms))], costs, queues)
        if best is None or got.finish_s < best.finish_s - TIE_S:
            best = got
    assert best is not None
    return best


def _candidates(ms: Sequence[Miss]) -> Iterable[set[int]]:
    """The sets of misses to try on the CPU, fewer first (the tie-break), and among as many the
    last ones in the given order first (so that alike misses keep the first ones on the GPU).
    Every subset up to ``EXACT_MISSES`` misses; beyond, how many of each kind (in RAM, on disk
    only, already on the link) go to the CPU, the last ones of each kind."""
    n = len(ms)
    if n <= EXACT_MISSES:
        for k in range(n + 1):
            for combo in itertools.combinations(range(n - 1, -1, -1), k):
                yield set(combo)
        return
    kinds: dict[str, list[int]] = {"ram": [], "disk": [], "link": []}
    for i, m in enumerate(ms):
        kinds["link" if m.lands_s is not None else "ram" if m.in_ram else "disk"].append(i)
    groups = list(kinds.values())
    for k in range(n + 1):
        for counts in itertools.product(*(range(len(g) + 1) for g in groups)):
            if sum(counts) == k:
                yield {i for g, c in zip(groups, counts) for i in g[len(g) - c:]}


def place(misses: Sequence[Miss | int], costs: Costs, queues: Queues = Queues(), mode: str = "auto") -> list[str]:
    """"gpu" or "cpu" for each of a layer's ``misses`` (``place_layer``'s split)."""
    return list(place_layer(misses, costs, queues, mode).sides)


# ---- the engine's adapter ----------------------------------------------------------------------


def default_costs(record_bytes: int) -> Costs:
    """Costs from the stated default machine of ``offload.estimate`` (PCIe 4.0 x16 at 25 GB/s, an
    RTX 3060's 360 GB/s, dual-channel DDR5's ~65 GB/s usable), for an engine given no profile."""
    from offload.estimate import DEFAULT_DISK_GBPS, DEFAULT_LINK_GBPS, DEFAULT_MEM_GBPS, DEFAULT_RAM_GBPS

    return Costs.from_bandwidths(
        record_bytes, link_gbps=DEFAULT_LINK_GBPS, gpu_gbps=DEFAULT_MEM_GBPS, cpu_gbps=DEFAULT_RAM_GBPS,
        disk_gbps=DEFAULT_DISK_GBPS,
    )


def engine_placer(device: Any, layout: Any, config: Any, costs: Costs | None = None):
    """The ``placer(layer, misses, cache)`` for ``ExpertCache(cpu_experts="auto")`` on a device
    that is not the host: ``misses`` are a layer's missing experts whose records are in RAM, and
    it returns those to run on the CPU (``place`` in "auto" mode), deterministic.

    ``costs``: measured ones (``Costs.from_profile``); default ``default_costs(layout.nbytes)``.
    The queue state it assumes, from what the cache can tell: the GPU computes the layer's other
    experts first (top-k minus the misses, at ``costs.gpu_s`` each); the link holds, ahead of a
    demand copy, half a copy when a prefetch may be in flight (demand copies go before queued
    prefetches, so only the copy running delays them, by half a record on average), else
    nothing; the CPU is idle (its experts of the last layer are done before this one runs).
    A request of more misses than top-k is a prefill chunk, whose experts see many tokens each:
    its misses all go to the device unless ``tokens`` (tokens per expert) is given and the
    costs carry per-token compute (``Costs.cpu_token_s``)."""
    costs = costs if costs is not None else default_costs(int(layout.nbytes))
    top_k = int(config.num_experts_per_tok)

    def placer(layer: int, misses: Sequence[int], cache: Any, tokens: int | None = None) -> list[int]:
        misses = list(misses)
        if not misses:
            return []
        if tokens is None and len(misses) > top_k:
            return []
        at = costs.for_tokens(tokens) if tokens is not None else costs
        queues = Queues(link_s=0.5 * at.link_s if _prefetch_in_flight(cache) else 0.0,
                        gpu_s=max(0, top_k - len(misses)) * at.gpu_s)
        sides = place(misses, at, queues, "auto")
        return [e for e, side in zip(misses, sides) if side == CPU]

    return placer


def _prefetch_in_flight(cache: Any) -> bool:
    """Whether the cache may have a prefetch copy running (``ExpertCache.prefetch_in_flight``)."""
    check = getattr(cache, "prefetch_in_flight", None)
    return bool(check()) if check is not None else False


__all__ = [
    "CPU", "CPU_EXPERTS", "CPU_KERNEL_EFFICIENCY", "Costs", "EXACT_MISSES", "GPU", "GPU_KERNEL_EFFICIENCY", "MAX_MISSES",
    "Miss",
    "Placement", "Queues", "ROUND_TRIP_S", "TIE_S", "default_costs", "engine_placer", "place", "place_layer",
    "timing",
]
