"""Decode timeline on recorded routing: the GPU, the CPU, the link and the disk as queues, token by token.

What it is: a discrete-event replay of decode over a router trace (``offload.trace``: the shared
Mixtral-8x7B traces, or the engine's), with stated per-piece costs (``Timings``: a layer's dense
part, the head, and the placement model's ``Costs``), that gives tokens/s for one way of running
the experts (``Scenario``): every miss over the link (the engine before issue 13), every miss on
the CPU, the hybrid (``offload.experts.placement`` per miss, "auto"), with or without link
prefetch by router history, and llama.cpp's static split (``static_split``: the first layers'
experts resident, the rest always on the CPU, no cache). What it is not: a measurement (nothing
runs; ``offload bench`` measures), a model of prefill, or of gate look-ahead (it needs the hidden
states, which a trace lacks: only router-history prediction can be replayed).

Per token, per layer l, as the engine runs it (times in seconds, one clock per sequence):

    start(l)     = the end of layer l-1 (the head's end for layer 0): the GPU runs one layer at a
                   time, and a layer's attention needs every expert of the layer before
    routed(l)    = start(l) + dense_s                          the dense part, on the GPU
    hits         : experts in a slot whose copy has landed, computed on the GPU first
    misses       : the others, placed by ``place_layer`` (mode "off", "all" or "auto") with the
                   queues as they stand at routed(l): the link's backlog of committed copies, the
                   CPU's, the GPU's (the hits). An expert whose prefetch is still on the link is a
                   miss whose copy lands at a known time (``Miss.lands_s``): the GPU waits for it
                   ("late") or the CPU runs it meanwhile; one whose prefetch has not started is
                   cancelled and placed like any miss (a demand copy, or the CPU)
    end(l)       = routed(l) + the placement's finish
    head         = head_s after the last layer (final norm, lm_head, sampling)

The link is one server that never preempts a copy: a layer's demand copies are committed when
the layer routes, ahead of every background copy still waiting; a background copy is committed
once the link would start it before the next decision point, prefetches before admissions (below),
each kind in the order issued. A background copy reserves its slot when it is issued (as
``ExpertCache.prefetch`` does) and lands when its copy ends. At most ``2 * top_k`` background
copies are unfinished at once (the cache's ``max_inflight``).

The cache, as the engine keeps it (``offload.experts.cache``): every use is told to the
eviction policy; a miss copied to the GPU takes a slot (evicting the policy's victim among the
experts the request does not ask for); a miss run on the CPU takes none (nothing moves). So under
"all" the slots never fill (only records the RAM tier lacks would enter them), and under "auto"
only copied misses and prefetches enter them. Policies: "lru" (demand only), "history" (router
history scores evict, and prefetch the next layer's best expert when it scores >= 0.3, as
``offload.trace.simulate`` replays it: chosen when layer l-1 routes, or at the token's start for
layer 0), "history-evict" (the scores evict, no prefetch). Under "all" nothing in RAM is
prefetched (it runs where it lies). ``Scenario.admit`` (under "auto"; not what the engine does
today) adds one rule: a miss run on the CPU is also copied into a slot in the background, for
its next use, when no other copy waits on the link and fewer than the cap are unfinished (under
history scores only over a lower-scored victim), so the slots follow the routing as they do
when every miss is copied. Each sequence (a problem of the shared traces) starts with empty slots
and idle queues, as the cache simulator does.

A layer with no record at a step (the shared decode JSONL dropped steps whose two gates tied:
37 of 10,816 in HumanEval problems 0 and 1) runs its dense part and top-k resident experts on the
GPU, with no change to the cache; ``TimelineResult.missing`` counts them.

Simplifications, stated: the link and the CPU kernel draw on the same DRAM and are taken as
independent (the stated CPU kernel reads at 0.6 x 65 = 39 GB/s, the link at 25 GB/s: 64 GB/s,
within the ~65 GB/s a dual-channel DDR5 desktop reads); a prefetch of a record on disk only holds
the link for its read as well; a prefetch never waits for the previous occupant's compute
(issued a layer ahead, that compute is a token old).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from offload.errors import SettingError
from offload.experts.placement import CPU, CPU_EXPERTS, GPU, Costs, Miss, Queues, place_layer

if TYPE_CHECKING:
    from offload.trace import Trace

POLICIES = ("lru", "history", "history-evict")


@dataclass(frozen=True)
class Timings:
    """A machine and a plan as the timeline needs them: seconds per piece of work, slots per layer.

    ``dense_s``: one layer's dense part on the GPU (attention, router, norms, KV cache, the host
    overhead of a layer). ``head_s``: the final norm, lm_head and sampling, once per token, with
    the layers that have no experts (Qwen's dense-MLP layers: ``Estimate.fixed_s``).
    ``costs``: one expert over the link, on the GPU, on the CPU, the round trip, a disk read.
    ``layer_slots``: device slots of each layer. ``host_experts``: records in the RAM tier, in
    layer-major order as the cache fills it (None: every record)."""

    dense_s: float
    head_s: float
    costs: Costs
    layer_slots: tuple[int, ...]
    host_experts: int | None = None
    name: str = ""

    def in_ram(self, layer: int, expert: int, num_experts: int) -> bool:
        return self.host_experts is None or layer * num_experts + expert < self.host_experts

    @classmethod
    def for_plan(cls, plan: Any, machine: Any, *, name: str = "", position: int | None = None) -> Timings:
        """From ``offload.plan.plan_model``'s plan and an ``offload.estimate.Machine`` (which must
        state its RAM bandwidth, ``ram_gbps``, or its CPU kernel's): the dense part, the head and
        the GPU expert as ``offload.estimate`` prices them, the CPU expert and the round trip as
        the machine states them, the plan's slots per layer and RAM tier."""
        from offload.estimate import DEFAULT_POSITION, estimate_plan

        est = estimate_plan(plan, machine, position=DEFAULT_POSITION if position is None else position)
        record = plan.expert_bytes
        costs = Costs(
            link_s=record / (machine.link_gbps * 1e9),
            gpu_s=est.expert_s,
            cpu_s=machine.cpu_expert_seconds(record),
            round_trip_s=machine.round_trip_s,
            disk_s=record / (machine.disk_gbps * 1e9),
        )
        m = plan.memory
        host = None if m.host_experts >= m.experts_total or m.slots_per_layer == m.experts_per_layer else m.host_experts
        return cls(est.layers[0].dense_s, est.fixed_s, costs, tuple(m.layer_slots), host, name)


@dataclass(frozen=True)
class Scenario:
    """How the experts run: ``cpu_experts`` ("off": every miss over the link; "all": every miss
    on the CPU; "auto": the placement model), the slots' ``policy`` (``POLICIES``), whether the
    history policy prefetches (``prefetch``; "lru" and "history-evict" never do), and whether
    misses run on the CPU are copied into a slot in the background (``admit``, "auto" only)."""

    cpu_experts: str = "auto"
    policy: str = "history"
    prefetch: bool = True
    admit: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        if self.cpu_experts not in CPU_EXPERTS:
            raise SettingError(f"--cpu-experts {self.cpu_experts!r}: choose one of {', '.join(CPU_EXPERTS)}")
        if self.policy not in POLICIES:
            raise SettingError(f"timeline policy {self.policy!r}: choose one of {', '.join(POLICIES)}")

    @property
    def prefetching(self) -> bool:
        return self.prefetch and self.policy == "history"


@dataclass
class TimelineResult:
    """What a replay gives: the clock and the counts behind it."""

    label: str
    tokens: int = 0
    seconds: float = 0.0
    uses: int = 0  # expert uses with a record (top-k per layer per token)
    hits: int = 0  # in a slot and landed when the layer routed
    late: int = 0  # in a slot, its prefetch copy still on the link (waited for, or promoted)
    gpu_misses: int = 0  # copied over the link on demand
    cpu_misses: int = 0  # run on the CPU
    prefetches: int = 0  # prefetch copies issued
    prefetch_used: int = 0  # prefetched experts that their layer used at the token they were fetched for
    admitted: int = 0  # misses run on the CPU, then copied into a slot in the background
    link_seconds: float = 0.0  # copies (demand and prefetch) the link carried
    cpu_seconds: float = 0.0  # CPU expert work
    missing: int = 0  # layer steps with no record (run as top-k resident experts)
    token_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def resident_rate(self) -> float:
        """Uses found in a slot (landed or late)."""
        return (self.hits + self.late) / self.uses if self.uses else 0.0

    def per_token(self, count: int) -> float:
        return count / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
            "uses": self.uses, "hits": self.hits, "late": self.late, "gpu_misses": self.gpu_misses,
            "cpu_misses": self.cpu_misses, "prefetches": self.prefetches, "prefetch_used": self.prefetch_used,
            "admitted": self.admitted, "link_seconds": self.link_seconds, "cpu_seconds": self.cpu_seconds, "missing": self.missing,
            "hit_rate": self.hit_rate,
        }


