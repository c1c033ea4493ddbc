"""The expert cache: bit-exact against the all-resident run, honest statistics, clear budgets.

The oracle for numbers is the same engine with every expert resident (itself checked against
transformers in test_equivalence.py); the oracle for hit rates is a plain reference LRU written
here, run over the routing the model actually produced.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload.device as device_layer
from offload.engine import Engine, GenerationSettings
from offload.errors import BudgetError, SettingError
from offload.experts.record import RecordLayout
from offload.pack import convert
from offload.plan import dense_bytes, kv_cache_bytes, parse_bytes
from tests.model_builder import SHAPES, WIDE, WINDOWED

PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    return parser"
NEW_TOKENS = 12


def run(engine: Engine, ids: list[int], n: int = NEW_TOKENS):
    gen = engine.generate(ids, GenerationSettings(max_new_tokens=n, ignore_eos=True)).run()
    return gen, engine.logits(ids)


@pytest.fixture(scope="module")
def resident(model_dirs):
    """shape -> dtype -> the all-resident engine (the reference)."""
    return {
        name: {dt: Engine.load(path, device="cpu", dtype=dt) for dt in ("float32", "bfloat16")}
        for name, path in model_dirs.items()
    }


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
@pytest.mark.parametrize("source", ["checkpoint", "pack"])
@pytest.mark.parametrize("ram", ["none", "some", "all"])
def test_every_device_budget_is_bit_identical(shape, source, ram, model_dirs, packs, resident):
    """From top-k slots to all, from the checkpoint and from a pack, with LRU and LFU."""
    path = model_dirs[shape] if source == "checkpoint" else packs[(shape, "float32")]
    ref = resident[shape]["float32"]
    c = ref.config
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    want_gen, want_logits = run(ref, ids)
    record = 3 * c.hidden_size * c.intermediate_size * 4
    ram_budget = {"none": 0, "some": 3 * record, "all": None}[ram]
    for slots in range(c.num_experts_per_tok, c.num_local_experts + 1):
        for cpu_experts in ("off", "auto"):  # misses copied into slots, or run where they lie in RAM
            policy = ("lru", "lfu", "lookahead", "history", "combined")[slots % 5]
            engine = Engine.load(
                path, device="cpu", dtype="float32", experts_per_layer=slots, ram=ram_budget, policy=policy,
                cpu_experts=cpu_experts,
            )
            what = f"{slots} slots, {policy}, cpu experts {cpu_experts}"
            gen, logits = run(engine, ids)
            assert gen.tokens == want_gen.tokens, what
            assert torch.equal(logits, want_logits), what
            total = gen.cache_stats.total()
            if slots < c.num_local_experts:
                assert total.misses > 0 and (total.hits > 0 or total.cpu_runs > 0), what
            # every miss run in place moves nothing; every other miss and every prefetch is one load
            loads = total.misses - total.cpu_runs + total.prefetches
            if ram == "none":
                assert total.cpu_runs == 0 and total.host_loads == 0 and total.disk_loads == loads, what
            if ram == "all" and slots < c.num_local_experts:
                assert total.disk_loads == 0 and total.host_loads == loads, what
                if cpu_experts == "auto":  # every miss ran on its RAM copy: nothing was copied
                    assert total.cpu_runs == total.misses and total.host_loads == 0, what


QUANTIZED = ["int8", "nf4", "nf4-dq", "fp4"]


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_budgets_policies_and_prompts_are_bit_identical(data, model_dirs, packs, resident):
    shape = data.draw(st.sampled_from([s.name for s in SHAPES]), label="shape")
    dtype = data.draw(st.sampled_from(["float32", "bfloat16"]), label="dtype")
    fmt = data.draw(st.sampled_from([None, *QUANTIZED]), label="expert format")
    from_pack = fmt is None and data.draw(st.booleans(), label="from pack")
    ref = resident[shape][dtype]
    if fmt is not None:  # the all-resident run of the same quantized model
        ref = Engine.load(model_dirs[shape], device="cpu", dtype=dtype, expert_format=fmt)
    c = ref.config
    slots = data.draw(st.integers(c.num_experts_per_tok, c.num_local_experts), label="slots")
    policy = data.draw(st.sampled_from(["lru", "lfu", "lookahead", "history", "combined", "auto"]), label="policy")
    record = RecordLayout.for_config(c, fmt or dtype).nbytes
    ram_records = data.draw(st.one_of(st.none(), st.integers(0, c.num_hidden_layers * c.num_local_experts)), label="ram")
    ids = [1] + data.draw(st.lists(st.integers(3, c.vocab_size - 1), min_size=1, max_size=40), label="prompt")
    n = data.draw(st.integers(1, 10), label="tokens")
    depth = data.draw(st.integers(1, c.num_hidden_layers), label="prefetch depth")
    # every load on the loader thread (as experts of real size go), or only small ones inline
    threaded = data.draw(st.booleans(), label="loads on the loader thread")
    # a --vram budget buys slots for the whole model: the share left over goes to some layers
    uneven = data.draw(st.booleans(), label="a --vram budget (uneven slots)")
    budget = {"experts_per_layer": slots}
    if uneven:
        L = c.num_hidden_layers
        n = data.draw(st.integers(L * c.num_experts_per_tok, L * c.num_local_experts), label="device slots")
        context = min(c.max_position_embeddings, 4096)
        budget = {"vram": dense_bytes(c, ref.dtype) + kv_cache_bytes(c, context, ref.dtype) + n * record}
    cpu_experts = data.draw(st.sampled_from(["off", "auto", "all"]), label="cpu experts")
    engine = Engine.load(
        packs[(shape, dtype)] if from_pack else model_dirs[shape], device="cpu", dtype=dtype, **budget,
        ram=None if ram_records is None else ram_records * record, policy=policy, expert_format=fmt,
        prefetch_depth=depth, cpu_experts=cpu_experts,
    )
    if uneven:
        assert sum(engine.cache.capacity) == n
    if engine.model.prefetcher is not None:  # CUDA's order: prefetches start once the experts are queued
        engine.model.prefetcher.defer = data.draw(st.booleans(), label="defer prefetch")
    # CUDA's disk path: reads into staging (a prefetch's on the loader thread), then a copy
    engine.cache.transfers.staged = data.draw(st.booleans(), label="staged disk reads")
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0 if threaded else device_layer.ASYNC_MIN_BYTES):
        gen, logits = run(engine, ids, n)
    engine.close()
    want_gen, want_logits = run(ref, ids, n)
    assert gen.tokens == want_gen.tokens
    assert torch.equal(logits, want_logits)


def reference_lru(requests: list[list[int]], capacity: int) -> tuple[int, int]:
    """Plain LRU over one layer's requests; a request's experts never evict each other."""
    cache: list[int] = []  # least recently used first
    hits = misses = 0
    for request in requests:
        for expert in request:
            if expert in cache:
                hits += 1
                cache.remove(expert)
            else:
                misses += 1
                if len(cache) == capacity:
                    cache.remove(next(e for e in cache if e not in request))
            cache.append(expert)
    return hits, misses


@pytest.mark.parametrize("shape, slots", [(WINDOWED.name, 3), (WINDOWED.name, 5), (WIDE.name, 4), (WIDE.name, 7)])
def test_hit_rates_equal_a_reference_lru_over_the_same_routing(shape, slots, model_dirs):
    engine = Engine.load(model_dirs[shape], device="cpu", dtype="float32", experts_per_layer=slots, ram=0, policy="lru")
    c = engine.config
    requests: dict[int, list[list[int]]] = {layer: [] for layer in range(c.num_hidden_layers)}

    def observe(layer, experts, _weights):
        needed = sorted(set(experts.reshape(-1).tolist()))  # what the MoE block asks for, in order,
        for i in range(0, len(needed), slots):  # in calls of at most `slots` experts
            requests[layer].append(needed[i : i + slots])

    engine.model.routing_observer = observe
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    gen = engine.generate(ids, GenerationSettings(max_new_tokens=40, ignore_eos=True)).run()
    for layer, stats in enumerate(gen.cache_stats.layers):
        hits, misses = reference_lru(requests[layer], slots)
        assert (stats.hits, stats.misses) == (hits, misses), f"layer {layer}"
        assert stats.disk_bytes == stats.disk_loads * engine.cache.layout.nbytes
    assert 0 < gen.cache_stats.total().hit_rate < 1


def test_statistics_count_bytes_and_stall(model_dirs):
    engine = Engine.load(  # every miss copied into a slot (the link's path), from RAM or from disk
        model_dirs[WIDE.name], device="cpu", dtype="float32", experts_per_layer=3, ram="1MiB", policy="lru",
        cpu_experts="off",
    )
    record = engine.cache.layout.nbytes
    assert engine.plan.host_experts == parse_bytes("1MiB") // record
    gen = engine.generate(engine.tokenizer.encode(PROMPT, bos=True), GenerationSettings(max_new_tokens=8)).run()
    total = gen.cache_stats.total()
    assert total.host_loads + total.disk_loads == total.misses > 0
    assert total.host_bytes == total.host_loads * record and total.disk_bytes == total.disk_loads * record
    assert total.host_loads > 0 and total.disk_loads > 0
    assert total.stall_seconds > 0
    # the engine-wide counters include this request's
    assert engine.cache.stats.total().misses >= total.misses


def test_vram_budget_sets_slots_and_refuses_below_the_minimum(model_dirs):
    path = model_dirs[WINDOWED.name]
    probe = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=2)
    c, record = probe.config, probe.cache.layout.nbytes
    fixed = dense_bytes(c, torch.float32) + kv_cache_bytes(c, 256, torch.float32)
    minimum = fixed + c.num_hidden_layers * c.num_experts_per_tok * record
    five = fixed + c.num_hidden_layers * 5 * record + record  # room for 5 per layer and one more, not 6
    engine = Engine.load(path, device="cpu", dtype="float32", context_length=256, vram=five)
    assert engine.plan.slots_per_layer == 5
    assert sorted(engine.plan.layer_slots) == [5] * (c.num_hidden_layers - 1) + [6]  # the spare slot is used
    assert engine.cache.slots.storage.shape[0] == 5 * c.num_hidden_layers + 1
    assert engine.cache.capacity == list(engine.plan.layer_slots)
    with pytest.raises(BudgetError, match=r"below the minimum .*top-2 experts"):
        Engine.load(path, device="cpu", dtype="float32", context_length=256, vram=minimum - 1)
    assert Engine.load(path, device="cpu", dtype="float32", context_length=256, vram=minimum).plan.slots_per_layer == 2
    with pytest.raises(BudgetError, match=r"\[2, 8\]"):
        Engine.load(path, device="cpu", dtype="float32", experts_per_layer=1)
    with pytest.raises(SettingError, match="expected a size"):
        Engine.load(path, device="cpu", dtype="float32", vram="lots")
    with pytest.raises(SettingError, match="--policy"):
        Engine.load(path, device="cpu", dtype="float32", experts_per_layer=2, policy="mru")
    from offload.experts.policy import DEFAULT_POLICY

    assert DEFAULT_POLICY == "combined"


def test_slots_are_allocated_once(model_dirs):
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=3, ram=0)
    storage = engine.cache.slots.storage
    pointer = storage.data_ptr()
    engine.generate(engine.tokenizer.encode(PROMPT, bos=True), GenerationSettings(max_new_tokens=6)).run()
    assert engine.cache.slots.storage.data_ptr() == pointer
    for w in engine.cache.slots.weights:  # every expert view points into the one pool
        assert storage.data_ptr() <= w.w1.data_ptr() < storage.data_ptr() + storage.numel()


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
def test_a_pack_runs_exactly_like_its_checkpoint(shape, packs, resident):
    ref = resident[shape]["bfloat16"]
    engine = Engine.load(packs[(shape, "bfloat16")], device="cpu")  # dtype: the pack's own
    assert engine.dtype == torch.bfloat16 and engine.cache is None
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    assert torch.equal(engine.logits(ids), ref.logits(ids))
    with pytest.raises(SettingError, match="holds bfloat16 experts"):
        Engine.load(packs[(shape, "bfloat16")], device="cpu", dtype="float32")


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_quantized_pack_through_the_cache_is_bit_identical(fmt, model_dirs, tmp_path):
    """A pack of quantized experts, read through the cache with a disk tier, gives exactly the
    all-resident run of the same quantized model."""
    path = model_dirs[WIDE.name]
    pack = convert(path, tmp_path / "pack", expert_format=fmt)
    ref = Engine.load(path, device="cpu", dtype="float32", expert_format=fmt)
    engine = Engine.load(pack, device="cpu", dtype="float32", experts_per_layer=4, ram=0)
    assert engine.cache.layout.fmt.name == fmt
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    want_gen, want_logits = run(ref, ids)
    gen, logits = run(engine, ids)
    assert gen.tokens == want_gen.tokens and torch.equal(logits, want_logits)
    assert gen.cache_stats.total().disk_loads > 0
    with pytest.raises(SettingError, match=f"holds {fmt} experts"):
        Engine.load(pack, device="cpu", expert_format="int8" if fmt != "int8" else "nf4")


def test_ram_tier_is_a_fixed_set_that_keeps_serving(model_dirs):
    """RAM holds the first experts in layer-major order for the whole run: their misses are
    always RAM loads, the others' always disk reads (an LRU RAM tier would churn instead)."""
    engine = Engine.load(model_dirs[WIDE.name], device="cpu", dtype="float32", experts_per_layer=3, ram=0)
    record = engine.cache.layout.nbytes
    experts = engine.config.num_local_experts
    engine = Engine.load(  # misses copied into slots, as over a link
        model_dirs[WIDE.name], device="cpu", dtype="float32", experts_per_layer=3, ram=experts * record, policy="lru",
        cpu_experts="off",
    )
    assert engine.plan.host_experts == experts  # exactly layer 0
    gen = engine.generate(engine.tokenizer.encode(PROMPT, bos=True), GenerationSettings(max_new_tokens=30)).run()
    first, *rest = gen.cache_stats.layers
    assert first.misses > 0 and first.host_loads == first.misses and first.disk_loads == 0
    for layer in rest:
        assert layer.misses > 0 and layer.disk_loads == layer.misses and layer.host_loads == 0


