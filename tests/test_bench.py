"""`offload bench` and offload.bench: the sweep, the three outputs, decode-only cache numbers,
and one-line errors with exit 2."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from cli.bench import FIELDS, bench_command
from offload.bench import (
    BenchConfig,
    LengthLimits,
    bench_prompt,
    context_needed,
    fit_lengths,
    load,
    measure,
    random_ids,
    run_bench,
    sweep,
)
from offload.errors import SettingError
from offload.trace import TraceHeader, TraceWriter
from tests.model_builder import WINDOWED

runner = CliRunner()
app = typer.Typer(pretty_exceptions_enable=False)
app.command("bench")(bench_command)
app.command("other")(lambda: None)  # two commands, so "bench" is a subcommand as in cli.main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Timed runs on one thread: two OpenMP threads on a busy 2-core machine run ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*args: str):
    return runner.invoke(app, ["bench", *args])


def table_lines(stdout: str) -> tuple[list[str], str]:
    """The markdown table's lines, and the build line after it."""
    lines = stdout.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    rest = [line for line in lines if line.strip() and not line.startswith("|")]
    return table, rest[-1] if rest else ""


def test_sweep_is_the_cartesian_product():
    configs = sweep({"experts_per_layer": "2,4", "policy": "lru,combined", "vram": "4GiB, 8GiB", "ram": None})
    assert len(configs) == 8
    assert {(c.vram, c.experts_per_layer, c.policy) for c in configs} == {
        (v, e, p) for v in ("4GiB", "8GiB") for e in (2, 4) for p in ("lru", "combined")
    }
    assert all(c.ram is None and c.device == "auto" for c in configs)
    assert configs[0] == BenchConfig(vram="4GiB", experts_per_layer=2, policy="lru")
    assert sweep({}) == [BenchConfig()]
    assert sweep({"expert_bits": [4, 16, 4]}) == [BenchConfig(expert_bits=4), BenchConfig(expert_bits=16)]


@pytest.mark.parametrize(
    "options, culprit",
    [
        ({"experts_per_layer": "2,x"}, "--experts-per-layer 'x'"),
        ({"expert_bits": "3"}, "--expert-bits 3"),
        ({"vram": "lots"}, "--vram 'lots'"),
        ({"policy": "lru,fifo"}, "--policy 'fifo'"),
        ({"dtype": "int4"}, "--dtype 'int4'"),
        ({"ram": "1GiB,,2GiB"}, "--ram"),
    ],
)
def test_sweep_checks_every_value(options, culprit):
    with pytest.raises(SettingError, match=culprit.replace("(", r"\(")):
        sweep(options)


def test_prompt_is_seeded_bos_first_and_in_range():
    ids = bench_prompt(512, 16, seed=3)
    assert ids == bench_prompt(512, 16, seed=3) != bench_prompt(512, 16, seed=4)
    assert len(ids) == 16 and ids[0] == 1 and all(3 <= i < 512 for i in ids[1:])


def test_prompt_without_bos_and_without_special_ids():
    """A tokenizer with no bos (Qwen's) gets random ids only; special ids are drawn again; with a
    bos and nothing to skip the prompt is the one it always was (by hand: BOS, then randrange)."""
    import random

    def drawn(n: int, seed: int = 3) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(3, 512) for _ in range(n)]

    assert bench_prompt(512, 16, seed=3) == [1] + drawn(15)  # as it always was
    assert bench_prompt(512, 16, 3, bos_id=None) == random_ids(512, 16, 3) == drawn(16)
    assert bench_prompt(512, 0, 3, bos_id=None) == drawn(1) and bench_prompt(512, 0, 3) == [1]
    assert bench_prompt(512, 16, 3, skip={0, 1, 2}) == bench_prompt(512, 16, 3)  # Mixtral's specials: no change
    few = bench_prompt(8, 200, 0, bos_id=None, skip={5, 6, 7, 100})
    assert len(few) == 200 and set(few) == {3, 4}
    with pytest.raises(SettingError, match="vocabulary of 8 is too small"):
        bench_prompt(8, 4, 0, bos_id=None, skip={3, 4, 5, 6, 7})