class _Link:
    """The host-to-device link: committed copies end at ``free``; background copies wait in
    ``pending`` until the link would start them, prefetches before admissions, each class in
    the order issued."""

    PREFETCH, ADMIT = 0, 1

    def __init__(self, copy_s: float):
        self.copy_s = copy_s
        self.free = 0.0
        self.pending: list[list] = []  # [layer, expert, issued_at, seconds, priority, order]
        self.busy = 0.0
        self._order = 0

    def add(self, layer: int, expert: int, issued: float, seconds: float, priority: int) -> None:
        self.pending.append([layer, expert, issued, seconds, priority, self._order])
        self._order += 1

    def advance(self, now: float, landed: dict) -> None:
        """Commit the background copies the link starts before ``now``; their landing times go
        to ``landed``."""
        while self.pending:
            start = max(self.free, min(job[2] for job in self.pending))
            if start >= now:
                return
            job = min((j for j in self.pending if j[2] <= start), key=lambda j: (j[4], j[5]))
            self.pending.remove(job)
            self.free = start + job[3]
            self.busy += job[3]
            landed[(job[0], job[1])] = self.free

    def cancel(self, layer: int, expert: int) -> bool:
        """Drop a background copy not yet started; True if there was one."""
        for job in self.pending:
            if job[0] == layer and job[1] == expert:
                self.pending.remove(job)
                return True
        return False

    def queued(self, layer: int, expert: int) -> bool:
        return any(job[0] == layer and job[1] == expert for job in self.pending)


