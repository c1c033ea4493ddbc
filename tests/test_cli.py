"""`offload generate` through typer's runner: JSON, streaming, and one-line errors with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from cli.main import app
from tests.model_builder import WINDOWED, rewrite_config

runner = CliRunner()
PROMPT = "def parse_args(argv):"


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_json_output_has_ids_text_and_stats(model_dirs):
    d = model_dirs[WINDOWED.name]
    result = run("generate", str(d), "-p", PROMPT, "-n", "12", "--temp", "0", "--dtype", "float32", "--json", "--ignore-eos")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert out["prompt_tokens"] == [1, *sp.encode(PROMPT)]
    assert len(out["tokens"]) == 12
    assert out["text"] == sp.decode(out["prompt_tokens"][1:] + out["tokens"])[len(PROMPT):]
    assert out["stats"]["generated_tokens"] == 12 and out["stats"]["prompt_tokens"] == len(out["prompt_tokens"])
    assert out["stats"]["generation_tokens_per_s"] > 0


def test_n_tokens_at_temperature_zero_unless_eos(model_dirs):
    d = model_dirs[WINDOWED.name]
    result = run("generate", str(d), "-p", PROMPT, "-n", "30", "--temp", "0", "--json")
    out = json.loads(result.stdout)
    assert len(out["tokens"]) == 30 or (out["tokens"][-1] == 2 and out["stop_reason"] == "eos")


def test_streamed_text_equals_json_text(model_dirs):
    d = model_dirs[WINDOWED.name]
    common = ["generate", str(d), "-p", PROMPT, "-n", "16", "--temp", "0.7", "--seed", "5", "--dtype", "float32"]
    streamed = run(*common)
    as_json = run(*common, "--json")
    assert streamed.exit_code == 0 and as_json.exit_code == 0
    assert streamed.stdout == json.loads(as_json.stdout)["text"] + "\n"
    assert "generation" in streamed.stderr and "t/s" in streamed.stderr


def test_prompt_from_stdin_and_chat_format(model_dirs):
    d = model_dirs[WINDOWED.name]
    result = run("generate", str(d), "-n", "4", "--chat", "--json", "--dtype", "float32", input="hello there")
    assert result.exit_code == 0, result.output
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    ids = json.loads(result.stdout)["prompt_tokens"]
    assert ids[0] == 1 and sp.decode(ids[1:]) == "[INST] hello there [/INST]"


def damage_missing_shard(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]).unlink()
    return index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]


def damage_truncated(d):
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    return shard.name


def damage_header_past_end(d):
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    return shard.name


def damage_shape(d):
    rewrite_config(d, hidden_size=72)
    return "has shape"


def damage_architecture(d):
    rewrite_config(d, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    return "DeepseekV3ForCausalLM"


def damage_tokenizer(d):
    (d / "tokenizer.model").unlink()
    return "tokenizer.model"


@pytest.mark.parametrize(
    "damage",
    [damage_missing_shard, damage_truncated, damage_header_past_end, damage_shape, damage_architecture, damage_tokenizer],
)
def test_bad_checkpoints_give_one_line_and_exit_2(damage, model_dirs, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dirs[WINDOWED.name], d)
    culprit = damage(d)
    result = run("generate", str(d), "-p", "x", "-n", "2")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["generate", "/no/such/model", "-p", "x"], "/no/such/model: no such directory"),
        (["generate", "{model}", "-p", "x", "--dtype", "int4"], "--dtype 'int4'"),
        (["generate", "{model}", "-p", "x", "--top-p", "0", "--temp", "1"], "top_p"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, culprit, model_dirs):
    args = [a.replace("{model}", str(model_dirs[WINDOWED.name])) for a in args]
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr


def test_help_states_the_default_dtype():
    result = run("generate", "--help")
    assert result.exit_code == 0
    assert "default bfloat16" in result.stdout


def test_budgets_and_stats(model_dirs):
    d = model_dirs[WINDOWED.name]
    common = ["generate", str(d), "-p", PROMPT, "-n", "10", "--dtype", "float32", "--ignore-eos"]
    resident = json.loads(run(*common, "--json").stdout)
    cached = run(*common, "--experts-per-layer", "3", "--ram", "0", "--policy", "lru", "--json")
    assert cached.exit_code == 0, cached.output
    out = json.loads(cached.stdout)
    assert out["tokens"] == resident["tokens"] and resident["cache"] is None
    assert out["plan"]["slots_per_layer"] == 3 and out["plan"]["host_experts"] == 0
    assert out["cache"]["misses"] == out["cache"]["disk_loads"] > 0
    assert len(out["cache"]["layers"]) == WINDOWED.config_kwargs()["num_hidden_layers"]
    table = run(*common, "--experts-per-layer", "3", "--stats")
    assert table.exit_code == 0
    assert "hit rate" in table.stderr and "3/8 experts per layer on the device" in table.stderr


def test_impossible_budget_states_the_minimum(model_dirs):
    result = run("generate", str(model_dirs[WINDOWED.name]), "-p", "x", "--vram", "1KiB")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "below the minimum" in lines[0]


def test_generate_from_a_pack(packs):
    result = run("generate", str(packs[(WINDOWED.name, "bfloat16")]), "-p", PROMPT, "-n", "3", "--json", "--ram", "0", "--experts-per-layer", "2")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) in (1, 2, 3)


def test_quantized_experts_from_the_command_line(model_dirs, tmp_path):
    d = model_dirs[WINDOWED.name]
    common = ["-p", PROMPT, "-n", "6", "--dtype", "float32", "--ignore-eos", "--json"]
    resident = run("generate", str(d), *common, "--expert-format", "nf4")
    assert resident.exit_code == 0, resident.output
    pack = tmp_path / "pack"
    converted = run("convert", str(d), str(pack), "--expert-format", "nf4")
    assert converted.exit_code == 0, converted.output
    assert "experts (nf4," in converted.stdout
    cached = run("generate", str(pack), *common, "--experts-per-layer", "2", "--ram", "0")
    assert cached.exit_code == 0, cached.output
    assert json.loads(cached.stdout)["tokens"] == json.loads(resident.stdout)["tokens"]
    bad = run("generate", str(d), "-p", "x", "--expert-format", "nf3")
    assert bad.exit_code == 2 and "nf3" in bad.stderr


def test_chat_uses_the_checkpoints_own_template(model_dirs, tmp_path):
    """A fine-tune with a ChatML template: --chat renders it as transformers does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tests.test_chat_template import CHATML_TEMPLATE

    d = tmp_path / "model"
    shutil.copytree(model_dirs[WINDOWED.name], d)
    config_path = d / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHATML_TEMPLATE
    config_path.write_text(json.dumps(config))
    result = run("generate", str(d), "-n", "2", "--chat", "--json", "--dtype", "float32", "-p", "hello there")
    assert result.exit_code == 0, result.output
    ids = json.loads(result.stdout)["prompt_tokens"]
    chat = [{"role": "user", "content": "hello there"}]
    rendered, _ = render_jinja_template(conversations=[chat], chat_template=CHATML_TEMPLATE, add_generation_prompt=True)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert sp.decode(ids) == rendered[0]
    assert "<|im_start|>user" in rendered[0] and "[INST]" not in sp.decode(ids)


