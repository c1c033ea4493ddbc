"""The decode timeline (offload.timeline): hand-made traces with every event's time worked out by
hand, the trace simulator's hit counts as an independent oracle on the real traces, and the
hybrid against transfer-only and llama.cpp's static split at the stated 12 GB numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.errors import SettingError
from offload.experts.placement import Costs
from offload.experts.predict import PrefetchPolicy
from offload.timeline import Scenario, Timings, simulate_timeline, static_split
from offload.trace import MIXTRAL_DECODE, Step, TokenSequence, Trace, TraceHeader

needs_traces = pytest.mark.skipif(not MIXTRAL_DECODE.is_file(), reason="the shared Mixtral traces are not here")

# Seconds, multiples of 1/4 so every sum is exact: a layer's dense part 1, the head 2, a copy 4,
# an expert on the GPU 1, on the CPU 3 (or 1.25 below), the round trip 0.5, a disk read 3.
COSTS = Costs(link_s=4.0, gpu_s=1.0, cpu_s=3.0, round_trip_s=0.5, disk_s=3.0)
FAST_CPU = Costs(link_s=4.0, gpu_s=1.0, cpu_s=1.25, round_trip_s=0.5, disk_s=3.0)


def tiny_trace(tokens: list[list[int]], experts: int = 4) -> Trace:
    """One sequence; ``tokens[t][layer]`` is the one expert (top-1) that layer chose at step t."""
    layers = len(tokens[0])
    steps = [Step(t, "decode", [(e,) for e in row], [(1.0,) for _ in row]) for t, row in enumerate(tokens)]
    header = TraceHeader("tiny", layers, experts, 1)
    return Trace(Path("tiny.jsonl"), "offload", header, [TokenSequence("tiny", steps, frozenset(range(layers)))])


def timings(costs: Costs = COSTS, slots=(1, 1), host_experts=None) -> Timings:
    return Timings(dense_s=1.0, head_s=2.0, costs=costs, layer_slots=tuple(slots), host_experts=host_experts)


TRACE = tiny_trace([[0, 1], [0, 2], [3, 2]])  # 2 layers, 3 tokens


def test_transfer_only_with_lru_by_hand():
    got = simulate_timeline(TRACE, timings(), Scenario("off", "lru", prefetch=False))
    # token 0: L0 routes at 1, copies 0 over 1..5, computes 5..6; L1 routes at 7, copies 1 over
    #          7..11, computes 11..12; the head 12..14
    # token 1: L0 routes at 15, 0 is a hit: 15..16; L1 routes at 17, 2 evicts 1: copy 17..21,
    #          compute 21..22; head 22..24
    # token 2: L0 routes at 25, 3 evicts 0: copy 25..29, compute 29..30; L1 routes at 31, a hit:
    #          31..32; head 32..34
    assert got.token_seconds == [14.0, 10.0, 10.0] and got.seconds == 34.0
    assert got.tokens_per_s == pytest.approx(3 / 34)
    assert (got.hits, got.gpu_misses, got.cpu_misses, got.uses) == (2, 4, 0, 6)
    assert got.link_seconds == 16.0


def test_the_hybrid_by_hand_keeps_cpu_misses_out_of_the_slots():
    # one miss: over the link 4 + 1 = 5, on the CPU 3 + 0.5 = 3.5: every miss runs on the CPU,
    # and one run there takes no slot, so every use misses: a layer costs 1 + 3.5
    got = simulate_timeline(TRACE, timings(), Scenario("auto", "lru", prefetch=False))
    assert got.token_seconds == [11.0, 11.0, 11.0] and got.seconds == 33.0
    assert (got.hits, got.gpu_misses, got.cpu_misses, got.link_seconds) == (0, 0, 6, 0.0)
    # every miss on the CPU: the same here
    assert simulate_timeline(TRACE, timings(), Scenario("all", "lru", prefetch=False)).seconds == 33.0


def test_cpu_misses_admitted_in_the_background_by_hand():
    got = simulate_timeline(TRACE, timings(), Scenario("auto", "lru", prefetch=False, admit=True))
    # token 0: L0 routes at 1, 0 on the CPU 1..4 (+0.5: 4.5), its copy queued at 1, started at
    #          1 (the link idle), lands 5; L1 routes at 5.5, 1 on the CPU until 9, its copy
    #          5.5..9.5; head 9..11
    # token 1: L0 routes at 12, 0 landed: a hit 12..13; L1 routes at 14, 2 misses: the CPU
    #          14..17.5, its copy (evicting 1) 14..18; head 17.5..19.5
    # token 2: L0 routes at 20.5, 3 misses: CPU until 24, its copy (evicting 0) 20.5..24.5; L1
    #          routes at 25, 2 landed at 18: a hit 25..26; head 26..28
    assert got.token_seconds == [11.0, 8.5, 8.5] and got.seconds == 28.0
    assert (got.hits, got.cpu_misses, got.admitted, got.gpu_misses) == (2, 4, 4, 0)
    assert got.link_seconds == 16.0


class Scripted:
    """A predictor that rates one given expert 1 for (token, layer) before the layer runs, and
    has no opinion after (evictions then go to the least recently used)."""

    name = "scripted"

    def __init__(self, picks: dict[tuple[int, int], int]):
        self.picks, self.token, self.seen = picks, -1, set()

    def begin_token(self):
        self.token += 1
        self.seen = set()

    def observe(self, layer, experts):
        self.seen.add(layer)

    def scores(self, layer):
        pick = self.picks.get((self.token, layer))
        return {} if pick is None or layer in self.seen else {pick: 1.0}

    def reset(self):
        self.token = -1


def scripted(picks) -> PrefetchPolicy:
    return PrefetchPolicy("scripted", lambda n, e, k: Scripted(picks), threshold=0.5, max_prefetch=1, about="test")


def test_a_late_prefetch_is_waited_for_on_the_gpu_by_hand():
    trace = tiny_trace([[0, 1], [0, 2], [0, 3]])
    picks = scripted({(1, 1): 2, (2, 1): 3})  # layer 1's expert of tokens 1 and 2, guessed right
    got = simulate_timeline(trace, timings(), Scenario("off", "history"), prefetch_policy=picks)
    # token 0: as transfer-only: L0 ends at 6, L1 at 12, head 14
    # token 1: L0 routes at 15, a hit (16); the prefetch of 2 for L1 is issued at 15 (evicting 1),
    #          runs 15..19; L1 routes at 17: 2 is on the link, the GPU waits: 19..20; head 22
    # token 2: L0 routes at 23, a hit (24); 3 is prefetched 23..27; L1 routes at 25, waits: 27..28;
    #          head 30
    assert got.token_seconds == [14.0, 8.0, 8.0] and got.seconds == 30.0
    assert (got.hits, got.late, got.gpu_misses, got.prefetches, got.prefetch_used) == (2, 2, 2, 2, 2)


def test_a_late_prefetch_runs_on_the_cpu_when_that_is_sooner_by_hand():
    trace = tiny_trace([[0, 1], [0, 2], [0, 3]])
    picks = scripted({(1, 1): 2, (2, 1): 3})
    got = simulate_timeline(trace, timings(FAST_CPU), Scenario("auto", "history"), prefetch_policy=picks)
    # a miss: over the link 5, on the CPU 1.25 + 0.5 = 1.75: every one on the CPU
    # token 0: L0 routes at 1, ends 2.75; L1 routes at 3.75, ends 5.5; head 7.5
    # token 1: L0 routes at 8.5, ends 10.25; 2 is prefetched into L1's free slot 8.5..12.5; L1
    #          routes at 11.25: waiting costs 1.25 + 1 = 2.25, the CPU 1.75: the CPU, ends 13;
    #          head 15
    # token 2: L0 routes at 16, ends 17.75; 3 is prefetched (evicting 2) 16..20; L1 routes at
    #          18.75: waiting 2.25 against 1.75: the CPU, ends 20.5; head 22.5
    assert got.token_seconds == [7.5, 7.5, 7.5] and got.seconds == 22.5
    assert (got.hits, got.late, got.cpu_misses, got.prefetches, got.prefetch_used) == (0, 0, 6, 2, 2)


def test_a_prefetch_not_started_is_cancelled_and_placed_by_hand():
    trace = tiny_trace([[0, 1]])
    picks = scripted({(0, 0): 3, (0, 1): 1})  # a wrong guess for layer 0, a right one for layer 1
    got = simulate_timeline(trace, timings(FAST_CPU), Scenario("auto", "history"), prefetch_policy=picks)
    # the token starts at 0: 3 is prefetched for L0, 0..4. L0 routes at 1: 0 misses; the link is
    # busy until 4, so a copy would end at 8 (GPU 9), the CPU at 2.75: the CPU. 1 is prefetched for
    # L1 at 1, queued behind 3 (start 4). L1 routes at 3.75: its prefetch has not started, so it is
    # cancelled and placed: a copy 4..8 (+1) against the CPU 1.75: the CPU, ends 5.5; head 7.5
    assert got.token_seconds == [7.5]
    assert (got.cpu_misses, got.gpu_misses, got.late, got.prefetches) == (2, 0, 0, 2)
    assert got.link_seconds == 4.0  # only 3's copy ran


def test_a_record_on_disk_is_read_first_by_hand():
    # the RAM tier holds the first 4 records (layer 0's); layer 1's are read from disk
    trace = tiny_trace([[0, 1]])
    off = simulate_timeline(trace, timings(host_experts=4), Scenario("off", "lru", prefetch=False))
    # L0: routes at 1, copy 1..5, compute 6; L1: routes at 7, read 7..10, copy 10..14, compute 15; head 17
    assert off.seconds == 17.0
    auto = simulate_timeline(trace, timings(host_experts=4), Scenario("auto", "lru", prefetch=False))
    # L0 on the CPU: 1 + 3.5 = 4.5; L1 routes at 5.5: read until 8.5, then the CPU 11.5 (+0.5: 12) against
    # the GPU 8.5 + 4 + 1 = 13.5: the CPU; head 14
    assert auto.seconds == 14.0 and auto.cpu_misses == 2


def test_the_static_split_by_hand():
    # layer 0's experts all on the GPU, layer 1's all on the CPU: 1 + 1 + 1 + 3 + 0.5 + head 2
    got = static_split(TRACE, timings(slots=(4, 4)), gpu_layers=1)
    assert got.token_seconds == [8.5, 8.5, 8.5] and got.hits == 3 and got.cpu_misses == 3
    # by default as many whole layers as the slots hold: 5 slots of 4 experts -> 1 layer
    assert static_split(TRACE, timings(slots=(3, 2))).seconds == 25.5


def test_settings_are_checked():
    with pytest.raises(SettingError, match="--cpu-experts"):
        Scenario("sometimes")
    with pytest.raises(SettingError, match="policy"):
        Scenario(policy="fifo")
    with pytest.raises(SettingError, match="slot counts"):
        simulate_timeline(TRACE, timings(slots=(1,)))
    with pytest.raises(SettingError, match="top-1"):
        simulate_timeline(TRACE, timings(slots=(0, 1)), Scenario("off", "lru"))


# ---- the real traces ---------------------------------------------------------------------------


@needs_traces
@pytest.mark.parametrize("policy, k", [("lru", 3), ("history", 4)])
def test_an_instant_link_gives_the_cache_simulators_hits(policy, k):
    """With copies that take no time, nothing is late and the link never holds a prefetch back:
    the timeline's slots must then be the cache simulator's (offload.trace.simulate), hit for
    hit and prefetch for prefetch."""
    from offload.trace import load_trace, simulate

    trace = load_trace(MIXTRAL_DECODE)
    costs = Costs(link_s=1e-12, gpu_s=1e-4, cpu_s=1.0, round_trip_s=0.0)
    t = Timings(1e-3, 1e-3, costs, (k,) * trace.num_layers)
    got = simulate_timeline(trace, t, Scenario("off", policy))
    want = simulate(trace, k, policy)
    assert (got.uses, got.hits, got.late, got.gpu_misses) == (want.uses, want.hits, 0, want.demand_loads)
    assert (got.prefetches, got.prefetch_used) == (want.prefetch_loads, want.prefetch_used)
    assert got.missing == 37 and got.tokens == 338


@needs_traces
def test_the_hybrid_beats_transfer_only_and_the_static_split_at_the_stated_12gb_numbers():
    from offload.timeline import SCENARIOS, STATED_PROFILES, timings_for_profile
    from offload.trace import load_trace

    trace = load_trace(MIXTRAL_DECODE)
    t = timings_for_profile(STATED_PROFILES["12gb"])
    # the stated numbers (README), at the profile's 4-bit widths (nf4-dq): a copy of an 86.67 MiB
    # record at 25 GB/s, the GPU at 360 x 0.6, the CPU at 65 x 0.6 GB/s, 0.1 ms round trip, 3-4
    # slots per layer (105: tests/test_profile.py's 3060 plan by hand)
    # one nf4-dq record: 3 matrices of 14336 x 4096, 4-bit codes, uint8 absmax a block of 64, fp32
    # nested absmax per 256 blocks, the 16- and 256-entry maps and the offset (padded to 64)
    record = 3 * (29_360_128 + 917_504 + 3_584 * 4 + 256 * 4 + 16 * 4 + 64)  # 90,879,360
    assert t.costs.link_s == pytest.approx(record / 25e9) and t.costs.cpu_s == pytest.approx(record / 39e9)
    assert t.costs.gpu_s == pytest.approx(record / 216e9, rel=0.01) and t.costs.round_trip_s == 1e-4
    assert set(t.layer_slots) == {3, 4} and sum(t.layer_slots) == 105 and t.host_experts is None
    rows = {name: simulate_timeline(trace, t, SCENARIOS[name]).tokens_per_s
            for name in ("a: lru", "a: history", "c: history", "c: history, admit", "d: history-evict, admit")}
    static = static_split(trace, t).tokens_per_s
    transfer = max(rows["a: lru"], rows["a: history"])
    for hybrid in ("c: history", "c: history, admit", "d: history-evict, admit"):
        assert rows[hybrid] >= max(transfer, static), (hybrid, rows, static)