def simulate_timeline(
    trace: Trace, timings: Timings, scenario: Scenario = Scenario(), prefetch_policy: Any = None
) -> TimelineResult:
    """Replay the decode steps of ``trace`` under ``scenario`` on ``timings`` (the module's model).
    ``prefetch_policy``: the ``offload.experts.predict.PrefetchPolicy`` behind "history" and
    "history-evict" (default ``PREFETCH_POLICIES["history"]``, the engine's)."""
    from offload.experts.predict import PREFETCH_POLICIES

    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    if len(timings.layer_slots) != L:
        raise SettingError(f"{len(timings.layer_slots)} slot counts for a trace of {L} layers")
    if any(not 0 <= s <= E for s in timings.layer_slots):
        raise SettingError(f"slots per layer {timings.layer_slots}: each must be in [0, {E}]")
    if scenario.cpu_experts != "all" and any(s < K for s in timings.layer_slots):
        raise SettingError(f"slots per layer {timings.layer_slots}: a layer whose misses are copied needs top-{K}")
    result = TimelineResult(scenario.label or _label(scenario))
    spec = (prefetch_policy or PREFETCH_POLICIES["history"]) if scenario.policy != "lru" else None
    predictor = spec.make(L, E, K) if spec is not None else None
    for seq in trace.sequences:
        replay = _Replay(trace, timings, scenario, spec, predictor, result)
        replay.run(seq)
    return result


