"""Router traces and the cache simulator.

Oracles: hit counts worked out by hand (below, step by step), the reference LRU of
test_cache.py, an exhaustive search for the fewest misses (Belady must reach it), and the
reference figures of ../shared/traces/README.md on the real Mixtral-8x7B traces.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.simulate import simulate_command, stats_command
from offload.errors import OffloadError
from offload.trace import (
    MIXTRAL_ALIGNED,
    MIXTRAL_DECODE,
    Step,
    TokenSequence,
    Trace,
    TraceHeader,
    TraceWriter,
    load_trace,
    simulate,
)
from tests.test_cache import reference_lru

needs_traces = pytest.mark.skipif(not MIXTRAL_DECODE.exists(), reason="../shared/traces is not here")


def one_layer_trace(requests: list[list[int]], num_experts: int = 4, top_k: int = 2, *more: list[list[int]]) -> Trace:
    """A trace of one layer; each extra list of requests is another sequence."""
    sequences = []
    for n, reqs in enumerate([requests, *more]):
        steps = [Step(i, "decode", [tuple(r)], [tuple([1 / top_k] * top_k)]) for i, r in enumerate(reqs)]
        sequences.append(TokenSequence(f"seq {n}", steps, frozenset({0})))
    return Trace(Path("hand"), "offload", TraceHeader("hand", 1, num_experts, top_k), sequences)


# Eight steps of one layer, 4 experts, top-2, a cache of 3.
HAND = [[0, 1], [0, 2], [3, 1], [0, 3], [2, 1], [0, 1], [3, 2], [0, 3]]


def test_lru_by_hand():
    # LRU (a request's experts are used in ascending id, as the engine asks for them; the victim
    # is the least recently used expert that the request does not ask for):
    # 1 [0,1] miss miss            cache {0,1}                 recency, oldest first: 0 1
    # 2 [0,2] hit  miss            {0,1,2}                     recency: 1 0 2
    # 3 [1,3] 1 hit, 3 miss: evict 0 (1 is asked for)  {1,2,3} recency: 2 1 3
    # 4 [0,3] 0 miss: evict 2, 3 hit                   {0,1,3} recency: 1 0 3
    # 5 [1,2] 1 hit, 2 miss: evict 0                   {1,2,3} recency: 3 1 2
    # 6 [0,1] 0 miss: evict 3, 1 hit                   {0,1,2} recency: 2 0 1
    # 7 [2,3] 2 hit, 3 miss: evict 0                   {1,2,3} recency: 1 2 3
    # 8 [0,3] 0 miss: evict 1, 3 hit                   {0,2,3}
    # hits: 0+1+1+1+1+1+1+1 = 7 of 16
    result = simulate(one_layer_trace(HAND), 3, "lru")
    assert (result.hits, result.uses, result.demand_loads) == (7, 16, 9)
    assert reference_lru([sorted(r) for r in HAND], 3) == (7, 9)
    assert result.experts_loaded_per_token == 9 / 8
    assert result.prefetch_precision is None and result.prefetch_recall is None


def test_lfu_by_hand():
    # LFU (uses counted since the start, through evictions; ties by least recent use):
    # 1 [0,1] miss miss            {0,1}     counts 0:1 1:1
    # 2 [0,2] hit  miss            {0,1,2}   0:2 2:1
    # 3 [1,3] 1 hit; 3 miss: 0 has 2, 2 has 1 -> evict 2        {0,1,3}  1:2 3:1
    # 4 [0,3] hit hit                                             0:3 3:2
    # 5 [1,2] 1 hit; 2 miss: 0 has 3, 3 has 2 -> evict 3        {0,1,2}  1:3 2:2
    # 6 [0,1] hit hit                                             0:4 1:4
    # 7 [2,3] 2 hit; 3 miss: 0 and 1 have 4, 0 used longer ago -> evict 0   {1,2,3}  2:3 3:3
    # 8 [0,3] miss: 1 has 4, 2 has 3 -> evict 2; 3 hit          {0,1,3}
    # hits: 0+1+1+2+1+2+1+1 = 9 of 16
    result = simulate(one_layer_trace(HAND), 3, "lfu")
    assert (result.hits, result.uses) == (9, 16)


def test_belady_by_hand():
    # Belady (evict the expert, not asked for now, whose next request is farthest away):
    # 1 [0,1] miss miss            {0,1}
    # 2 [0,2] hit  miss            {0,1,2}
    # 3 [3,1] miss: 0 next at 4, 2 next at 5 -> evict 2; 1 hit  {0,1,3}
    # 4 [0,3] hit hit
    # 5 [2,1] miss: 0 next at 6, 3 next at 7 -> evict 3; 1 hit  {0,1,2}
    # 6 [0,1] hit hit
    # 7 [3,2] miss: 0 next at 8, 1 never -> evict 1; 2 hit      {0,2,3}
    # 8 [0,3] hit hit
    # hits: 0+1+1+2+1+2+1+2 = 10 of 16
    result = simulate(one_layer_trace(HAND), 3, "belady")
    assert (result.hits, result.uses) == (10, 16)


def test_a_request_is_served_in_ascending_expert_id_as_the_engine_asks():
    # The engine's MoE block asks its cache for a layer's experts in ascending id, whatever the
    # router's order; recency ties then follow that order. LRU, a cache of 3:
    # 1 [1,0] served 0, 1: miss miss        {0,1}    recency, oldest first: 0 1
    # 2 [2,3] 2 miss (a free slot), 3 miss: evict 0 (older than 1)   {1,2,3}
    # 3 [0,2] 0 miss: evict 1, 2 hit        -> 1 hit of 6
    # (served in trace order, 1 then 0, step 2 would evict 1 and step 3 hit both: 2 hits)
    result = simulate(one_layer_trace([[1, 0], [2, 3], [0, 2]]), 3, "lru")
    assert (result.hits, result.uses) == (1, 6)
    assert reference_lru([[0, 1], [2, 3], [0, 2]], 3) == (1, 5)


def test_each_sequence_starts_cold_and_layers_without_a_record_ask_for_nothing():
    trace = one_layer_trace(HAND, 4, 2, HAND)
    for policy, hits in (("lru", 7), ("lfu", None), ("belady", 10)):
        result = simulate(trace, 3, policy)
        assert result.uses == 32 and result.tokens == 16
        if hits is not None:
            assert result.hits == 2 * hits
    gaps = one_layer_trace(HAND)
    gaps.sequences[0].steps[1].experts[0] = None  # [0,2] unknown: 2 is never asked for
    # LRU: [0,1] m m {0,1}; [3,1] m h {0,1,3}; [0,3] h h; [2,1] m (evict 0) h;
    #      [0,1] m (evict 3) h; [3,2] m (evict 0) h; [0,3] m (evict 1) h -> 7 hits of 14
    result = simulate(gaps, 3, "lru")
    assert (result.hits, result.uses, result.tokens) == (7, 14, 8)


requests_strategy = st.lists(
    st.lists(st.integers(0, 5), min_size=2, max_size=2, unique=True), min_size=1, max_size=12
)


def fewest_misses(requests: list[list[int]], capacity: int) -> int:
    """Exhaustive search over every eviction choice of demand loading."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, resident: frozenset[int]) -> int:
        if i == len(requests):
            return 0
        request = frozenset(requests[i])
        missing = request - resident
        overflow = len(resident) + len(missing) - capacity
        options = [resident] if overflow <= 0 else [
            resident - frozenset(v) for v in itertools.combinations(sorted(resident - request), overflow)
        ]
        return len(missing) + min(best(i + 1, kept | request) for kept in options)

    return best(0, frozenset())


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy, capacity=st.integers(2, 5))
def test_lru_matches_the_reference_and_belady_is_optimal(requests, capacity):
    trace = one_layer_trace(requests, 6, 2)
    lru = simulate(trace, capacity, "lru")
    assert (lru.hits, lru.demand_loads) == reference_lru([sorted(r) for r in requests], capacity)
    belady = simulate(trace, capacity, "belady")
    assert belady.demand_loads == fewest_misses(requests, capacity)
    assert belady.hits >= max(lru.hits, simulate(trace, capacity, "lfu").hits)


