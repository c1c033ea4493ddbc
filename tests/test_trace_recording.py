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