class _Replay:
    """One sequence's replay: the slots, the copies on the link, the CPU's and the disk's queues,
    the clock (``simulate_timeline`` makes one per sequence, sharing the predictor and result)."""

    def __init__(self, trace: Trace, timings: Timings, scenario: Scenario, spec: Any, predictor: Any,
                 result: TimelineResult):
        from offload.experts.policy import make_policy
        from offload.experts.predict import ScoreEviction

        self.L, self.E, self.K = trace.num_layers, trace.num_experts, trace.top_k
        self.timings, self.scenario, self.spec, self.predictor, self.result = timings, scenario, spec, predictor, result
        self.c = timings.costs
        self.max_inflight = 2 * self.K  # the cache's max_inflight
        self.policy: Any = (ScoreEviction(predictor, self.L, self.E) if predictor is not None
                            else make_policy("lru", self.L, self.E))
        self.resident: list[set[int]] = [set() for _ in range(self.L)]
        self.copying: set[tuple[int, int]] = set()  # background copies issued (prefetches, admissions)
        self.fresh: list[set[int]] = [set() for _ in range(self.L)]  # each layer's prefetches for its next run
        self.landed: dict[tuple[int, int], float] = {}  # committed copies: when they land
        self.link = _Link(self.c.link_s)
        self.cpu_free = self.disk_free = self.now = 0.0

    # ---- the slots and the link ---------------------------------------------------------------

    def evict(self, layer: int, expert: int) -> None:
        self.resident[layer].discard(expert)
        self.copying.discard((layer, expert))
        self.link.cancel(layer, expert)
        self.landed.pop((layer, expert), None)

    def victim(self, layer: int, candidates: list[int]) -> int:
        if self.predictor is not None:
            from offload.experts.predict import score_victim

            return score_victim(self.predictor.scores(layer), candidates, self.policy.last_use[layer])
        return self.policy.victim(layer, candidates)

    def unfinished(self, at: float) -> int:
        """Background copies waiting or still running at ``at``."""
        return len(self.link.pending) + sum(1 for key in self.copying if self.landed.get(key, -1.0) > at)

    def admit(self, layer: int, expert: int, request: Sequence[int], at: float) -> None:
        """A miss run on the CPU copied into a slot behind every other copy, for its next use,
        when nothing waits on the link; under history scores, only over a lower-scored expert."""
        if self.link.pending or self.unfinished(at) >= self.max_inflight:
            return
        cache = self.resident[layer]
        if len(cache) >= self.timings.layer_slots[layer]:
            candidates = [e for e in cache if e not in request]
            if not candidates:
                return
            out = self.victim(layer, candidates)
            if self.predictor is not None:
                scores = self.predictor.scores(layer)
                if scores.get(out, 0.0) >= scores.get(expert, 0.0):
                    return
            self.evict(layer, out)
        cache.add(expert)
        self.copying.add((layer, expert))
        self.link.add(layer, expert, at, self.c.link_s, _Link.ADMIT)
        self.result.admitted += 1

    def prefetch(self, layer: int, at: float) -> None:
        """The history policy's prefetch for ``layer``, issued at ``at`` (``select_prefetch`` as
        ``offload.trace.simulate`` calls it), at most the cap of unfinished copies."""
        from offload.experts.predict import select_prefetch

        if not self.scenario.prefetching or layer >= self.L:
            return
        most = min(self.spec.max_prefetch, self.max_inflight - self.unfinished(at))
        if most <= 0:
            return
        scores = self.predictor.scores(layer)
        if self.scenario.cpu_experts == "all":  # what lies in RAM runs there: never prefetched
            scores = {e: s for e, s in scores.items() if not self.timings.in_ram(layer, e, self.E)}
        cache = self.resident[layer]
        before = set(cache)
        fetched = select_prefetch(scores, cache, self.timings.layer_slots[layer], self.spec.threshold, most,
                                  self.policy.last_use[layer])
        for gone in before - cache:
            cache.add(gone)  # evict() keeps the bookkeeping of each victim
            self.evict(layer, gone)
        self.fresh[layer] = set(fetched)
        for expert in sorted(fetched, key=lambda e: (-scores[e], e)):
            cache.add(expert)
            self.copying.add((layer, expert))
            seconds = self.c.link_s + (0.0 if self.timings.in_ram(layer, expert, self.E) else self.c.disk_s)
            self.link.add(layer, expert, at, seconds, _Link.PREFETCH)
            self.result.prefetches += 1

    # ---- the clock -----------------------------------------------------------------------------

    def run(self, seq: Any) -> None:
        result, predictor = self.result, self.predictor
        if predictor is not None:
            predictor.reset()
            set_aligned = getattr(predictor, "set_aligned_layers", None)
            if set_aligned is not None:
                set_aligned(seq.aligned_layers)
        for step in seq.steps:
            if step.phase != "decode":
                continue
            token_start = self.now
            if predictor is not None:
                predictor.begin_token()
            if step.experts[0] is not None:
                self.prefetch(0, self.now)
            for layer in range(self.L):
                routed = self.now + self.timings.dense_s
                self.link.advance(routed, self.landed)
                request = step.experts[layer]
                if request is None:
                    result.missing += 1
                    self.now = routed + self.K * self.c.gpu_s
                else:
                    self.now = routed + self.layer(layer, sorted(request), routed)
                if layer + 1 < self.L and step.experts[layer + 1] is not None:  # as offload.trace.simulate
                    self.prefetch(layer + 1, routed)
            self.now += self.timings.head_s
            result.tokens += 1
            result.token_seconds.append(self.now - token_start)
        self.link.advance(float("inf"), self.landed)
        result.seconds += self.now
        result.link_seconds += self.link.busy

    def layer(self, layer: int, request: list[int], routed: float) -> float:
        """Serve one layer's request routed at ``routed``; returns its experts' seconds from then."""
        c, result, link, timings = self.c, self.result, self.link, self.timings
        result.uses += len(request)
        result.prefetch_used += len(self.fresh[layer] & set(request))
        self.fresh[layer] = set()
        if self.predictor is not None:
            self.predictor.observe(layer, request)
        for expert in request:
            self.policy.use(layer, expert)
        cache = self.resident[layer]
        ready: list[float] = []  # the resident experts (GPU): when each can compute
        misses: list[Miss] = []
        for expert in request:
            in_ram = timings.in_ram(layer, expert, self.E)
            if expert not in cache:
                misses.append(Miss(expert, in_ram))
                continue
            if link.queued(layer, expert):  # its prefetch has not started: placed like any miss
                self.evict(layer, expert)  # (a copy to the GPU takes the slot back)
                misses.append(Miss(expert, in_ram))
                continue
            at = self.landed.get((layer, expert), 0.0)
            if at > routed:  # its prefetch is on the link: wait for it, or run it on the CPU meanwhile
                misses.append(Miss(expert, in_ram, lands_s=at - routed))
            else:
                result.hits += 1
                ready.append(at)
        gpu = routed
        for at in sorted(ready):
            gpu = max(gpu, at) + c.gpu_s
        queues = Queues(link_s=max(0.0, link.free - routed), cpu_s=max(0.0, self.cpu_free - routed),
                        gpu_s=gpu - routed, disk_s=max(0.0, self.disk_free - routed))
        placed = place_layer(misses, c, queues, self.scenario.cpu_experts)
        ran_on_cpu: list[int] = []
        for miss, side, copied in zip(misses, placed.sides, placed.copy_done_s):
            if side == CPU:
                result.cpu_misses += 1
                result.cpu_seconds += c.cpu_s
                if miss.lands_s is None:
                    ran_on_cpu.append(miss.expert)
            elif miss.lands_s is not None:
                result.late += 1  # the GPU waits for the prefetch
            else:
                result.gpu_misses += 1
                link.busy += c.link_s
                if len(cache) >= timings.layer_slots[layer]:
                    self.evict(layer, self.victim(layer, [e for e in cache if e not in request]))
                cache.add(miss.expert)
                self.landed[(layer, miss.expert)] = routed + copied
        if self.scenario.admit and self.scenario.cpu_experts == "auto":
            for expert in ran_on_cpu:
                self.admit(layer, expert, request, routed)
        if GPU in placed.sides:
            link.free = routed + placed.link_free_s
        if CPU in placed.sides:
            self.cpu_free = routed + placed.cpu_free_s
        if any(not m.in_ram for m in misses):
            self.disk_free = routed + placed.disk_free_s
        return placed.finish_s


