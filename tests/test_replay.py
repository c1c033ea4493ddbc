"""`--replay` and `offload trace convert`: routing taken from a trace, exactly.

Oracles: the raw shared decode JSONL parsed here with ``json`` (not offload.trace), the plain
reference LRU of test_cache.py, ``offload.trace.simulate`` on the *source* trace (so the
converter is checked too), and the all-resident engine (the cache never changes a number).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.common import engine_options
from cli.main import app as main_app
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings
from offload.errors import OffloadError, SettingError
from offload.profile import load_profile
from offload.trace import (
    MIXTRAL_DECODE,
    Trace,
    TraceHeader,
    TraceWriter,
    convert_trace,
    load_trace,
    simulate,
)
from tests.test_cache import reference_lru

needs_traces = pytest.mark.skipif(not MIXTRAL_DECODE.exists(), reason="../shared/traces is not here")
runner = CliRunner()

DEMO_LAYERS, DEMO_EXPERTS, DEMO_TOP_K = 8, 8, 2  # offload/demo/model/config.json


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: two OpenMP threads on a busy 2-core machine can run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def raw_records(path: Path) -> dict[int, dict[int, list[dict]]]:
    """problem -> layer -> records in token_idx order, straight from the file."""
    out: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["problem_id"]][r["layer"]].append(r)
    for layers in out.values():
        for records in layers.values():
            records.sort(key=lambda r: r["token_idx"])
    return out


def full_layers(layers: dict[int, list[dict]]) -> list[int]:
    """Layers that lost no record (the traces' README: only these line up across layers)."""
    longest = max(len(r) for r in layers.values())
    return sorted(layer for layer, records in layers.items() if len(records) == longest)


@pytest.fixture(scope="module")
def raw():
    return raw_records(MIXTRAL_DECODE)


@pytest.fixture(scope="module")
def p0_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "p0.jsonl"
    convert_trace(MIXTRAL_DECODE, out, problem=0)
    return out


def random_trace(path: Path, tokens: int, layers: int = DEMO_LAYERS, experts: int = DEMO_EXPERTS,
                 top_k: int = DEMO_TOP_K, seed: int = 0) -> Path:
    """A seeded trace whose gate weights do not sum to 1 (so renormalising is visible)."""
    rng = random.Random(seed)
    with TraceWriter(path, TraceHeader("random", layers, experts, top_k)) as w:
        for t in range(tokens):
            chosen = [rng.sample(range(experts), top_k) for _ in range(layers)]
            weights = [[rng.randint(1, 9) / 10 for _ in range(top_k)] for _ in range(layers)]
            w.write_token(t, "prefill" if t < 3 else "decode", chosen, weights)
    return path


# ---- the converter -----------------------------------------------------------------------


@needs_traces
def test_converted_problem_equals_the_raw_records(raw, p0_trace):
    kept = full_layers(raw[0])
    assert len(kept) == 25  # the traces' README: problem 0 lines up in 25 of 32 layers
    trace = load_trace(p0_trace)
    h = trace.header
    assert (h.num_layers, h.num_experts, h.top_k, h.source_layers) == (25, 8, 2, tuple(kept))
    assert h.source == str(MIXTRAL_DECODE) and h.source_sequences == ("problem 0",)
    [seq] = trace.sequences
    assert len(seq.steps) == 83 and [s.t for s in seq.steps] == list(range(83))
    for j, layer in enumerate(kept):
        records = raw[0][layer]
        assert [s.experts[j] for s in seq.steps] == [tuple(r["experts"]) for r in records]
        assert [s.weights[j] for s in seq.steps] == [tuple(round(w, 4) for w in r["gating_probs"]) for r in records]


@needs_traces
def test_concatenated_problems_use_the_layers_complete_in_all(raw, tmp_path):
    done = convert_trace(MIXTRAL_DECODE, tmp_path / "all.jsonl")
    kept = sorted(set(full_layers(raw[0])) & set(full_layers(raw[1])))
    assert done.source_layers == tuple(kept) and done.concatenated and done.tokens == 83 + 255
    [seq] = load_trace(done.path).sequences
    for j, layer in enumerate(kept):
        expected = [tuple(r["experts"]) for r in raw[0][layer] + raw[1][layer]]
        assert [s.experts[j] for s in seq.steps] == expected


@needs_traces
def test_the_convert_command(tmp_path):
    out = tmp_path / "p0.jsonl"
    args = ["trace", "convert", str(MIXTRAL_DECODE), str(out), "--problem", "0"]
    result = runner.invoke(main_app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [
        f"wrote {out}: 83 tokens of problem 0; 25 of 32 layers kept "
        "(source layers 0-10,12,15-19,21-22,24-26,28-30)"
    ]
    first = out.read_text()
    again = runner.invoke(main_app, args)  # never replaced without --force
    assert again.exit_code == 2 and "already exists; give --force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and out.read_text() == first
    assert runner.invoke(main_app, [*args, "--force"]).exit_code == 0
    both = runner.invoke(main_app, ["trace", "convert", str(MIXTRAL_DECODE), str(tmp_path / "all.jsonl")])
    assert both.exit_code == 0 and "problem 0 + problem 1 (concatenated" in both.stdout
    assert "11 of 32 layers kept" in both.stdout
    for bad, message in (
        (["--problem", "7"], "--problem 7"),
        ([], "already exists"),
    ):
        result = runner.invoke(main_app, ["trace", "convert", str(MIXTRAL_DECODE), str(out), *bad])
        assert result.exit_code == 2 and message in result.stderr, result.output
    engine_format = runner.invoke(main_app, ["trace", "convert", str(out), str(tmp_path / "x.jsonl")])
    assert engine_format.exit_code == 2 and "already in the engine's trace format" in engine_format.stderr
    assert not (tmp_path / "x.jsonl").exists()


# ---- replay is exact ---------------------------------------------------------------------


@needs_traces
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("ram", ["0", None])
def test_engine_cache_counts_equal_the_simulator_on_the_source_trace(raw, p0_trace, policy, k, ram):
    engine = Engine.load(  # every miss loaded into a slot, as the simulator's cache does
        DEMO_MODEL_DIR, device="cpu", dtype="float32", experts_per_layer=k, ram=ram, policy=policy, replay=p0_trace,
        cpu_experts="off",
    )
    gen = engine.generate([engine.tokenizer.bos_id], GenerationSettings(max_new_tokens=83, ignore_eos=True)).run()
    assert len(gen.tokens) == 83 and gen.stats.decode_steps == 82  # 83 positions: the whole trace
    stats = engine.cache.stats.layers  # prefill + decode, since load
    source = load_trace(MIXTRAL_DECODE)
    problem0 = Trace(source.path, source.source, source.header, [source.sequences[0]])
    sim = simulate(problem0, k, policy)
    kept = full_layers(raw[0])[:DEMO_LAYERS]
    for j, layer in enumerate(kept):
        assert (stats[j].hits, stats[j].requests) == (sim.layer_hits[layer], sim.layer_uses[layer]), (j, layer)
        if policy == "lru":  # and a plain LRU over the raw records, served as the MoE block asks
            requests = [sorted(r["experts"]) for r in raw[0][layer]]
            assert (stats[j].hits, stats[j].misses) == reference_lru(requests, k)


def greedy_logits(engine: Engine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    logits = [engine.prefill(prompt)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(engine.decode(tokens[-1]))
    return tokens, logits


# every policy replay allows (look-ahead is refused), each at small and large budgets, RAM on and off
BUDGETS = [
    (2, "0", "lru"), (5, None, "lru"), (3, None, "lfu"), (6, "0", "lfu"),
    (2, None, "history"), (4, "0", "history"), (3, "0", "auto"), (8, None, "auto"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_is_bit_identical_under_every_budget_and_policy(tmp_path, dtype):
    path = random_trace(tmp_path / "r.jsonl", tokens=32)
    prompt = [1, 17, 230, 99]
    resident = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype=dtype, replay=path)
    assert resident.cache is None
    want_tokens, want_logits = greedy_logits(resident, prompt, 32 - len(prompt))
    plain = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype=dtype)
    assert not torch.equal(greedy_logits(plain, prompt, 0)[1][0], want_logits[0])  # the trace is used
    for k, ram, policy in BUDGETS:
        engine = Engine.load(
            DEMO_MODEL_DIR, device="cpu", dtype=dtype, experts_per_layer=k, ram=ram, policy=policy, replay=path
        )
        tokens, logits = greedy_logits(engine, prompt, 32 - len(prompt))
        assert tokens == want_tokens, (k, ram, policy)
        assert all(torch.equal(a, b) for a, b in zip(logits, want_logits)), (k, ram, policy)
        assert engine.cache.stats.total().misses > (0 if k < 8 else -1)
        assert engine.policy == (policy if policy != "auto" else "history")


def test_routing_follows_the_trace_position_by_position(tmp_path):
    path = random_trace(tmp_path / "r.jsonl", tokens=12, layers=DEMO_LAYERS + 2)  # more layers: the first 8
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", experts_per_layer=3, policy="lru", replay=path)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    engine.model.routing_observer = lambda layer, e, w: seen[layer].append((e.clone(), w.clone()))
    engine.generate([1, 5, 9, 200, 7], GenerationSettings(max_new_tokens=8, ignore_eos=True)).run()  # 5 + 7 = 12
    for layer in range(DEMO_LAYERS):
        experts = torch.cat([e for e, _ in seen[layer]])  # [12, K], prompt first
        weights = torch.cat([w for _, w in seen[layer]])
        assert experts.tolist() == [r["experts"][layer] for r in rows]
        raw_w = torch.tensor([r["weights"][layer] for r in rows], dtype=torch.float32)
        assert weights.dtype == torch.float32 and torch.equal(weights, raw_w / raw_w.sum(-1, keepdim=True))
        assert torch.allclose(weights.sum(-1), torch.ones(12))


def test_past_the_end_of_the_trace(tmp_path):
    path = random_trace(tmp_path / "r.jsonl", tokens=10)
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", replay=path)
    with pytest.raises(SettingError, match=r"holds 10 tokens; a 3-token prompt and 9 new tokens need 11: "
                                           r"lower -n/--max-tokens to 8 or less"):
        engine.generate([1, 2, 3], GenerationSettings(max_new_tokens=9))
    with pytest.raises(SettingError, match="the prompt alone takes 11; shorten the prompt"):
        engine.generate(list(range(1, 12)), GenerationSettings(max_new_tokens=1))
    gen = engine.generate([1, 2, 3], GenerationSettings(max_new_tokens=8, ignore_eos=True)).run()
    assert gen.stats.decode_steps == 7  # positions 0..9: all of it
    with pytest.raises(OffloadError) as info:  # the engine driven on directly: the routing refuses
        engine.decode(gen.tokens[-1])
    assert str(info.value) == f"{path}: the replayed trace holds 10 tokens (positions 0..9); position 10 asked for"


def test_traces_that_do_not_fit_the_model_are_refused_in_one_line(tmp_path):
    cases = [
        (random_trace(tmp_path / "short.jsonl", 4, layers=6), "6 layers, fewer than the model's 8"),
        (random_trace(tmp_path / "wide.jsonl", 4, experts=12), "12 experts per layer, the model has 8"),
        (random_trace(tmp_path / "top3.jsonl", 4, top_k=3), "top-3 routing, the model routes top-2"),
    ]
    empty = tmp_path / "empty.jsonl"
    TraceWriter(empty, TraceHeader("x", 8, 8, 2)).close()
    cases.append((empty, "holds no tokens"))
    shared = tmp_path / "shared.jsonl"
    shared.write_text('{"problem_id":0,"layer":0,"token_idx":0,"experts":[1,2],"gating_probs":[0.6,0.4]}\n')
    cases.append((shared, "convert this shared trace first: offload trace convert"))
    for path, message in cases:
        with pytest.raises(OffloadError, match=message) as info:
            Engine.load(DEMO_MODEL_DIR, device="cpu", replay=path)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(SettingError, match="--policy combined with --replay"):
        Engine.load(DEMO_MODEL_DIR, device="cpu", experts_per_layer=4, policy="combined", replay=cases[0][0])


def test_generate_replay_command(tmp_path):
    path = random_trace(tmp_path / "r.jsonl", tokens=20)
    ok = runner.invoke(main_app, ["generate", "-p", "x", "-n", "6", "--replay", str(path), "--ignore-eos",
                                  "--device", "cpu", "--json", "--experts-per-layer", "3"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert len(out["tokens"]) == 6 and out["cache"]["layers"]
    # a profile's look-ahead policy (cpu-only: combined) gives way to the replay default instead of
    # being refused; with the same weights the tokens do not change
    profiled = runner.invoke(main_app, ["generate", "-p", "x", "-n", "6", "--replay", str(path), "--ignore-eos",
                                        "--device", "cpu", "--json", "--profile", "cpu-only", "--dtype", "bfloat16",
                                        "--expert-bits", "16", "--attn-bits", "16"])
    assert profiled.exit_code == 0, profiled.output
    assert json.loads(profiled.stdout)["tokens"] == out["tokens"]
    combined = dataclasses.replace(load_profile("cpu-only"), policy="combined")
    assert engine_options(combined, replay=path, policy="auto")["policy"] == "auto"
    assert engine_options(combined, replay=path, policy="lru")["policy"] == "lru"
    assert engine_options(combined, replay=None, policy="auto")["policy"] == "combined"
    long = runner.invoke(main_app, ["generate", "-p", "x", "-n", "30", "--replay", str(path), "--device", "cpu"])
    assert long.exit_code == 2
    [line] = [ln for ln in long.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert "holds 20 tokens" in line and "lower -n/--max-tokens" in line
