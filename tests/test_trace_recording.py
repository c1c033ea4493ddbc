"""`generate --trace`: what the engine records matches what it did."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings
from offload.trace import load_trace, prediction_quality


def test_trace_records_routing_predictions_and_outcomes(tmp_path):
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", experts_per_layer=4, ram=0, policy="lookahead")
    seen: list[tuple[int, torch.Tensor]] = []  # an independent observer of the routing
    engine.model.routing_observer = lambda layer, experts, _w: seen.append((layer, experts.clone()))
    ids = engine.tokenizer.encode("The :mod:`os` module provides", bos=True)
    path = tmp_path / "run.jsonl"
    gen = engine.generate(ids, GenerationSettings(max_new_tokens=30, ignore_eos=True, trace=path)).run()
    assert engine.model.routing_observer is not None  # the recorder put the observer back

    trace = load_trace(path)
    steps = trace.sequences[0].steps
    L = engine.config.num_hidden_layers
    assert trace.header.experts_per_layer == 4 and trace.header.policy == "lookahead"
    assert [s.phase for s in steps] == ["prefill"] * len(ids) + ["decode"] * (len(gen.tokens) - 1)
    assert [s.t for s in steps] == list(range(len(steps)))
    # routing: token by token, layer by layer, what the model chose
    per_layer = {layer: torch.cat([e for l2, e in seen if l2 == layer]) for layer in range(L)}
    for t, step in enumerate(steps):
        for layer in range(L):
            assert list(step.experts[layer]) == per_layer[layer][t].tolist()
    # outcomes: the decode steps' tallies equal the cache's own decode counters
    decode = [s for s in steps if s.phase == "decode"]
    counts = Counter(o for s in decode for row in s.outcome for o in row)
    stats = gen.cache_stats.total()
    assert counts["miss"] + counts["hit"] + counts["prefetched"] + counts["late"] == len(decode) * L * 2
    assert counts["prefetched"] + counts["late"] == stats.prefetch_used
    # predictions: gate look-ahead names experts for every layer but the first, and mostly right
    assert all(not s.predicted[0] and all(s.predicted[1:]) for s in decode)
    recalls = [prediction_quality(decode, layer)[0] for layer in range(1, L)]
    assert sum(recalls) / len(recalls) > 0.6


def test_a_failed_prefill_leaves_no_trace(tmp_path, monkeypatch):
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    path = tmp_path / "run.jsonl"

    def broken(_ids):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "prefill", broken)
    ids = engine.tokenizer.encode("x", bos=True)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(ids, GenerationSettings(max_new_tokens=2, trace=path)).run()
    assert not list(tmp_path.iterdir())  # neither the trace nor its temporary file


def test_a_recorded_trace_replays_its_own_routing(tmp_path):
    """--trace then --replay: the replaying engine routes every position as the recording did
    (experts exactly; gate weights as recorded, 4 decimals, renormalised), prompt included."""
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", experts_per_layer=3, policy="lru")
    ids = engine.tokenizer.encode("To open a file for reading, use", bos=True)
    first = tmp_path / "first.jsonl"
    engine.generate(ids, GenerationSettings(max_new_tokens=20, ignore_eos=True, trace=first)).run()
    replaying = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", experts_per_layer=3, replay=first)
    assert replaying.policy == "history"  # auto under replay: no gate look-ahead
    second = tmp_path / "second.jsonl"
    other = engine.tokenizer.encode("A list comprehension", bos=True)[: len(ids)]  # other text, same routing
    other += [5] * (len(ids) - len(other))
    replaying.generate(other, GenerationSettings(max_new_tokens=20, ignore_eos=True, trace=second)).run()
    a, b = (load_trace(p).sequences[0].steps for p in (first, second))
    assert len(a) == len(b) == len(ids) + 19
    for x, y in zip(a, b):
        assert x.experts == y.experts and x.phase == y.phase
        for wx, wy in zip(x.weights, y.weights):
            assert wy == pytest.approx([w / sum(wx) for w in wx], abs=1e-4)