def static_split(trace: Trace, timings: Timings, gpu_layers: int | None = None, label: str = "") -> TimelineResult:
    """llama.cpp's static split (``-ngl 99 --n-cpu-moe``): every expert of the first
    ``gpu_layers`` layers on the GPU, every expert of the others on the CPU, no cache, nothing
    over the link. ``gpu_layers`` default: as many whole layers as the plan's slots hold
    (sum(layer_slots) // experts)."""
    L, E = trace.num_layers, trace.num_experts
    n = sum(timings.layer_slots) // E if gpu_layers is None else gpu_layers
    if not 0 <= n <= L:
        raise SettingError(f"static split: {n} GPU layers of {L}")
    static = Timings(timings.dense_s, timings.head_s, timings.costs, (E,) * n + (0,) * (L - n), None, timings.name)
    result = _simulate_static(trace, static, n)
    result.label = label or f"static split: experts of layers 0-{n - 1} on the GPU, {L - n} layers on the CPU"
    return result


def _simulate_static(trace: Trace, timings: Timings, gpu_layers: int) -> TimelineResult:
    """Every expert of a GPU layer resident, every expert of a CPU layer run on the CPU."""
    L, K = trace.num_layers, trace.top_k
    c = timings.costs
    result = TimelineResult("static")
    for seq in trace.sequences:
        now = 0.0
        for step in seq.steps:
            if step.phase != "decode":
                continue
            token_start = now
            for layer in range(L):
                routed = now + timings.dense_s
                request = step.experts[layer]
                if request is None:
                    result.missing += 1
                    now = routed + K * c.gpu_s
                    continue
                result.uses += len(request)
                if layer < gpu_layers:
                    result.hits += len(request)
                    now = routed + len(request) * c.gpu_s
                else:
                    placed = place_layer([Miss(e) for e in request], c, Queues(), "all")
                    result.cpu_misses += len(request)
                    result.cpu_seconds += len(request) * c.cpu_s
                    now = routed + placed.finish_s
            now += timings.head_s
            result.tokens += 1
            result.token_seconds.append(now - token_start)
        result.seconds += now
    return result