def test_gate_lookahead_prefetch_beats_lru_on_the_demo_model():
    """50% of experts resident, every miss from disk: gate look-ahead prefetching makes more
    expert uses resident in time than LRU alone, with exact tokens, for a bounded byte cost."""
    from offload.demo import DEMO_MODEL_DIR

    ref = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "python-docs-valid.txt").read_text()
    ids = ref.tokenizer.encode(text[:2000], bos=True)[:64]
    settings = GenerationSettings(max_new_tokens=80, ignore_eos=True)
    want = ref.generate(ids, settings).run().tokens
    half = ref.config.num_local_experts // 2
    runs = {}
    for policy in ("lru", "lookahead", "history", "combined", "auto"):
        engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", experts_per_layer=half, ram=0, policy=policy)
        gen = engine.generate(ids, settings).run()
        assert gen.tokens == want
        runs[policy] = gen.cache_stats.total()
    lru, ahead, history = runs["lru"], runs["lookahead"], runs["history"]
    in_time = lambda s: (s.hits - s.late) / s.requests  # noqa: E731  resident when needed, no wait
    assert in_time(runs["auto"]) > in_time(lru) + 0.03  # the default policy
    assert history.hit_rate > lru.hit_rate  # router history alone helps too
    assert runs["combined"].hit_rate > max(ahead.hit_rate, history.hit_rate) - 0.01
    assert lru.prefetches == 0 and ahead.prefetches > 0
    assert ahead.hit_rate > lru.hit_rate + 0.02
    precision = ahead.prefetch_used / ahead.prefetches
    assert precision > 0.5
    loads = lambda s: s.host_loads + s.disk_loads  # noqa: E731
    assert loads(ahead) <= 1.5 * loads(lru)


