"""Prefetch predictors: which experts a layer will ask for next, learned online from router history.

What it is: predictors that rate, for an upcoming layer, how likely each expert is to be chosen,
from the routing seen so far and nothing later; a combination of them; and the prefetching
policies built on their scores (prefetch the experts that clear a threshold, evict the lowest
scored). What it is not: the cache (which moves bytes) or gate look-ahead (which needs hidden
states, not router history, and lives with the engine).

Every predictor sees the same events, in the engine's order:
``begin_token()``; then for each layer ``scores(L)`` (before L runs: prefetch), ``observe(L,
experts)`` (L's routing is known), ``scores(L)`` again if it must evict (now it rates the next
time L runs); ``reset()`` between sequences (long-run statistics survive).

``scores(L)`` before ``observe(L, ...)`` in a token rates this token's layer L from what ran
before it (the layers above L in this token, and L's own past); after it, the next token's.
Scores lie in [0, 1]; an expert missing from the dict scores 0.

Replaying traces whose layers do not line up across layers (the shared decode JSONL), the
simulator calls ``set_aligned_layers(layers)``: cross-layer statistics then use only pairs of
consecutive layers that both line up. The engine never calls it: its layers always line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence


class Predictor(Protocol):
    name: str

    def begin_token(self) -> None: ...

    def observe(self, layer: int, experts: Sequence[int]) -> None: ...

    def scores(self, layer: int) -> dict[int, float]: ...

    def reset(self) -> None: ...


class _Tracker:
    """What every predictor keeps: this token's observations, and which layers line up."""

    name = "tracker"

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.aligned = frozenset(range(num_layers))
        self.seen: dict[int, tuple[int, ...]] = {}  # this token: layer -> experts

    def set_aligned_layers(self, layers: Iterable[int]) -> None:
        self.aligned = frozenset(layers)

    def begin_token(self) -> None:
        self.seen = {}

    def reset(self) -> None:
        self.seen = {}

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self.seen[layer] = tuple(experts)

    def _pair_aligned(self, layer: int) -> bool:
        """May layer-1 -> layer be learned and used (both line up)?"""
        return layer >= 1 and layer - 1 in self.aligned and layer in self.aligned


def _normalised(row: list[float], prior: float) -> list[float]:
    total = sum(row) + prior * len(row)
    return [(c + prior) / total for c in row]


class TransitionPredictor(_Tracker):
    """Cross-layer: P(layer L+1 chooses j | layer L chose i), from decayed counts of the pairs seen
    in the same token. Rates layer L from this token's layer L-1; no opinion on layer 0, on a
    layer already observed this token, or on a pair that does not line up."""

    name = "transition"

    def __init__(self, num_layers: int, num_experts: int, decay: float = 1.0, prior: float = 0.5):
        super().__init__(num_layers, num_experts)
        self.decay, self.prior = decay, prior
        # counts[L][i][j]: layer L-1 chose i and layer L chose j (counts[0] unused)
        self.counts = [[[0.0] * num_experts for _ in range(num_experts)] for _ in range(num_layers)]

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        before = self.seen.get(layer - 1)
        super().observe(layer, experts)
        if before is None or not self._pair_aligned(layer):
            return
        table = self.counts[layer]
        if self.decay != 1.0:
            for i in before:
                table[i] = [c * self.decay for c in table[i]]
        for i in before:
            for j in experts:
                table[i][j] += 1.0

    def scores(self, layer: int) -> dict[int, float]:
        before = self.seen.get(layer - 1)
        if layer in self.seen or before is None or not self._pair_aligned(layer):
            return {}
        out = [0.0] * self.num_experts
        for i in before:  # P(j chosen) ~ the mean over the sources of P(j | i), times top-k
            for j, p in enumerate(_normalised(self.counts[layer][i], self.prior)):
                out[j] += p
        return {j: min(1.0, s) for j, s in enumerate(out)}


class TemporalPredictor(_Tracker):
    """Same layer, across tokens: P(layer L chooses j now | it chose i the last time it ran),
    from decayed counts, learned per layer. Valid on any trace whose per-layer order is right."""

    name = "temporal"

    def __init__(self, num_layers: int, num_experts: int, decay: float = 1.0, prior: float = 0.5):
        super().__init__(num_layers, num_experts)
        self.decay, self.prior = decay, prior
        self.counts = [[[0.0] * num_experts for _ in range(num_experts)] for _ in range(num_layers)]
        self.last: list[tuple[int, ...] | None] = [None] * num_layers

    def reset(self) -> None:
        super().reset()
        self.last = [None] * self.num_layers

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        super().observe(layer, experts)
        before = self.last[layer]
        self.last[layer] = tuple(experts)
        if before is None:
            return
        table = self.counts[layer]
        for i in before:
            if self.decay != 1.0:
                table[i] = [c * self.decay for c in table[i]]
            for j in experts:
                table[i][j] += 1.0

    def scores(self, layer: int) -> dict[int, float]:
        before = self.last[layer]
        if before is None:
            return {}
        out = [0.0] * self.num_experts
        for i in before:
            for j, p in enumerate(_normalised(self.counts[layer][i], self.prior)):
                out[j] += p
        return {j: min(1.0, s) for j, s in enumerate(out)}


class RecencyPredictor(_Tracker):
    """Temporal locality: 1 for the experts a layer chose the last time it ran, fading by
    ``fade`` for each time since."""

    name = "recency"

    def __init__(self, num_layers: int, num_experts: int, fade: float = 0.5):
        super().__init__(num_layers, num_experts)
        self.fade = fade
        self.level = [[0.0] * num_experts for _ in range(num_layers)]

    def reset(self) -> None:
        super().reset()
        self.level = [[0.0] * self.num_experts for _ in range(self.num_layers)]

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        super().observe(layer, experts)
        row = [v * self.fade for v in self.level[layer]]
        for e in experts:
            row[e] = 1.0
        self.level[layer] = row

    def scores(self, layer: int) -> dict[int, float]:
        return dict(enumerate(self.level[layer]))