def test_run_bench_decode_only_cache_numbers(model_dirs):
    d = model_dirs[WINDOWED.name]
    common = dict(prompt_tokens=16, gen_tokens=8, reps=2)
    full = run_bench(d, BenchConfig(experts_per_layer=8, ram="0", dtype="float32"), **common)
    tight = run_bench(d, BenchConfig(experts_per_layer=2, ram="0", dtype="float32"), **common)
    assert full.cache.hit_rate == 1.0 and full.cache.bytes_per_token == 0 and full.cache.stall_share == 0
    assert tight.cache.hit_rate < 1.0 and tight.cache.bytes_per_token > 0
    assert tight.cache.decode_steps == 2 * 8  # the warm-up is not counted
    for r in (full, tight):
        assert len(r.pp.values) == len(r.tg.values) == 2 and r.pp.mean > 0 and r.tg.mean > 0
        assert [row["test"] for row in r.rows()] == ["pp16", "tg8"]
        assert r.machine.startswith("CPU") or r.machine  # offload.device.device_name
    resident = run_bench(d, BenchConfig(dtype="float32"), prompt_tokens=8, gen_tokens=4, reps=1)
    assert resident.cache is None and resident.rows()[1]["hit_rate"] is None


SWEEP = ["-p", "16", "-n", "8", "-r", "2", "--experts-per-layer", "2,8", "--dtype", "float32"]