def test_a_prefetch_never_evicts_another_prediction_or_another_layer(model_dirs):
    engine = Engine.load(model_dirs[WIDE.name], device="cpu", dtype="float32", experts_per_layer=3, ram=0, policy="lru")
    cache = engine.cache
    assert cache.prefetch(1, [0, 1, 2]) == 3
    assert cache.resident(1) == [0, 1, 2] and cache.resident(0) == [] and cache.resident(2) == []
    assert cache.prefetch(1, [3]) == 0  # every slot holds an unused prediction: nothing is evicted
    assert cache.resident(1) == [0, 1, 2]
    cache.get(1, [0])  # a prediction used: its slot may now go
    assert cache.prefetch(1, [3]) == 1
    assert 3 in cache.resident(1) and {1, 2} <= set(cache.resident(1))
    stats = cache.stats.layers[1]
    assert (stats.prefetches, stats.prefetch_used, stats.hits, stats.misses) == (4, 1, 1, 0)


def test_gate_lookahead_ranks_each_coming_layer_as_its_router_would(model_dirs):
    """The folded, unnormalised look-ahead ranks layer L+d's experts exactly as that layer's
    router does on the normalised state (oracle: the model's own rms_norm and route)."""
    from offload.experts.prefetch import Lookahead
    from offload.model import rms_norm, route

    engine = Engine.load(model_dirs[WIDE.name], device="cpu", dtype="float32")
    c, dense = engine.config, engine.model.dense
    torch.manual_seed(0)
    for lw in dense.layers:  # norm weights unlike each other and unlike 1, so folding them matters
        lw.post_attention_layernorm.copy_(torch.rand(c.hidden_size) * 2 + 0.1)
    for depth in (1, 2, c.num_hidden_layers):
        ahead = Lookahead(c, dense, depth)
        for layer in range(c.num_hidden_layers):
            hidden = torch.randn(3, c.hidden_size)  # [T, D]; the last row is used
            picks = ahead.top(layer, hidden, c.num_experts_per_tok)
            want_layers = list(range(layer + 1, min(layer + depth, c.num_hidden_layers - 1) + 1))
            assert sorted(picks) == want_layers
            for target in want_layers:
                lw = dense.layers[target]
                x = rms_norm(hidden[-1:], lw.post_attention_layernorm, c.rms_norm_eps)
                experts, _ = route(x, lw.router, c.num_experts_per_tok)
                assert picks[target] == experts[0].tolist()


