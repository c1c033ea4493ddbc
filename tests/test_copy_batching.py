"""Batched expert moves: a call's misses come over in as few copies as the slots allow.

Over a synthetic 128-expert top-8 model (the shape of the many-small-experts families), on the
CPU, with every miss copied into a slot (``cpu_experts="off"``, the link's path). The oracles are
written here, independently of the cache: the record bytes come from packing known weights; the
RAM tier's rows are computed from its documented fill order (layer-major, in the plan's blocks);
residency is a reference LRU/LFU over the same requests; numbers are an all-resident provider's.
Copies are counted, never timed.
"""

from __future__ import annotations

import random
import threading
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import offload.device as device_layer
from offload.config import ModelConfig
from offload.device import Transfers
from offload.experts.cache import ExpertCache, pair_runs
from offload.experts.record import RecordLayout
from offload.model import ExpertWeights, moe_decode

CONFIG = ModelConfig.from_dict({
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 128,
    "num_experts_per_tok": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "tie_word_embeddings": False,
})
L, E, K = CONFIG.num_hidden_layers, CONFIG.num_local_experts, CONFIG.num_experts_per_tok
LAYOUT = RecordLayout.for_config(CONFIG, "float32")
CPU = torch.device("cpu")


def _records() -> torch.Tensor:
    """[L, E, record bytes]: every expert's record, packed from seeded random weights."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros((L, E, LAYOUT.nbytes), dtype=torch.uint8)
    I, D = CONFIG.intermediate_size, CONFIG.hidden_size
    for layer in range(L):
        for expert in range(E):
            w1, w3, w2 = (torch.randn(shape, generator=g) for shape in ((I, D), (I, D), (D, I)))
            LAYOUT.pack(ExpertWeights(w1, w3, w2), out[layer, expert])
    return out


RECORDS = _records()


class Source:
    """Records from memory (the pack's role), counting reads; ``fail`` names experts whose read
    scribbles on the buffer and raises."""

    def __init__(self):
        self.reads = 0
        self.fail: set[tuple[int, int]] = set()

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor:
        self.reads += 1
        if (layer, expert) in self.fail:
            out[: LAYOUT.nbytes].fill_(7)
            raise OSError("simulated read error")
        out[: LAYOUT.nbytes].copy_(RECORDS[layer, expert])
        return out[: LAYOUT.nbytes]


class Resident:
    """The all-resident provider: every expert's views over its own record."""

    max_experts_per_call = E

    def __init__(self):
        self.views = [[LAYOUT.views(RECORDS[layer, e]) for e in range(E)] for layer in range(L)]

    def get(self, layer, experts, tokens=1):
        return [self.views[layer][e] for e in experts]


def make_cache(slots, host=L * E, policy="lru", batch=True, chunks=None, source=None):
    return ExpertCache(
        source or Source(), LAYOUT, L, E, K, CPU, slots, host, policy=policy, host_chunks=chunks,
        cpu_experts="off", batch_moves=batch,
    )


def ram_runs(layer: int, experts, host: int, chunks=None) -> int:
    """Runs of consecutive RAM rows among ``experts`` of ``layer`` (those RAM holds): the tier is
    filled layer-major, row l * E + e, split into blocks of ``chunks`` rows (one block without)."""
    bounds, edge = [], 0
    for n in chunks or [host]:
        edge += n
        bounds.append(edge)
    block_of = lambda row: next(i for i, b in enumerate(bounds) if row < b)  # noqa: E731
    rows = sorted(layer * E + e for e in experts if layer * E + e < host)
    return sum(1 for i, r in enumerate(rows) if i == 0 or r != rows[i - 1] + 1 or block_of(r) != block_of(r - 1))


def same_bytes(weights, layer, experts) -> bool:
    want = [LAYOUT.views(RECORDS[layer, e]) for e in experts]
    return all(torch.equal(a, b) for w, v in zip(weights, want) for a, b in zip(w, v))


# ---- copies per call ----------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one copy each"])
def test_misses_into_contiguous_free_slots_are_one_copy(batch):
    cache = make_cache(16, batch=batch)
    experts = list(range(10, 18))
    weights = cache.get(0, experts)
    stats = cache.stats.layers[0]
    assert (stats.misses, stats.host_loads, stats.host_copies) == (8, 8, 1 if batch else 8)
    assert stats.disk_reads == 0 and stats.copies == stats.host_copies
    assert same_bytes(weights, 0, experts)
    assert cache.last_outcomes == ["miss"] * 8


def test_copies_follow_the_runs_of_consecutive_records():
    cache = make_cache(16)
    experts = [3, 50, 51, 52, 90, 91, 120, 7]  # runs {3} {7} {50-52} {90-91} {120}
    weights = cache.get(1, experts)
    assert cache.stats.layers[1].host_copies == 5 == ram_runs(1, experts, L * E)
    assert same_bytes(weights, 1, experts)
    # the same run split by a block boundary of the RAM tier: one copy per block
    chunks = [100, 156]
    cache = make_cache(16, chunks=chunks)
    experts = [96, 97, 98, 99, 100, 101, 102, 103]
    weights = cache.get(0, experts)
    assert cache.stats.layers[0].host_copies == 2 == ram_runs(0, experts, L * E, chunks)
    assert same_bytes(weights, 0, experts)


def test_the_victims_slots_batch_too_and_the_victims_are_the_policys():
    """Slots full: the misses take the policy's victims, and when those slots are consecutive the
    misses still come over in one copy."""
    cache = make_cache(8)
    cache.get(0, list(range(8)))
    weights = cache.get(0, list(range(8, 16)))  # evicts all eight: slots 0..7
    stats = cache.stats.layers[0]
    assert cache.resident(0) == list(range(8, 16))
    assert (stats.misses, stats.host_copies) == (16, 2)
    assert same_bytes(weights, 0, range(8, 16))
    cache = make_cache(10)  # LRU: 0 and 1 are the oldest, 2..9 were used since
    cache.get(0, list(range(8)))
    cache.get(0, [8, 9, 2, 3, 4, 5, 6, 7])
    weights = cache.get(0, [2, 3, 4, 5, 6, 7, 40, 41])  # 40 and 41 evict 0 and 1, the least recent
    assert cache.resident(0) == [2, 3, 4, 5, 6, 7, 8, 9, 40, 41]
    assert cache.stats.layers[0].host_copies == 3  # 0..7, then 8-9, then 40-41 into 0's and 1's slots
    assert same_bytes(weights, 0, [2, 3, 4, 5, 6, 7, 40, 41])


def test_disk_misses_are_one_read_each_and_ram_misses_still_batch():
    source = Source()
    cache = make_cache(16, host=E + 64, source=source)  # layer 1: experts 0..63 in RAM, the rest on disk
    reads_at_start = source.reads
    experts = [1, 2, 3, 4, 70, 71, 72, 100]
    weights = cache.get(1, experts)
    stats = cache.stats.layers[1]
    assert (stats.host_loads, stats.host_copies) == (4, 1)
    assert stats.disk_loads == stats.disk_reads == 4 == source.reads - reads_at_start
    assert stats.copies == 5 <= stats.misses == 8
    assert same_bytes(weights, 1, experts)


def test_a_failed_read_in_a_batched_move_leaves_nothing_stale():
    """One disk read of a call fails after scribbling on its slot: the call raises, that expert
    and every expert given a slot whose load never started are forgotten (their slots hold other
    bytes), the RAM copies that landed stay; once reads work, everything is exact."""
    source = Source()
    cache = make_cache(8, host=E + 64, source=source)
    cache.get(1, list(range(8)))  # full: the next misses evict
    source.fail = {(1, 70)}
    experts = [0, 1, 10, 11, 70, 71, 72, 73]
    with pytest.raises(OSError, match="simulated"):
        cache.get(1, experts)
    assert not {70, 71, 72, 73} & set(cache.resident(1))
    assert len(cache.resident(1)) <= 8 and cache.free[1]  # the forgotten slots are free again
    source.fail = set()
    weights = cache.get(1, experts)
    assert same_bytes(weights, 1, experts)
    assert cache.resident(1) == sorted(experts)


def test_misses_take_a_run_of_free_slots_when_the_free_list_has_a_gap():
    """A failed prefetch frees a slot between resident ones; the next call's misses skip that
    gap for a run of free slots that holds them all, and come over in one copy."""
    source = Source()
    cache = make_cache(16, host=E + 64, source=source)  # layer 1: 0..63 in RAM, 64.. on disk
    source.fail = {(1, 71)}
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0):
        assert cache.prefetch(1, [70, 71, 72]) == 3  # slots 0, 1, 2, on the loader thread
        cache.close()
    with pytest.raises(OSError, match="simulated"):
        cache.get(1, [71])  # slot 1 is free again, between 70's and 72's
    assert cache.resident(1) == [70, 72]
    before = cache.stats.copy()
    weights = cache.get(1, [20, 21, 22])
    assert cache.stats.since(before).layers[1].host_copies == 1
    assert same_bytes(weights, 1, [20, 21, 22])
    source.fail = set()
    assert same_bytes(cache.get(1, [70, 71, 72]), 1, [70, 71, 72])


