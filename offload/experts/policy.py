"""Eviction policies for the per-layer device slots.

What it is: bookkeeping of expert uses and a choice of victim among a layer's resident experts,
never one that the current request protects. What it is not: the cache (which moves bytes) or
a predictor (which guesses the future; see predict.py when it lands).

Every policy sees the same events: ``use(layer, expert)`` for each expert a layer asks for
(hit or miss), in request order. Ties are broken by least recent use, then by expert id, so a
policy's choices are a pure function of the request sequence.
"""

from __future__ import annotations

from typing import Iterable, Protocol


class EvictionPolicy(Protocol):
    name: str

    def use(self, layer: int, expert: int) -> None: ...

    def victim(self, layer: int, candidates: Iterable[int]) -> int: ...


class LRU:
    """Evict the expert whose last use is oldest."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int):
        self.clock = 0
        self.last_use = [[-1] * num_experts for _ in range(num_layers)]

    def use(self, layer: int, expert: int) -> None:
        self.clock += 1
        self.last_use[layer][expert] = self.clock

    def victim(self, layer: int, candidates: Iterable[int]) -> int:
        last = self.last_use[layer]
        return min(candidates, key=lambda e: (last[e], e))


class LFU(LRU):
    """Evict the expert used least often since the start (counts survive eviction);
    ties go to the least recently used."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int):
        super().__init__(num_layers, num_experts)
        self.uses = [[0] * num_experts for _ in range(num_layers)]

    def use(self, layer: int, expert: int) -> None:
        super().use(layer, expert)
        self.uses[layer][expert] += 1

    def victim(self, layer: int, candidates: Iterable[int]) -> int:
        uses, last = self.uses[layer], self.last_use[layer]
        return min(candidates, key=lambda e: (uses[e], last[e], e))


POLICIES = {"lru": LRU, "lfu": LFU}
# cache policies by name: (eviction policy, prefetch predictor or None)
CACHE_POLICIES = {
    "lru": ("lru", None),
    "lfu": ("lfu", None),
    "lookahead": ("lru", "lookahead"),  # LRU eviction, gate look-ahead prefetch
    "history": ("score", "history"),  # router-history scores for prefetch and eviction (predict.py)
    "combined": ("score", "combined"),  # both predictors prefetch; history scores evict
}


def make_policy(name: str, num_layers: int, num_experts: int) -> EvictionPolicy:
    from offload.errors import SettingError

    try:
        return POLICIES[name](num_layers, num_experts)
    except KeyError:
        raise SettingError(f"--policy {name!r}: choose one of {', '.join(CACHE_POLICIES)}") from None


POLICY_CHOICES = ("auto", *CACHE_POLICIES)  # what --policy accepts


# What ``--policy auto`` means on every device: gate look-ahead and router history prefetch, and
# history scores evict. It keeps the most expert uses resident in time (demo model at 4 of 8
# experts: 0.94 vs LRU's 0.82), and a load it saves costs milliseconds for experts of real size
# (a 4-bit Mixtral expert is 99 MB) against ~0.05 ms of bookkeeping per layer. Only where
# experts are tiny and loads are memcpys (the demo model on a CPU) does LRU decode faster;
# ``offload profile`` measures that per machine and writes the faster one into the profile.
DEFAULT_POLICY = "combined"
# What ``--policy auto`` means when routing is replayed from a trace (``--replay``): gate
# look-ahead needs hidden states a trace does not hold, so router history alone prefetches.
REPLAY_POLICY = "history"


def cache_policy(name: str) -> tuple[str, str | None]:
    """(eviction policy, predictor) behind a --policy name."""
    from offload.errors import SettingError

    try:
        return CACHE_POLICIES[name]
    except KeyError:
        raise SettingError(f"--policy {name!r}: choose one of {', '.join(CACHE_POLICIES)}") from None