def test_deferred_prefetch_makes_the_same_cache_decisions(model_dirs):
    """CUDA starts prefetches once a layer's experts are queued, CPU before they run: with
    loads that finish at once, both orders load, hit and miss exactly alike."""
    stats = []
    for defer in (False, True):
        engine = Engine.load(
            model_dirs[WIDE.name], device="cpu", dtype="float32", experts_per_layer=4, ram=0, policy="combined",
            prefetch_depth=2,
        )
        engine.model.prefetcher.defer = defer
        ids = [1] + list(range(5, 30))
        gen = engine.generate(ids, GenerationSettings(max_new_tokens=24, ignore_eos=True)).run()
        stats.append((gen.tokens, [(s.hits, s.misses, s.prefetches, s.prefetch_used) for s in gen.cache_stats.layers]))
    assert stats[0] == stats[1]
    assert sum(p for *_, p in stats[0][1]) > 0  # something was prefetched and used


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "loader-thread"])
def test_a_failed_load_raises_where_it_is_used_and_leaves_nothing_stale(threaded, packs, resident):
    """A read that fails (after scribbling on the slot, as a short read would) raises when its
    expert is asked for, whether it ran inline or on the loader thread, and the slot is
    forgotten: once reads work again, the next load brings the real bytes and runs are exact."""
    shape, dtype = WIDE.name, "float32"
    engine = Engine.load(packs[(shape, dtype)], device="cpu", dtype=dtype, experts_per_layer=3, ram=0, policy="lru")
    cache = engine.cache
    real = cache.source.read_record
    broken = {"on": True}

    def flaky(layer, expert, out):
        if broken["on"]:
            out[: cache.layout.nbytes].fill_(7)
            raise OSError("simulated read error")
        return real(layer, expert, out)

    cache.source.read_record = flaky
    threshold = 0 if threaded else device_layer.ASYNC_MIN_BYTES
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", threshold):
        if threaded:
            assert cache.prefetch(1, [0, 1]) == 2  # queued: the error waits for the use
            cache.close()  # both loads have failed by now, before anything asks for them
        else:
            with pytest.raises(OSError, match="simulated"):
                cache.prefetch(1, [0, 1])  # inline: raised at once
        with pytest.raises(OSError, match="simulated"):
            cache.get(1, [0, 1])
        assert 0 not in cache.where[1] and 1 not in cache.where[1]
        broken["on"] = False
        weights = cache.get(1, [0, 1])
        record = torch.empty(cache.layout.nbytes, dtype=torch.uint8)
        for expert, w in zip((0, 1), weights):
            real(1, expert, record)
            assert torch.equal(w.w1, cache.layout.views(record).w1) and torch.equal(w.w2, cache.layout.views(record).w2)
        ids = [1] + list(range(7, 40))
        gen, logits = run(engine, ids, 8)
    want_gen, want_logits = run(resident[shape][dtype], ids, 8)
    assert gen.tokens == want_gen.tokens and torch.equal(logits, want_logits)
    engine.close()