def test_pair_runs_puts_runs_of_records_into_runs_of_slots():
    assert pair_runs([(0, 1), (0, 2), (0, 3), (0, 9)], [4, 7, 8, 9, 20]) == [7, 8, 9, 4]
    assert pair_runs([(0, 5), (1, 6)], [3, 2]) == [2, 3]  # different blocks: any two slots
    assert pair_runs([(0, 1), (0, 2), (0, 3)], [10, 11, 30]) == [10, 11, 30]  # split over the longest


@given(
    sources=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), unique=True, max_size=20),
    extra=st.lists(st.integers(0, 200), unique=True, max_size=30),
)
def test_pair_runs_gives_distinct_slots_from_those_offered(sources, extra):
    sources = sorted(sources)
    slots = sorted(set(extra) | set(range(300, 300 + len(sources))))
    out = pair_runs(sources, slots)
    assert len(out) == len(sources) == len(set(out)) and set(out) <= set(slots)


# ---- the device layer's batched copy ---------------------------------------------------------------

def test_copy_runs_is_one_load_for_several_runs():
    transfers = Transfers(CPU)
    dst = torch.zeros((6, 1024), dtype=torch.uint8)  # [slots, bytes]
    src = torch.arange(6 * 1024, dtype=torch.int64).to(torch.uint8).reshape(6, 1024)
    assert transfers.copy_runs([(dst[0:2], src[3:5]), (dst[4:5], src[0:1])], needed_now=True) is None
    assert torch.equal(dst[0:2], src[3:5]) and torch.equal(dst[4], src[0]) and not dst[2:4].any()
    gate = threading.Event()
    transfers.fill(lambda: gate.wait(5), 1 << 30)  # the loader is busy
    queued = transfers.copy(dst[5], src[5])  # a queued load into slot 5...
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0):
        handle = transfers.copy_runs([(dst[5:6], src[2:3])], needed_now=True, previous=[queued])
    assert handle is None and queued.cancelled()  # ...cancelled: it can never land after this one
    assert torch.equal(dst[5], src[2])
    gate.set()
    transfers.close()
    with pytest.raises(ValueError, match="same size"):
        transfers.copy_runs([(dst[0:2], src[0:3])])