class FrequencyPredictor(_Tracker):
    """Long-run frequency: each expert's decayed share of its layer's choices, times top-k (so
    an expert chosen every time scores 1). Survives ``reset``."""

    name = "frequency"

    def __init__(self, num_layers: int, num_experts: int, decay: float = 1.0):
        super().__init__(num_layers, num_experts)
        self.decay = decay
        self.counts = [[0.0] * num_experts for _ in range(num_layers)]
        self.tokens = [0.0] * num_layers

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        super().observe(layer, experts)
        row = self.counts[layer]
        if self.decay != 1.0:
            self.counts[layer] = row = [c * self.decay for c in row]
        self.tokens[layer] = self.tokens[layer] * self.decay + 1.0
        for e in experts:
            row[e] += 1.0

    def scores(self, layer: int) -> dict[int, float]:
        n = self.tokens[layer]
        if not n:
            return {}
        return {e: c / n for e, c in enumerate(self.counts[layer])}


class CombinedPredictor:
    """A weighted mean of predictors' scores (weights normalised to sum to 1)."""

    def __init__(self, parts: Sequence[tuple[float, Predictor]], name: str = "combined"):
        total = sum(w for w, _ in parts)
        self.parts = [(w / total, p) for w, p in parts]
        self.name = name

    def set_aligned_layers(self, layers: Iterable[int]) -> None:
        layers = frozenset(layers)
        for _, p in self.parts:
            if hasattr(p, "set_aligned_layers"):
                p.set_aligned_layers(layers)

    def begin_token(self) -> None:
        for _, p in self.parts:
            p.begin_token()

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        for _, p in self.parts:
            p.observe(layer, experts)

    def scores(self, layer: int) -> dict[int, float]:
        out: dict[int, float] = {}
        for w, p in self.parts:
            for e, s in p.scores(layer).items():
                out[e] = out.get(e, 0.0) + w * s
        return out

    def reset(self) -> None:
        for _, p in self.parts:
            p.reset()


# ---- prefetching policies ------------------------------------------------------------------


def score_victim(scores: Mapping[int, float], candidates: Iterable[int], last_use: Mapping[int, int]) -> int:
    """The candidate to evict: lowest score, then least recently used, then lowest id."""
    return min(candidates, key=lambda e: (scores.get(e, 0.0), last_use.get(e, -1), e))


def select_prefetch(
    scores: Mapping[int, float],
    resident: set[int],
    capacity: int,
    threshold: float,
    most: int,
    last_use: Mapping[int, int],
) -> set[int]:
    """Prefetch into ``resident`` (changed in place) the best non-resident experts that score at
    least ``threshold``, at most ``most``; each takes a free slot or evicts the lowest-scored
    resident, and only one that scores lower than itself. Returns the experts loaded."""
    fetched: set[int] = set()
    if most <= 0:
        return fetched
    wanted = sorted((e for e, s in scores.items() if s >= threshold and e not in resident), key=lambda e: (-scores[e], e))
    for expert in wanted[:most]:
        if len(resident) >= capacity:
            victim = score_victim(scores, (e for e in resident if e not in fetched), last_use)
            if scores.get(victim, 0.0) >= scores[expert]:
                break
            resident.remove(victim)
        resident.add(expert)
        fetched.add(expert)
    return fetched


@dataclass(frozen=True)
class PrefetchPolicy:
    """A predictor + when to prefetch: at most ``max_prefetch`` experts per layer whose score is
    at least ``threshold``; eviction always goes to the lowest score."""

    name: str
    build: Callable[[int, int, int], Predictor]  # (num_layers, num_experts, top_k) -> predictor
    threshold: float
    max_prefetch: int
    about: str

    def make(self, num_layers: int, num_experts: int, top_k: int) -> Predictor:
        return self.build(num_layers, num_experts, top_k)


def history_predictor(num_layers: int, num_experts: int, top_k: int = 2) -> CombinedPredictor:
    """The best history-only combination found on the real Mixtral traces (see PREFETCH_POLICIES)."""
    return CombinedPredictor(
        [
            (HISTORY_WEIGHTS["transition"], TransitionPredictor(num_layers, num_experts)),
            (HISTORY_WEIGHTS["temporal"], TemporalPredictor(num_layers, num_experts)),
            (HISTORY_WEIGHTS["recency"], RecencyPredictor(num_layers, num_experts, fade=HISTORY_FADE)),
            (HISTORY_WEIGHTS["frequency"], FrequencyPredictor(num_layers, num_experts)),
        ],
        name="history",
    )


HISTORY_WEIGHTS = {"transition": 1.0, "temporal": 1.0, "recency": 1.0, "frequency": 1.0}
HISTORY_FADE = 0.5

PREFETCH_POLICIES: dict[str, PrefetchPolicy] = {
    "history": PrefetchPolicy(
        "history",
        history_predictor,
        threshold=0.5,
        max_prefetch=1,
        about="router history: cross-layer transitions + same-layer transitions + recency + frequency",
    ),
    "transition": PrefetchPolicy(
        "transition",
        lambda n, e, k: TransitionPredictor(n, e),
        threshold=0.0,
        max_prefetch=2,
        about="naive: prefetch the next layer's top-2 by cross-layer transition counts",
    ),
}