def test_staged_disk_reads_run_off_the_calling_thread_and_demand_loads_never_wait_behind_them(packs, resident):
    """CUDA's disk path, played on a CPU (``staged``): a prefetch's disk read runs on the loader
    thread into staging, so the caller goes on; a demand miss read while that prefetch's read is
    stuck completes at once, on the calling thread; the slot of each holds the right bytes."""
    import threading

    shape, dtype = WIDE.name, "float32"
    engine = Engine.load(packs[(shape, dtype)], device="cpu", dtype=dtype, experts_per_layer=3, ram=0, policy="lru")
    cache = engine.cache
    cache.transfers.staged = True
    real = cache.source.read_record
    gate, threads = threading.Event(), {}

    slots = cache.slots.storage
    first, last = slots.data_ptr(), slots.data_ptr() + slots.numel()
    into_slot = []

    def traced(layer, expert, out):
        threads[(layer, expert)] = threading.current_thread().name
        into_slot.append(first <= out.data_ptr() < last)
        if (layer, expert) == (1, 0):
            assert gate.wait(10), "the prefetch's read was never released"
        return real(layer, expert, out)

    cache.source.read_record = traced
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0):
        assert cache.prefetch(1, [0]) == 1  # returns at once: its read waits on the loader thread
        weights = cache.get(2, [4, 5])  # demand misses, read here while the loader is stuck
        assert threads[(2, 4)] == threads[(2, 5)] == threading.current_thread().name
        gate.set()
        (prefetched,) = cache.get(1, [0])
    assert threads[(1, 0)].startswith("offload-loader")
    assert into_slot == [False, False, False]  # every read went to staging, then was copied
    record = torch.empty(cache.layout.nbytes, dtype=torch.uint8)
    for (layer, expert), w in zip(((2, 4), (2, 5), (1, 0)), (*weights, prefetched)):
        want = cache.layout.views(real(layer, expert, record))
        assert torch.equal(w.w1, want.w1) and torch.equal(w.w3, want.w3) and torch.equal(w.w2, want.w2)
    engine.close()