# ---- random routing: exact bytes, the policy's residency, counters that add up --------------------

def reference_residency(requests, capacity: int, policy: str) -> tuple[list[set[int]], int, int]:
    """One layer's residency after each request, and hits and misses, under plain LRU or LFU
    (ties: least recent, then lowest id); a request's experts never evict each other."""
    clock, last, uses, resident = 0, {}, {}, set()
    after, hits, misses = [], 0, 0
    for request in requests:
        for e in request:
            clock += 1
            last[e] = clock
            uses[e] = uses.get(e, 0) + 1
        for e in request:
            if e in resident:
                hits += 1
                continue
            misses += 1
            if len(resident) == capacity:
                rank = (lambda v: (last[v], v)) if policy == "lru" else (lambda v: (uses[v], last[v], v))
                resident.remove(min((v for v in resident if v not in request), key=rank))
            resident.add(e)
        after.append(set(resident))
    return after, hits, misses


def routing(seed: int, mode: str, tokens: int) -> list[list[list[int]]]:
    """[token][layer] -> K distinct experts: uniform, Zipf-skewed over a shuffled ranking, or
    windows of neighbouring ids (runs of consecutive records)."""
    rng = random.Random(seed)
    ranking = list(range(E))
    rng.shuffle(ranking)
    zipf = [1.0 / (r + 1) ** 1.1 for r in range(E)]
    out = []
    for _ in range(tokens):
        step = []
        for _ in range(L):
            if mode == "uniform":
                picked = rng.sample(range(E), K)
            elif mode == "zipf":
                picked = []
                while len(picked) < K:
                    e = ranking[rng.choices(range(E), weights=zipf)[0]]
                    if e not in picked:
                        picked.append(e)
            else:
                start = rng.randrange(E - 2 * K)
                picked = rng.sample(range(start, start + 2 * K), K)
            step.append(picked)
        out.append(step)
    return out