def test_a_hub_id_resolves_from_the_local_cache(model_dirs, tmp_path, monkeypatch):
    """`offload generate org/name` finds the snapshot in a Hugging Face cache, network off."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-mixtral"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dirs[WINDOWED.name], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("generate", "acme/tiny-mixtral", "-p", PROMPT, "-n", "3", "--json", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) >= 1
    missing = run("generate", "acme/absent", "-p", "x")
    assert missing.exit_code == 2 and "not in the Hugging Face cache" in missing.stderr


def test_profiles_set_the_plan_and_flags_win(model_dirs, tmp_path):
    d = str(model_dirs[WINDOWED.name])
    common = ["generate", d, "-p", PROMPT, "-n", "2", "--json", "--dtype", "float32"]
    shipped = run(*common, "--profile", "cpu-only")
    assert shipped.exit_code == 0, shipped.output
    assert json.loads(shipped.stdout)["plan"] is None  # cpu-only: every expert resident
    custom = tmp_path / "small.toml"
    text = (Path(__file__).resolve().parents[1] / "profiles" / "cpu-only.toml").read_text()
    custom.write_text(text.replace("[plan]", "[plan]\nexperts_per_layer = 3", 1))
    planned = run(*common, "--profile", str(custom))
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["plan"]["slots_per_layer"] == 3
    overridden = run(*common, "--profile", str(custom), "--experts-per-layer", "5")
    assert json.loads(overridden.stdout)["plan"]["slots_per_layer"] == 5
    bad = run("generate", d, "-p", "x", "--profile", "no-such-card")
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no-such-card" in bad.stderr


def test_the_automatic_profile_is_named_and_changes_no_tokens(model_dirs):
    """No --profile: the best shipped profile for the device, fitted to this small model (16-bit,
    every expert resident), named on one stderr line; the tokens are a plain engine's."""
    from offload.engine import Engine, GenerationSettings

    d = model_dirs[WINDOWED.name]
    result = run("generate", str(d), "-p", PROMPT, "-n", "10", "--dtype", "float32", "--ignore-eos", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    notes = [line for line in result.stderr.splitlines() if line.startswith("profile: ")]
    assert len(notes) == 1 and notes[0].endswith(" (auto: 16-bit, all experts resident)"), result.stderr
    assert len(notes[0]) <= 80  # one short line, never wrapped on an 80-column terminal
    assert out["profile"].endswith(" (auto)") and out["plan"] is None and out["cache"] is None
    engine = Engine.load(d, dtype="float32")
    plain = engine.generate(out["prompt_tokens"], GenerationSettings(max_new_tokens=10, ignore_eos=True)).run()
    assert out["tokens"] == plain.tokens
    named = run("generate", str(d), "-p", PROMPT, "-n", "2", "--profile", "cpu-only", "--json")
    assert named.exit_code == 0 and "profile: " not in named.stderr
    assert json.loads(named.stdout)["profile"] == "cpu-only"


@pytest.mark.parametrize("command, args", [("generate", ["-p", "x"]), ("chat", [])])
def test_prefetch_depth_below_one_is_one_line_and_exit_2(command, args, model_dirs):
    result = run(command, str(model_dirs[WINDOWED.name]), *args, "--prefetch-depth", "0", input="hi")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--prefetch-depth 0: must be at least 1" in lines[0], result.stderr


def test_prefetch_depth_runs_and_a_profile_that_does_not_fit_is_refused(model_dirs, tmp_path):
    d = str(model_dirs[WINDOWED.name])
    deep = run("generate", d, "-p", PROMPT, "-n", "3", "--experts-per-layer", "2", "--policy", "lookahead",
               "--prefetch-depth", "2", "--json")
    assert deep.exit_code == 0, deep.output
    text = (Path(__file__).resolve().parents[1] / "profiles" / "cpu-only.toml").read_text()
    huge = tmp_path / "huge.toml"
    huge.write_text(text.replace('ram = "32GiB"', 'ram = "4096GiB"').replace("[plan]", '[plan]\nram = "4000GiB"'))
    refused = run("generate", d, "-p", "x", "--profile", str(huge))
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "plan.ram 4000GiB is more than this machine's RAM" in lines[0], refused.stderr


def test_engine_options_merge_a_profile_and_the_flags(tmp_path):
    from cli.common import engine_options
    from offload.profile import load_profile

    text = (Path(__file__).resolve().parents[1] / "profiles" / "rtx-3060-12gb.toml").read_text()
    path = tmp_path / "deep.toml"
    path.write_text(text.replace("prefetch_depth = 1", "prefetch_depth = 2"))
    profile = load_profile(path)
    merged = engine_options(profile, device="auto", vram=None, prefetch_depth=None, expert_format=None)
    assert merged["device"] == "cuda" and merged["vram"] == "11GiB" and merged["max_context"] == 4096
    assert merged["prefetch_depth"] == 2
    merged = engine_options(profile, experts_per_layer=4, prefetch_depth=3, expert_format="int8")
    assert merged["experts_per_layer"] == 4 and "vram" not in merged and merged["prefetch_depth"] == 3
    assert merged["expert_format"] == "int8" and "expert_bits" not in merged  # a format replaces the bits
    assert "prefetch_depth" not in engine_options(None, prefetch_depth=None)  # the engine's default


def test_a_plan_fitted_to_free_device_memory_is_said_on_stderr(model_dirs):
    """When the load fits fewer slots than planned (CUDA's free memory, replaced here), the
    command says so in one line with the numbers, and runs."""
    from unittest import mock

    import offload.engine as engine_module
    from offload.experts.record import RecordLayout
    from offload.config import ModelConfig

    d = model_dirs[WINDOWED.name]
    c = ModelConfig.from_dir(d)
    record = RecordLayout.for_config(c, "float32").nbytes
    free = c.num_hidden_layers * c.num_experts_per_tok * record + record // 2
    with mock.patch.object(engine_module, "memory_info", return_value=(free, 4 * free)):
        result = run("generate", str(d), "-p", PROMPT, "-n", "3", "--dtype", "float32", "--experts-per-layer", "4",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "not the planned" in line]
    assert len(notes) == 1 and f"holds {c.num_hidden_layers * c.num_experts_per_tok} expert slots" in notes[0]