def test_the_ram_tier_is_allocated_in_the_plans_blocks(model_dirs, resident):
    """The RAM tier takes one buffer per block of the plan (pinned on CUDA, where one block of
    every record would be rounded up to a power of two), and serves each record from its row."""
    from offload.experts.tiers import HostTier

    layout = RecordLayout.for_config(resident[WIDE.name]["float32"].config, "float32")
    tier = HostTier(layout, 7, torch.device("cpu"), chunk_rows=[4, 2, 1])
    assert [tuple(b.shape) for b in tier.buffers] == [(4, layout.nbytes), (2, layout.nbytes), (1, layout.nbytes)]
    rows = [tier.add((0, e)) for e in range(7)]
    for e, row in enumerate(rows):
        row.fill_(e)
    assert [int(tier.get((0, e))[0]) for e in range(7)] == list(range(7))  # no two records share a row
    assert tier.nbytes == 7 * layout.nbytes
    with pytest.raises(ValueError, match="do not hold"):
        HostTier(layout, 7, torch.device("cpu"), chunk_rows=[4, 2])


def test_slots_are_fitted_to_the_free_device_memory_at_load(model_dirs, resident):
    """Where the device reports its free memory (CUDA), a plan that does not fit what is free
    once the dense weights and the KV cache are in place gets fewer slots, with a note naming
    the numbers, and still gives the all-resident tokens. (On a CPU the engine asks nothing;
    the device layer's answer is replaced here.)"""
    import offload.engine as engine_module

    shape, dtype = WIDE.name, "float32"
    ref = resident[shape][dtype]
    c = ref.config
    record = RecordLayout.for_config(c, dtype).nbytes
    L = c.num_hidden_layers
    free = L * 3 * record + record // 2  # room for 3 slots per layer, not the 5 asked for
    with mock.patch.object(engine_module, "memory_info", return_value=(free, 10 * free)):
        engine = Engine.load(model_dirs[shape], device="cpu", dtype=dtype, experts_per_layer=5, ram=0, policy="lru")
    assert engine.cache.capacity == [3] * L and sum(engine.plan.layer_slots) == 3 * L
    assert len(engine.notes) == 1 and "not the planned" in engine.notes[0] and str(3 * L) in engine.notes[0]
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    gen, logits = run(engine, ids)
    want_gen, want_logits = run(ref, ids)
    assert gen.tokens == want_gen.tokens and torch.equal(logits, want_logits)
    with mock.patch.object(engine_module, "memory_info", return_value=(record, 10 * record)):
        with pytest.raises(BudgetError, match=f"holds 1 expert slots .* top-{c.num_experts_per_tok} for each"):
            Engine.load(model_dirs[shape], device="cpu", dtype=dtype, experts_per_layer=5, ram=0)