def test_capacity_and_policy_are_checked():
    trace = one_layer_trace(HAND)
    with pytest.raises(OffloadError, match=r"\[2, 4\]"):
        simulate(trace, 1, "lru")
    with pytest.raises(OffloadError, match="choose one of lru, lfu, belady, history"):
        simulate(trace, 3, "mru")


# ---- the engine's format -----------------------------------------------------------------


HEADER = TraceHeader("tiny", num_layers=2, num_experts=4, top_k=2, experts_per_layer=3, policy="history")


def write_tokens(path: Path, tokens: int = 3, outcome: bool = True) -> Path:
    with TraceWriter(path, HEADER) as writer:
        for t in range(tokens):
            writer.write_token(
                t,
                "prefill" if t == 0 else "decode",
                experts=[[t % 4, (t + 1) % 4], [3, 0]],
                weights=[[0.712345678, 0.287654322], [0.5, 0.5]],
                predicted=[[], [3]] if t else None,
                outcome=[["miss", "hit"], ["prefetched", "late"]] if outcome else None,
            )
    return path


def test_writer_and_loader_round_trip(tmp_path):
    path = write_tokens(tmp_path / "run.trace.jsonl")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "offload-trace", "version": 1, **HEADER.__dict__}
    trace = load_trace(path)
    assert trace.header == HEADER and trace.source == "offload" and trace.aligned
    [seq] = trace.sequences
    assert [(s.t, s.phase) for s in seq.steps] == [(0, "prefill"), (1, "decode"), (2, "decode")]
    assert seq.steps[2].experts == [(2, 3), (3, 0)]
    assert seq.steps[1].weights[0] == (0.7123, 0.2877)  # rounded to 4 decimals
    assert seq.steps[0].predicted is None and seq.steps[1].predicted == [(), (3,)]
    assert seq.steps[1].outcome == [("miss", "hit"), ("prefetched", "late")]
    assert simulate(trace, 2, "lru").tokens == 2 and simulate(trace, 2, "lru", prefill=True).tokens == 3
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_a_converted_header_names_its_source_and_old_readers_fields_stay(tmp_path):
    header = TraceHeader("m", 2, 4, 2, source="src.jsonl", source_layers=(3, 7), source_sequences=("problem 0",))
    path = tmp_path / "c.jsonl"
    with TraceWriter(path, header) as writer:
        writer.write_token(0, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    first = json.loads(path.read_text().splitlines()[0])
    assert first["source_layers"] == [3, 7] and first["source"] == "src.jsonl"
    assert first["source_sequences"] == ["problem 0"]
    assert load_trace(path).header == header
    legacy = tmp_path / "legacy.jsonl"  # a header without the optional fields
    legacy.write_text(json.dumps({"format": "offload-trace", "version": 1, "model": "m", "num_layers": 2,
                                  "num_experts": 4, "top_k": 2}) + "\n" + GOOD + "\n")
    assert load_trace(legacy).header == TraceHeader("m", 2, 4, 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(first, source_layers=[3])) + "\n")
    with pytest.raises(OffloadError, match=r"bad.jsonl:1: header: \"source_layers\" must be a list of 2"):
        load_trace(bad)