# ---- the stated machines and the scenarios of the README's table ---------------------------------

# Mixtral-8x7B in nf4 (experts and attention), bf16 compute, decoding at position 512 (the
# estimate's), on two shipped profiles: their card (memory bandwidth, published), their link
# (PCIe 4.0 x16 from pinned memory, 25 GB/s as measured), their plan's GPU and RAM budgets and
# context (offload.plan gives the slots per layer), and their host: ``machine.ram_gbps``, the
# CPU's usable RAM read (dual-channel DDR5-5600: 89.6 GB/s peak, ~65 read), with the CPU kernel at
# ``CPU_KERNEL_EFFICIENCY`` (0.6) of it and a 0.1 ms round trip (``offload.experts.placement``).
STATED_PROFILES = {"12gb": "rtx-3060-12gb", "24gb": "rtx-4090-24gb"}

SCENARIOS: dict[str, Scenario] = {
    "a: lru": Scenario("off", "lru", False, label="(a) transfer only, LRU"),
    "a: history": Scenario("off", "history", True, label="(a) transfer only, history + prefetch"),
    "all": Scenario("all", "lru", False, label="every expert on the CPU (--cpu-experts all)"),
    "c: history": Scenario("auto", "history", True, label="(c) hybrid, history + prefetch"),
    "c: history, admit": Scenario("auto", "history", True, True, label="(c) hybrid, history + prefetch, admit"),
    "d: lru": Scenario("auto", "lru", False, label="(d) hybrid, LRU, no prefetch"),
    "d: lru, admit": Scenario("auto", "lru", False, True, label="(d) hybrid, LRU, admit"),
    "d: history-evict": Scenario("auto", "history-evict", False, label="(d) hybrid, history scores, no prefetch"),
    "d: history-evict, admit": Scenario("auto", "history-evict", False, True,
                                        label="(d) hybrid, history scores, admit"),
}


def timings_for_profile(
    profile: str, *, ram_gbps: float | None = None, cpu_efficiency: float | None = None,
    round_trip_s: float | None = None, position: int | None = None,
) -> Timings:
    """The ``Timings`` of Mixtral-8x7B in nf4 on a shipped profile (a name or path), its host
    figures replaced by those given: the plan ``offload info mixtral-8x7b --profile NAME``
    prints, priced as ``offload.estimate`` prices it."""
    import torch

    from offload.estimate import Machine
    from offload.plan import builtin_model, plan_model
    from offload.profile import load_profile
    from offload.quant import format_for_bits

    p = load_profile(profile)
    name, config = builtin_model("mixtral-8x7b")
    formats = [format_for_bits(bits, torch.bfloat16, "cuda") for bits in (p.expert_bits, p.attn_bits)]
    plan = plan_model(name, config, torch.bfloat16, min(p.context, config.max_position_embeddings), *formats,
                      vram=p.plan_vram_bytes, ram=p.plan_ram_bytes, experts_per_layer=p.experts_per_layer)
    machine = Machine.from_profile(p, ram_gbps=ram_gbps, cpu_efficiency=cpu_efficiency, round_trip_s=round_trip_s)
    return Timings.for_plan(plan, machine, name=p.name, position=position)


def _label(s: Scenario) -> str:
    where = {"off": "transfer only", "all": "every miss on the CPU", "auto": "hybrid"}[s.cpu_experts]
    slots = s.policy + (" + prefetch" if s.prefetching else "")
    admit = ", CPU misses admitted" if s.admit and s.cpu_experts == "auto" else ""
    return f"{where}, {slots}{admit}"


__all__ = [
    "POLICIES", "SCENARIOS", "STATED_PROFILES", "Scenario", "TimelineResult", "Timings", "simulate_timeline",
    "static_split", "timings_for_profile",
]