def test_a_prefetch_still_queued_when_asked_for_is_loaded_at_once(packs, resident):
    """A predicted expert whose prefetch still waits on the loader behind another is not waited
    for: it is cancelled and loaded on the calling thread (counted once, as a late prefetch), so
    compute never waits behind a speculative load it did not ask for."""
    import threading

    shape, dtype = WIDE.name, "float32"
    engine = Engine.load(packs[(shape, dtype)], device="cpu", dtype=dtype, experts_per_layer=3, ram=0, policy="lru")
    cache = engine.cache
    real = cache.source.read_record
    gate = threading.Event()

    def slow_first(layer, expert, out):
        if (layer, expert) == (1, 0):
            assert gate.wait(10), "the blocked prefetch was never released"
        return real(layer, expert, out)

    cache.source.read_record = slow_first
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0):
        assert cache.prefetch(1, [0, 1]) == 2  # expert 1 queued behind the blocked expert 0
        (w,) = cache.get(1, [1])  # returns while expert 0's read is still stuck
        assert not gate.is_set()
        gate.set()
        cache.close()  # expert 0's read has landed before it is asked for
        cache.get(1, [0])
    stats = cache.stats.layers[1]
    assert (stats.hits, stats.misses, stats.late, stats.disk_loads) == (2, 0, 1, 2)  # expert 1 read once
    record = torch.empty(cache.layout.nbytes, dtype=torch.uint8)
    want = cache.layout.views(real(1, 1, record))
    assert torch.equal(w.w1, want.w1) and torch.equal(w.w2, want.w2)
    engine.close()