def test_a_crash_leaves_no_trace_file(tmp_path):
    path = tmp_path / "crash.jsonl"
    with pytest.raises(RuntimeError):
        with TraceWriter(path, HEADER) as writer:
            writer.write_token(0, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
            raise RuntimeError("the engine died")
    assert list(tmp_path.iterdir()) == []
    writer = TraceWriter(path, HEADER)  # still open: the name is not there yet
    writer.write_token(0, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    assert not path.exists()
    writer.close()
    assert load_trace(path).tokens() == 1


HEAD = json.dumps(HEADER.to_dict())
GOOD = '{"t":0,"phase":"decode","experts":[[0,1],[2,3]],"weights":[[0.5,0.5],[0.5,0.5]],"predicted":[]}'


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("", None, "empty file"),
        ("hello\n", 1, "not JSON"),
        ('{"format":"offload-trace","version":2}\n', 1, "version 2 is newer"),
        (HEAD.replace('"top_k": 2', '"top_k": 9') + "\n", 1, "top_k 9 exceeds"),
        (HEAD.replace('"num_layers": 2', '"num_layers": "2"') + "\n", 1, "'num_layers' must be a positive integer"),
        (f"{HEAD}\n{GOOD}\n{GOOD[:40]}\n", 3, "not JSON"),
        (f"{HEAD}\n{GOOD.replace('[2,3]', '[2,3,1]')}\n", 2, "experts of layer 1: expected a list of 2"),
        (f"{HEAD}\n{GOOD.replace('[2,3]', '[2,7]')}\n", 2, r"integers in \[0, 4\)"),
        (f"{HEAD}\n{GOOD.replace('[2,3]', '[3,3]')}\n", 2, "chosen twice"),
        (f"{HEAD}\n{GOOD.replace('decode', 'thinking')}\n", 2, "phase"),
        (f"{HEAD}\n{GOOD.replace('[[0.5,0.5],[0.5,0.5]]', '[[0.5,0.5]]')}\n", 2, "'weights' must be a list of 2 layers"),
        (f"{HEAD}\n{GOOD[:-1]},\"outcome\":[[\"hit\",\"hit\"],[\"hit\",\"oops\"]]}}\n", 2, "outcome of layer 1"),
        ('{"problem_id":0,"layer":0,"token_idx":0,"experts":[1,2],"gating_probs":[0.5]}\n', 1, "gating_probs"),
        ('{"problem_id":0,"layer":0,"token_idx":0,"experts":[1,2],"gating_probs":[0.6,0.4]}\n'
         '{"problem_id":0,"layer":0,"token_idx":0,"experts":[1,3],"gating_probs":[0.6,0.4]}\n', 2, "appears twice"),
        ('{"model":"x"}\n', 1, "not a trace"),
    ],
)
def test_malformed_traces_fail_in_one_line_naming_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(OffloadError, match=message) as info:
        load_trace(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_missing_and_aligned_json_errors(tmp_path):
    with pytest.raises(OffloadError, match="no such trace file"):
        load_trace(tmp_path / "nope.jsonl")
    bad = tmp_path / "aligned.json"
    bad.write_text(json.dumps({"num_layers": 2, "num_experts": 4, "top_k": 2, "decode": [[None, {"experts": [1]}]]}))
    with pytest.raises(OffloadError, match=r"decode\[0\]\[1\] experts: expected a list of 2"):
        load_trace(bad)


# ---- the real traces ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def decode_trace() -> Trace:
    return load_trace(MIXTRAL_DECODE)


@needs_traces
def test_shared_jsonl_is_read_as_one_sequence_per_problem_and_not_aligned(decode_trace):
    t = decode_trace
    assert (t.num_layers, t.num_experts, t.top_k, t.source) == (32, 8, 2, "jsonl")
    assert not t.aligned
    assert [(s.name, len(s.steps), len(s.aligned_layers)) for s in t.sequences] == [
        ("problem 0", 83, 25), ("problem 1", 255, 12),
    ]
    p0 = t.sequences[0]
    assert 11 not in p0.aligned_layers and p0.steps[-1].experts[11] is None  # 82 records: a drop
    assert all(s.experts[0] is not None for s in p0.steps)


@needs_traces
def test_shared_aligned_json_keeps_its_nulls():
    t = load_trace(MIXTRAL_ALIGNED)
    assert t.aligned and t.source == "aligned-json"
    [seq] = t.sequences
    assert sum(s.phase == "prefill" for s in seq.steps) == 135 and t.tokens() == 83
    assert sum(e is None for s in seq.steps if s.phase == "decode" for e in s.experts) == 77
    assert seq.steps[135].experts[0] == (6, 5)  # decode step 0, as in the JSONL


README_FIGURES = {  # k: (LRU, LFU, Belady), ../shared/traces/README.md
    3: (0.515, 0.529, 0.620),
    4: (0.622, 0.639, 0.747),
    5: (0.718, 0.737, 0.834),
}


@needs_traces
@pytest.mark.parametrize("k", sorted(README_FIGURES))
def test_readme_reference_figures(decode_trace, k):
    # The shared README serves a step's experts in the router's order, the simulator (as the
    # engine) in ascending id; recency ties then differ, by at most 0.002 here.
    got = [simulate(decode_trace, k, p).hit_rate for p in ("lru", "lfu", "belady")]
    assert got == pytest.approx(README_FIGURES[k], abs=0.0025)
    assert got[2] == pytest.approx(README_FIGURES[k][2], abs=0.0005)  # Belady: order does not matter
    # a plain LRU over the same requests: in the router's order it gives the README's figure,
    # in ascending id exactly the simulator's hits
    in_order = ascending = uses = 0
    for seq in decode_trace.sequences:
        for layer in range(decode_trace.num_layers):
            requests = [list(r) for r in seq.layer_requests(layer)]
            uses += 2 * len(requests)
            in_order += reference_lru(requests, k)[0]
            ascending += reference_lru([sorted(r) for r in requests], k)[0]
    assert round(in_order / uses, 3) == README_FIGURES[k][0]
    assert ascending == simulate(decode_trace, k, "lru").hits


# ---- the commands, through a local app -----------------------------------------------------


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("simulate")(simulate_command)
app.command("stats")(stats_command)
runner = CliRunner()


def test_simulate_json_rows(tmp_path):
    path = write_tokens(tmp_path / "t.jsonl", tokens=12)
    result = runner.invoke(app, ["simulate", str(path), "-k", "2,3", "--policy", "lru,history", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["policy"], r["experts_per_layer"]) for r in rows] == [
        ("lru", 2), ("history", 2), ("belady", 2), ("lru", 3), ("history", 3), ("belady", 3),
    ]
    for r in rows:
        assert 0 <= r["hit_rate"] <= 1 and r["experts_loaded_per_token"] >= 0
    assert rows[0]["prefetch_precision"] is None and rows[1]["prefetch_precision"] is not None


def test_simulate_table_and_errors(tmp_path):
    path = write_tokens(tmp_path / "t.jsonl", tokens=12)
    result = runner.invoke(app, ["simulate", str(path), "-k", "3"])
    assert result.exit_code == 0, result.output
    for word in ("3 experts per layer", "lru", "lfu", "history", "belady (demand-loading bound)", "loaded/token",
                 "prefetch precision", "prefetch recall"):
        assert word in result.stdout
    # the caption says what the bound bounds, and that prefetching can beat it
    assert "loads an expert only when a layer asks for it" in result.stdout and "can beat it" in result.stdout
    assert "belady (bound)" not in result.stdout
    for args, message in (
        (["simulate", str(tmp_path / "none.jsonl")], "no such trace file"),
        (["simulate", str(path), "-k", "1"], r"must be in [2, 4]"),
        (["simulate", str(path), "-k", "two"], "comma list of integers"),
        (["simulate", str(path), "--policy", "lru,mru"], "--policy 'mru'"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_stats_from_outcomes_and_from_an_lru_replay(tmp_path):
    path = write_tokens(tmp_path / "t.jsonl", tokens=5)
    result = runner.invoke(app, ["stats", str(path)])
    assert result.exit_code == 0, result.output
    assert "recorded outcomes (4 tokens" in result.stdout
    # layer 1: prefetched + late per token -> hit rate 0.5; layer 0: miss + hit -> 0.5
    assert "share of each layer's uses" in result.stdout and "0.500" in result.stdout
    plain = write_tokens(tmp_path / "plain.jsonl", tokens=5, outcome=False)
    result = runner.invoke(app, ["stats", str(plain), "--prefill"])
    assert result.exit_code == 0, result.output
    assert "LRU replay, 3 experts per layer" in result.stdout
    result = runner.invoke(app, ["stats", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no such trace file" in result.stderr


def test_history_can_beat_the_demand_loading_bound_so_it_is_called_that():
    """At k=2 on the real routing a prefetching policy beats Belady: the label says demand loading."""
    path = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct" / "humaneval_p0_p1_decode.jsonl"
    if not path.is_file():
        pytest.skip("the shared traces are not here")
    trace = load_trace(path)
    assert simulate(trace, 2, "history").hit_rate > simulate(trace, 2, "belady").hit_rate


def test_stats_json_and_k(tmp_path):
    path = write_tokens(tmp_path / "t.jsonl", tokens=5)
    result = runner.invoke(app, ["stats", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"trace", "model", "num_layers", "num_experts", "top_k", "tokens", "recorded", "replay", "shares"} <= set(data)
    assert data["replay"] is None  # outcomes recorded and no -k: no replay
    recorded = data["recorded"]
    assert recorded["tokens"] == 4 and len(recorded["layers"]) == data["num_layers"]
    layer = recorded["layers"][1]
    assert layer["hit_rate"] == 0.5 and "prediction_recall" in layer and "prediction_precision" in layer
    assert "recall" not in layer  # the word says which recall
    assert len(data["shares"]) == data["num_layers"] and abs(sum(data["shares"][0]) - 1) < 1e-9
    # -k: an LRU replay at that capacity, beside the recorded outcomes, in JSON and in the table
    result = runner.invoke(app, ["stats", str(path), "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    replay = json.loads(result.stdout)["replay"]
    assert replay["experts_per_layer"] == 4 and replay["policy"] == "lru" and len(replay["layers"]) == 2
    full = simulate(load_trace(path), 4, "lru")
    assert replay["hit_rate"] == full.hit_rate
    result = runner.invoke(app, ["stats", str(path), "-k", "4"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "recorded outcomes" in out and "LRU replay, 4 experts per layer" in out
    assert "prediction recall" in out and "prediction precision" in out and "predicted recall" not in out
    result = runner.invoke(app, ["stats", str(path), "-k", "1"])
    assert result.exit_code == 2 and "must be in [2, 4]" in result.stderr