def test_json_rows(model_dirs):
    result = run(str(model_dirs[WINDOWED.name]), *SWEEP, "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 4
    assert [(r["experts_per_layer"], r["test"]) for r in rows] == [(2, "pp16"), (2, "tg8"), (8, "pp16"), (8, "tg8")]
    for r in rows:
        assert r["t_s_mean"] > 0 and r["t_s_std"] > 0 and r["reps"] == 2
        assert set(r) == set(FIELDS)
    assert rows[3]["hit_rate"] == 1.0 and rows[1]["hit_rate"] < 1.0
    assert rows[0]["hit_rate"] is None  # cache numbers are for the decode part
    assert "[1/2]" in result.stderr and "[2/2]" in result.stderr


def test_csv_and_markdown(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    as_csv = run(d, *SWEEP, "-o", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    table = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert table[0] == list(FIELDS) and len(table) == 5
    md = run(d, *SWEEP)
    assert md.exit_code == 0, md.output
    lines, build = table_lines(md.stdout)
    assert len(lines) == 2 + 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert build.startswith("build: offload ") and "torch" in build
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["model", "machine"] and "experts/layer" in header and "t/s" in header
    assert header[3:7] == ["size", "params", "weights", "threads"]
    assert "hit rate" in header and "stall %" in header and "MiB/token" in header
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[header.index("test")] for row in cells] == ["pp16", "tg8"] * 2
    assert all(" ± " in row[header.index("t/s")] for row in cells)
    assert cells[3][header.index("hit rate")] == "1.000"


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--experts-per-layer", "2,two"], "--experts-per-layer 'two'"),
        (["--vram", "4GiB,lots"], "--vram 'lots'"),
        (["--policy", "lru,nope"], "--policy 'nope'"),
        (["-p", "16,x"], "-p '16,x'"),
        (["-o", "xml"], "-o 'xml'"),
        (["-p", "0", "-n", "0"], "nothing to measure"),
        (["-r", "0"], "-r 0"),
        (["--experts-per-layer", "1"], "--experts-per-layer 1"),
        (["--profile", "no-such-card"], "profile 'no-such-card'"),
        (["--profile", "cpu-only,"], "--profile 'cpu-only,'"),
        (["--prefetch-depth", "0"], "--prefetch-depth 0"),
    ],
)
def test_bad_values_give_one_line_and_exit_2(args, culprit, model_dirs):
    result = run(str(model_dirs[WINDOWED.name]), "-p", "4", "-n", "2", "-r", "1", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.stderr


def test_the_profile_column(model_dirs, tmp_path):
    """--profile (a comma list) names each row's plan; without it, the automatic profile."""
    d = str(model_dirs[WINDOWED.name])
    common = ["-p", "4", "-n", "2", "-r", "1", "--dtype", "float32"]
    deep = tmp_path / "deep.toml"
    text = (Path(__file__).resolve().parents[1] / "profiles" / "cpu-only.toml").read_text()
    deep.write_text(text.replace("prefetch_depth = 1", "prefetch_depth = 2"))
    as_json = run(d, *common, "--profile", f"cpu-only,{deep}", "-o", "json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert [(r["profile"], r["prefetch_depth"], r["test"]) for r in rows] == [
        ("cpu-only", 1, "pp4"), ("cpu-only", 1, "tg2"), ("deep", 2, "pp4"), ("deep", 2, "tg2"),
    ]
    md = run(d, *common, "--profile", "cpu-only")
    assert md.exit_code == 0, md.output
    lines, _ = table_lines(md.stdout)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["model", "machine", "profile"]
    assert [line.strip("|").split("|")[2].strip() for line in lines[2:]] == ["cpu-only", "cpu-only"]
    auto = run(d, *common, "-o", "csv")
    assert auto.exit_code == 0, auto.output
    table = list(csv.DictReader(io.StringIO(auto.stdout)))
    assert all(r["profile"].endswith(" (auto)") for r in table) and len(table) == 2
    assert "profile " in auto.stderr and "(auto: best shipped profile" in auto.stderr


# ---- lengths that fit the model (and a replayed trace) -------------------------------------


def test_fit_lengths_shrinks_only_the_default_prompt():
    # the demo model's 2048 positions hold pp512 + tg128 (512 + 128 + 1 = 641): unchanged
    assert fit_lengths(None, None, LengthLimits(2048)) == ([512], [128], None)
    # 512 positions: the longest prompt with 128 decode passes is 512 - 128 - 1 = 383
    prompts, gens, note = fit_lengths(None, None, LengthLimits(512, "tiny"))
    assert (prompts, gens) == ([383], [128])
    assert note == "-p 383: pp512 with -n 128 needs a context of 641; tiny allows 512 (max_position_embeddings); " \
        "give -p to choose"
    # a trace of 83 tokens: prompt + decode passes <= 83, so -n 16 leaves 67 for the prompt
    limits = LengthLimits(2048, "demo", 83, "the replayed trace p0.jsonl")
    prompts, gens, note = fit_lengths(None, [16, 8], limits)
    assert (prompts, gens) == ([67], [16, 8]) and "p0.jsonl holds 83" in note
    assert fit_lengths(None, [82], limits)[:2] == ([1], [82])
    with pytest.raises(SettingError, match=r"^-n 128 \(the default\) leaves no room for a prompt: .* replays 129 "
                                           r"trace tokens; the replayed trace p0.jsonl holds 83; give -n 82 or less$"):
        fit_lengths(None, None, limits)
    with pytest.raises(SettingError, match=r"^-p 68 -n 16 replays 84 trace tokens; .* holds 83: lower -p or -n$"):
        fit_lengths([68], [16], limits)
    with pytest.raises(SettingError, match=r"^-p 400 -n 128 \(the default\) needs a context of 529; tiny allows 512"):
        fit_lengths([400], None, LengthLimits(512, "tiny"))
    assert fit_lengths([0, 16], [0, 4], LengthLimits(24)) == ([0, 16], [0, 4], None)  # 16 + 4 + 1 <= 24


def test_the_default_lengths_fit_a_512_position_model(model_dirs):
    d = str(model_dirs[WINDOWED.name])  # max_position_embeddings 512: pp512 + tg128 would need 641
    result = run(d, "-r", "1", "--dtype", "float32", "--experts-per-layer", "4", "-o", "json")
    assert result.exit_code == 0, result.output
    assert [(r["test"], r["n_prompt"], r["n_gen"]) for r in json.loads(result.stdout)] == [
        ("pp383", 383, 128), ("tg128", 383, 128),
    ]
    note = result.stderr.splitlines()[0]
    assert note.startswith("-p 383: pp512 with -n 128 needs a context of 641; windowed allows 512")


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "512", "-n", "8"], "-p 512 -n 8 needs a context of 521; windowed allows 512 (max_position_embeddings)"),
        (["-p", "16,400"], "-p 400 -n 128 (the default) needs a context of 529"),
        (["-n", "600"], "-n 600 leaves no room for a prompt"),
    ],
)
def test_lengths_given_that_do_not_fit_are_refused(model_dirs, args, message):
    result = run(str(model_dirs[WINDOWED.name]), "-r", "1", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def write_replay_trace(path: Path, tokens: int, layers: int = 3) -> Path:
    with TraceWriter(path, TraceHeader("t", layers, 8, 2)) as w:
        for t in range(tokens):
            w.write_token(t, "decode", [[t % 8, (t + 3) % 8]] * layers, [[0.75, 0.25]] * layers)
    return path


def test_bench_with_replay(model_dirs, tmp_path):
    d = str(model_dirs[WINDOWED.name])
    trace = write_replay_trace(tmp_path / "twenty.jsonl", 20)
    common = ["--replay", str(trace), "-n", "4", "-r", "1", "--dtype", "float32", "--experts-per-layer", "3"]
    result = run(d, *common, "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    # the prompt and the decode passes replay the trace: -p shrinks to 20 - 4 = 16
    assert [(r["test"], r["replay"], r["policy_used"]) for r in rows] == [
        ("pp16", str(trace), "history"), ("tg4", str(trace), "history"),
    ]
    assert "-p 16: pp512 with -n 4 replays 516 trace tokens; the replayed trace twenty.jsonl holds 20" in result.stderr
    md = run(d, *common)
    assert md.exit_code == 0, md.output
    lines, _ = table_lines(md.stdout)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "replay" in header
    assert [line.strip("|").split("|")[header.index("replay")].strip() for line in lines[2:]] == ["twenty.jsonl"] * 2
    too_long = run(d, *common, "-p", "17")
    assert too_long.exit_code == 2 and "-p 17 -n 4 replays 21 trace tokens" in too_long.stderr
    short = write_replay_trace(tmp_path / "short.jsonl", 20, layers=2)
    refused = run(d, "--replay", str(short), "-n", "4")
    assert refused.exit_code == 2 and "2 layers, fewer than the model's 3" in refused.stderr
    engine = load(d, BenchConfig(replay=str(trace), dtype="float32"), context_needed(16, 8))
    with pytest.raises(SettingError, match=r"-p 16 -n 8 replay 24 trace tokens; .*twenty.jsonl holds 20"):
        measure(engine, BenchConfig(replay=str(trace)), 16, 8, 1)


# ---- llama-bench's columns, -pg, -d and the spread warning ------------------------------------


def test_size_params_formats_threads_and_version_columns(model_dirs):
    from offload.bench import offload_version, parameter_count
    from offload.config import ModelConfig

    d = model_dirs[WINDOWED.name]
    result = run(str(d), "-p", "4", "-n", "2", "-r", "1", "--dtype", "float32", "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    config = ModelConfig.from_dir(d)
    for r in rows:
        assert r["model_bytes"] == weights > 0
        assert r["model_params"] == parameter_count(config)
        assert (r["expert_format"], r["attn_format"]) == ("float32", "float32")
        assert r["threads"] == torch.get_num_threads() and r["offload_version"] == offload_version()
        assert r["n_depth"] == 0 and r["t_s_min"] <= r["t_s_mean"] <= r["t_s_max"]
    # the parameter count by hand, from a real model's tensors
    from safetensors import safe_open

    total = 0
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    assert parameter_count(config) == total


def test_quantized_runs_name_their_formats(model_dirs):
    result = run(str(model_dirs[WINDOWED.name]), "-p", "4", "-n", "2", "-r", "1", "--expert-bits", "8", "-o", "csv")
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(io.StringIO(result.stdout)))
    assert row["expert_format"] == "int8" and row["attn_format"] == "bfloat16"


def test_pg_times_prompt_and_generation_together(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    result = run(d, "-pg", "8,4", "-r", "2", "--dtype", "float32", "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["test"] for r in rows] == ["pp8+tg4"]  # alone: only the pg test
    assert rows[0]["n_prompt"] == 8 and rows[0]["n_gen"] == 4 and rows[0]["t_s_mean"] > 0
    both = run(d, "-p", "8", "-n", "4", "-pg", "8,4", "--pg", "4,2", "-r", "1", "--dtype", "float32", "-o", "json")
    assert both.exit_code == 0, both.output
    assert [r["test"] for r in json.loads(both.stdout)] == ["pp8", "tg4", "pp8+tg4", "pp4+tg2"]
    for bad, message in ((["-pg", "8"], "-pg '8'"), (["-pg", "0,4"], ">= 1"), (["-pg", "500,20"], "-pg 500,20")):
        refused = run(d, *bad, "-r", "1")
        assert refused.exit_code == 2 and message in refused.stderr, refused.stderr


def test_measure_pg_is_the_whole_request_per_second(model_dirs):
    engine = load(model_dirs[WINDOWED.name], BenchConfig(dtype="float32"), context_needed(8, 4))
    try:
        r = measure(engine, BenchConfig(dtype="float32"), 8, 4, 2, combined=True)
    finally:
        engine.close()
    assert r.pp is None and r.tg is None and r.pg is not None and len(r.pg.values) == 2
    assert [row["test"] for row in r.rows()] == ["pp8+tg4"]


def test_depth_runs_with_tokens_already_in_the_kv_cache(model_dirs, monkeypatch):
    d = model_dirs[WINDOWED.name]
    config = BenchConfig(dtype="float32", experts_per_layer=2, ram="0")
    engine = load(d, config, context_needed(8, 4, depth=32))
    forwarded: list[int] = []
    lengths: list[int] = []
    real = engine.model.forward

    def spy(tokens, last_only=False):
        forwarded.append(int(tokens.shape[0]))
        lengths.append(engine.model.cache.length)
        return real(tokens, last_only=last_only)

    monkeypatch.setattr(engine.model, "forward", spy)
    try:
        r = measure(engine, config, 8, 4, 1, depth=32)
    finally:
        engine.close()
    # per request (warm-up, then one): 32 depth tokens, then 8 prompt tokens at position 32, then 4 decode passes
    assert forwarded == [32, 8, 1, 1, 1, 1] * 2
    assert lengths[1] == 32 and lengths[2] == 40
    assert [row["test"] for row in r.rows()] == ["pp8 @ d32", "tg4 @ d40"]
    assert r.rows()[0]["n_depth"] == 32 and r.tg.mean > 0 and r.cache.decode_steps == 4
    with pytest.raises(SettingError, match="at depth 500"):
        engine = load(d, config, 64)
        try:
            measure(engine, config, 8, 4, 1, depth=500)
        finally:
            engine.close()


def test_depth_flag_and_its_limit(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    result = run(d, "-p", "4", "-n", "2", "-d", "0,16", "-r", "1", "--dtype", "float32", "-o", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["test"], r["n_depth"]) for r in rows] == [
        ("pp4", "0"), ("tg2", "0"), ("pp4 @ d16", "16"), ("tg2 @ d20", "16"),
    ]
    too_deep = run(d, "-p", "4", "-n", "2", "-d", "100000", "-r", "1")
    assert too_deep.exit_code == 2 and "-d 100000" in too_deep.stderr


def test_a_noisy_result_gets_one_warning_line(model_dirs, monkeypatch):
    from cli.bench import noisy_rows, spread_warning

    rows = [dict(test="tg8", profile="cpu-only", t_s_spread=0.25), dict(test="pp16", profile="cpu-only", t_s_spread=0.02)]
    assert [r["test"] for r in noisy_rows(rows, 0.10)] == ["tg8"]
    line = spread_warning(rows, 0.10)
    assert line is not None and "\n" not in line and "tg8" in line and "25%" in line and "pp16" not in line
    assert spread_warning(rows, 0.5) is None
    # forced through the command: every timing but one the same, one far off
    import offload.bench as bench

    values = iter([0.1, 0.01] * 100)  # alternate prefill seconds: spread far above 10%
    real = bench._timed_at_depth

    def timed(engine, context_ids, ids, gen_tokens):
        prefill_s, decode_s, steps, after = real(engine, context_ids, ids, gen_tokens)
        return next(values), 0.05, steps, after

    monkeypatch.setattr(bench, "_timed_at_depth", timed)
    d = str(model_dirs[WINDOWED.name])
    result = run(d, "-p", "4", "-n", "2", "-d", "4", "-r", "3", "--dtype", "float32", "-o", "json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "pp4 @ d4" in warnings[0] and "tg2" not in warnings[0]
    rows = json.loads(result.stdout)
    assert rows[0]["t_s_spread"] > 0.10 and rows[1]["t_s_spread"] == 0
    quiet = run(d, "-p", "4", "-n", "2", "-d", "4", "-r", "3", "--dtype", "float32", "--spread-warn", "10")
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr


# ---- -b/--batch-size and --kv-bits (issue 17) -----------------------------------------------------


def test_batch_size_and_kv_bits_sweep_and_are_checked():
    configs = sweep({"kv_bits": "16,8", "batch_size": "64, 256"})
    assert [(c.kv_bits, c.batch_size) for c in configs] == [(16, 64), (16, 256), (8, 64), (8, 256)]
    assert "kv_bits" not in BenchConfig().load_kwargs() and "batch_size" not in BenchConfig().load_kwargs()
    assert BenchConfig(kv_bits=8, batch_size=64).load_kwargs()["batch_size"] == 64  # Engine.load's names
    with pytest.raises(SettingError, match=r"--kv-bits 4: choose one of 16, 8"):
        sweep({"kv_bits": "8,4"})
    with pytest.raises(SettingError, match=r"--batch-size 0: must be at least 1"):
        sweep({"batch_size": "0"})
    with pytest.raises(SettingError, match=r"--batch-size 'big'"):
        sweep({"batch_size": "big"})


def test_batch_size_sets_the_prompt_chunks_of_pp(model_dirs, monkeypatch):
    d = model_dirs[WINDOWED.name]
    config = BenchConfig(dtype="float32", experts_per_layer=2, ram="0", batch_size=4, kv_bits=8)
    engine = load(d, config, context_needed(16, 2))
    assert engine.prefill_chunk == 4 and engine.model.cache.bits == 8
    forwarded: list[int] = []
    real = engine.model.forward

    def spy(tokens, last_only=False):
        forwarded.append(int(tokens.shape[0]))
        return real(tokens, last_only=last_only)

    monkeypatch.setattr(engine.model, "forward", spy)
    try:
        r = measure(engine, config, 16, 2, 1)
    finally:
        engine.close()
    assert forwarded == [4, 4, 4, 4, 1, 1] * 2  # pp16 in four chunks of 4, then two decode passes; warm-up too
    row = r.rows()[0]
    assert (row["batch_size"], row["kv_bits"], row["batch_size_used"], row["kv_bits_used"]) == (4, 8, 4, 8)


def test_batch_size_and_kv_bits_columns(model_dirs):
    d = str(model_dirs[WINDOWED.name])
    args = ["-p", "8", "-n", "2", "-r", "1", "--dtype", "float32", "--experts-per-layer", "2"]
    result = run(d, *args, "-b", "4,8", "--kv-bits", "8", "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["batch_size"], r["test"]) for r in rows] == [(4, "pp8"), (4, "tg2"), (8, "pp8"), (8, "tg2")]
    assert [r["batch_size_used"] for r in rows] == [4, 4, 8, 8] and {r["kv_bits_used"] for r in rows} == {8}
    md = run(d, *args, "--batch-size", "4", "--kv-bits", "8")
    assert md.exit_code == 0, md.output
    lines, _ = table_lines(md.stdout)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[header.index("batch size")] == "4" and cells[header.index("kv bits")] == "8"
    plain, _ = table_lines(run(d, *args).stdout)
    assert "batch size" not in plain[0] and "kv bits" not in plain[0]  # shown when given
    bad = run(d, *args, "--kv-bits", "4")
    assert bad.exit_code == 2 and "--kv-bits 4: choose one of 16, 8" in bad.stderr