@settings(max_examples=30, deadline=None)
@given(
    slots=st.integers(K, E),
    host=st.sampled_from([0, 40, E, E + 77, L * E]),
    chunked=st.booleans(),
    policy=st.sampled_from(["lru", "lfu"]),
    batch=st.booleans(),
    mode=st.sampled_from(["uniform", "zipf", "windows"]),
    seed=st.integers(0, 2**16),
    tokens=st.integers(1, 10),
)
def test_random_routing_is_bit_identical_and_the_counters_add_up(
    slots, host, chunked, policy, batch, mode, seed, tokens
):
    chunks = [host // 3, host - host // 3] if chunked and host >= 3 else None
    cache = make_cache(slots, host=host, policy=policy, batch=batch, chunks=chunks)
    resident = Resident()
    torch.manual_seed(seed)
    plan = routing(seed, mode, tokens)
    requests = {layer: [] for layer in range(L)}
    for step in plan:
        for layer, ids in enumerate(step):
            x = torch.randn(1, CONFIG.hidden_size)  # [1, D]
            gates = torch.rand(1, K)  # [1, K] fp32
            before = cache.stats.copy()
            free = slots - len(cache.resident(layer))  # never-used slots, one run (nothing failed)
            misses = [e for e in ids if e not in cache.where[layer]]
            out = moe_decode(x, ids, gates, cache, layer)
            assert torch.equal(out, moe_decode(x, ids, gates, resident, layer))
            assert same_bytes(cache.get(layer, sorted(ids)), layer, sorted(ids))  # hits now, same bytes
            call = cache.stats.since(before).layers[layer]
            requests[layer] += [sorted(ids), sorted(ids)]
            assert call.misses == len(misses) and call.host_loads + call.disk_loads == len(misses)
            assert call.copies <= len(misses) and (call.copies > 0) == (len(misses) > 0)
            in_ram = ram_runs(layer, misses, host, chunks)
            if not batch:
                assert call.host_copies == call.host_loads
            elif free >= len(misses):  # free slots hold them all: one copy per run of RAM rows
                assert call.host_copies == in_ram
            else:
                assert in_ram <= call.host_copies <= call.host_loads
    stats = cache.stats
    for layer in range(L):
        want_after, hits, misses = reference_residency(requests[layer], slots, policy)
        assert cache.resident(layer) == sorted(want_after[-1])
        s = stats.layers[layer]
        assert (s.hits, s.misses) == (hits, misses)
        assert s.host_loads + s.disk_loads == s.misses and s.disk_reads == s.disk_loads
        assert s.host_bytes == s.host_loads * LAYOUT.nbytes and s.disk_bytes == s.disk_loads * LAYOUT.nbytes
        assert s.host_copies <= s.host_loads
    report = stats.to_dict()
    total = stats.total()
    assert report["copies"] == report["host_copies"] + report["disk_reads"] == total.copies
    assert report["host_copies"] == sum(s.host_copies for s in stats.layers)
    assert all(layer["copies"] == layer["host_copies"] + layer["disk_reads"] for layer in report["layers"])


@settings(max_examples=15, deadline=None)
@given(
    slots=st.integers(K, 24),
    host=st.sampled_from([0, E + 50, L * E]),
    seed=st.integers(0, 2**16),
    threaded=st.booleans(),
)
def test_prefetches_between_batched_gets_keep_results_exact(slots, host, seed, threaded):
    """Prefetches (one load each, on the loader thread when ``threaded``) into the slots a later
    batched get uses: the bytes served are always the record's."""
    cache = make_cache(slots, host=host)
    rng = random.Random(seed)
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0 if threaded else device_layer.ASYNC_MIN_BYTES):
        for step in routing(seed, "windows", 6):
            for layer, ids in enumerate(step):
                cache.prefetch(1 - layer, rng.sample(range(E), rng.randrange(1, K + 1)))
                assert same_bytes(cache.get(layer, ids), layer, ids)
    cache.close()
    total = cache.stats.total()
    assert total.host_loads + total.disk_loads == total.misses + total.prefetches
    assert total.copies <= total.host_loads + total.disk_loads