@pytest.mark.parametrize("source", ["checkpoint", "pack"])
def test_misses_split_between_the_cpu_side_and_the_link_are_bit_identical(source, model_dirs, packs, resident):
    """A CPU device plays both sides: half the misses run on their RAM copy (the CPU side), half
    are copied into a slot and run there (the link's path), alternately; tokens and logits are
    the all-resident run's, and the counters say which went where."""
    shape, dtype = WIDE.name, "float32"
    ref = resident[shape][dtype]
    path = model_dirs[shape] if source == "checkpoint" else packs[(shape, dtype)]
    engine = Engine.load(path, device="cpu", dtype=dtype, experts_per_layer=3, policy="lru", cpu_experts="auto")
    turn = {"n": 0}

    def alternate(layer, misses, cache, tokens=1):
        picked = [e for i, e in enumerate(misses) if (turn["n"] + i) % 2 == 0]
        turn["n"] += len(misses)
        return picked

    engine.cache.placer = alternate
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    gen, logits = run(engine, ids)
    want_gen, want_logits = run(ref, ids)
    assert gen.tokens == want_gen.tokens and torch.equal(logits, want_logits)
    total = gen.cache_stats.total()
    assert total.cpu_runs > 0 and total.host_loads > 0  # both sides ran
    assert abs(total.cpu_runs - total.host_loads) <= total.misses // 4 + 2
    assert total.cpu_runs + total.host_loads == total.misses  # every miss was in RAM: one side each
    assert total.cpu_seconds > 0


def test_a_miss_run_on_the_cpu_is_admitted_into_a_slot_when_the_link_is_idle(packs, resident):
    """With admission (CUDA's "auto"; switched on here on a CPU device), a miss that ran on its
    RAM copy is also copied into a slot in the background, never while another prefetch is on
    the link, never evicting the current request's experts, so the next use is a hit; numbers
    stay the all-resident run's."""
    import threading

    shape, dtype = WIDE.name, "float32"
    engine = Engine.load(packs[(shape, dtype)], device="cpu", dtype=dtype, experts_per_layer=3, policy="lru",
                         cpu_experts="auto")
    cache = engine.cache
    cache.placer = lambda layer, misses, cache, tokens=1: misses  # every miss in RAM to the CPU side
    cache.admit = True
    cache.get(1, [0, 1, 2])
    assert cache.last_sides == ["cpu"] * 3 and len(cache.resident(1)) == 1  # one admitted at a time
    admitted = cache.resident(1)[0]
    cache.close()
    cache.get(1, [admitted])
    assert cache.last_outcomes == ["prefetched"]  # served from its slot
    gate = threading.Event()
    real = cache.source.read_record

    def slow(layer, expert, out):
        if (layer, expert) == (2, 5):
            assert gate.wait(10)
        return real(layer, expert, out)

    cache.source.read_record = slow
    with mock.patch.object(device_layer, "ASYNC_MIN_BYTES", 0), mock.patch.object(cache.host, "rows", {
        k: v for k, v in cache.host.rows.items() if k != (2, 5)  # (2, 5) from disk: a slow prefetch
    }):
        cache.prefetch(2, [5])  # a prefetch on the link...
        cache.get(0, [7])  # ...so this CPU-side miss is not admitted
        assert cache.last_sides == ["cpu"] and cache.resident(0) == []
        gate.set()
        cache.close()
    cache.source.read_record = real
    ids = resident[shape][dtype].tokenizer.encode(PROMPT, bos=True)
    cache.close()
    gen, logits = run(engine, ids)
    want_gen, want_logits = run(resident[shape][dtype], ids)
    assert gen.tokens == want_gen.tokens and torch.equal(logits, want_logits)
    assert gen.cache_stats.total().hits > 0  # admitted experts served later uses
