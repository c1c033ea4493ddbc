"""Every command on the new families: the pieces built for Mixtral (cache, trace, replay, stats,
simulate, convert, quantized packs, bench, info, serve) run unchanged on Qwen2-MoE (its shared
expert) and Qwen3-MoE (128-expert style routing, top-k > 2). Tokens are checked against
transformers' own greedy decode; counts against what the trace must hold."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.family_builder import QWEN2, QWEN3, load_family_reference, write_family
from tests.test_equivalence import hf_greedy

runner = CliRunner()
PROMPT = "def parse_args(argv):"
TOKENS = 8


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", params=[QWEN2, QWEN3], ids=lambda s: s.name)
def family(request, tmp_path_factory):
    shape = request.param
    path = write_family(tmp_path_factory.mktemp(shape.name) / "model", shape)
    return shape, path


def hf_tokens(shape, path, ids: list[int], n: int) -> list[int]:
    return hf_greedy(load_family_reference(path, shape), ids, n)


def test_generate_trace_replay_stats_and_simulate(family, tmp_path):
    shape, path = family
    kwargs = shape.config_kwargs()
    K, E, L = kwargs["num_experts_per_tok"], kwargs["num_experts"], kwargs["num_hidden_layers"]
    trace = tmp_path / "t.jsonl"
    common = ("-p", PROMPT, "-n", TOKENS, "--temp", "0", "--dtype", "float32", "--json", "--ignore-eos")
    result = run("generate", path, *common, "--experts-per-layer", K, "--ram", "0", "--trace", trace)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tokens"] == hf_tokens(shape, path, out["prompt_tokens"], TOKENS)

    replayed = run("generate", path, *common, "--replay", trace)
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["tokens"] == out["tokens"]

    stats = run("stats", trace, "--json")
    assert stats.exit_code == 0, stats.output
    data = json.loads(stats.stdout)
    assert (data["num_layers"], data["num_experts"], data["top_k"]) == (L, E, K)
    # each decode step's K uses per layer, as outcomes recorded by the cache at K slots
    assert data["recorded"]["all"]["uses"] == data["recorded"]["tokens"] * L * K
    assert data["recorded"]["tokens"] == TOKENS - 1  # the prompt's last position is prefill
    sim = run("simulate", trace, "-k", f"{K},{E}")
    assert sim.exit_code == 0, sim.output


def test_quantized_pack_bench_and_info(family, tmp_path):
    shape, path = family
    K = shape.config_kwargs()["num_experts_per_tok"]
    pack = tmp_path / "pack"
    converted = run("convert", path, pack, "--expert-bits", "4")
    assert converted.exit_code == 0, converted.output
    result = run("generate", pack, "-p", PROMPT, "-n", 4, "--temp", "0", "--experts-per-layer", K, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) == 4
    bench = run("bench", pack, "-p", 8, "-n", 4, "-r", 1, "--experts-per-layer", K)
    assert bench.exit_code == 0, bench.output
    assert "tg4" in bench.stdout
    info = run("info", path, "--vram", "1GiB")
    assert info.exit_code == 0, info.output


def test_serve_answers_a_completion(family):
    from starlette.testclient import TestClient

    from offload.engine import Engine
    from offload.server import create_app

    shape, path = family
    engine = Engine.load(path, device="cpu", dtype="float32",
                         experts_per_layer=shape.config_kwargs()["num_experts_per_tok"])
    with TestClient(create_app(engine, shape.name)) as client:
        response = client.post("/v1/completions", json={"model": shape.name, "prompt": PROMPT, "max_tokens": 5,
                                                        "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] >= 1
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    want = hf_tokens(shape, path, ids, 5)
    assert body["choices"][0]["text"] == engine.tokenizer.decode(want)[: len(body["choices"][0]["text"])]
