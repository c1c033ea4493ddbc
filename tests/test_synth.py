"""`offload synth`: a synthetic pack has a preset's true record sizes (bitsandbytes' own), opens,
verifies, has the weight statistics it promises, runs through the engine (cache and all-resident
alike), reproduces its bytes from a seed, and is written atomically like `convert`."""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

from cli.synth import synth_command
from offload import quant
from offload.engine import Engine, GenerationSettings
from offload.errors import ConfigError, OutputError, SettingError
from offload.experts.record import MATRIX_ALIGNMENT, RecordLayout, align_up
from offload.loader import weight_formats
from offload.pack import MANIFEST, Pack
from offload.synth import synthesize

MIXTRAL_I, MIXTRAL_D = 14336, 4096

# A preset-like model small enough for the engine on two cores: Mixtral's proportions (GQA 4:1,
# 8 experts, top-2, untied), shapes the fused CPU layout can hold, vocab the demo tokenizer's 4096.
TINY = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 512,
    "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip

PROMPT = "def parse_args(argv):\n    return"


def cli_app() -> typer.Typer:
    """cli.main's app once it registers synth_command; until then, a local app with only it."""
    from cli.main import app

    if any(c.name == "synth" for c in app.registered_commands):
        return app
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("synth")(synth_command)
    return app


def run(*args: str):
    return CliRunner().invoke(cli_app(), ["synth", *map(str, args)])


def manifest_of(pack_dir) -> dict:
    return json.loads((pack_dir / MANIFEST).read_text())


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def dequantized(w) -> torch.Tensor:
    return w.float() if isinstance(w, torch.Tensor) else quant.dequantize(w, torch.float32)


# ---- Mixtral-8x7B at true size ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb_nf4() -> dict[tuple[int, int], dict]:
    """bitsandbytes' own nf4 quantization of a 14336x4096 and a 4096x14336 matrix: per shape,
    its tensors' (dtype, shape) in the record's order (absmax, quant map, data), its quant map,
    and the bytes of the matrix in a record (each tensor on a 64-byte boundary)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes.functional as F

    generator = torch.Generator().manual_seed(0)
    out = {}
    for shape in ((MIXTRAL_I, MIXTRAL_D), (MIXTRAL_D, MIXTRAL_I)):
        weight = torch.randn(shape, generator=generator).to(torch.bfloat16)
        data, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        parts = [state.absmax, state.code, data]
        end = 0
        for t in parts:
            end = align_up(end, MATRIX_ALIGNMENT) + t.numel() * t.element_size()
        out[shape] = {
            "tensors": [(t.dtype, tuple(t.shape)) for t in parts],
            "code": state.code.clone(),
            "bytes": align_up(end, MATRIX_ALIGNMENT),
        }
    return out


@pytest.fixture(scope="module")
def mixtral_pack(tmp_path_factory):
    """`offload synth mixtral-8x7b OUT --layers 2 --expert-format nf4`: 2.3 GB on disk."""
    out = tmp_path_factory.mktemp("synth") / "mixtral-8x7b-2"
    result = run("mixtral-8x7b", out, "--layers", "2", "--expert-format", "nf4")
    assert result.exit_code == 0, result.output
    yield out, result.stdout
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_mixtral_records_are_bitsandbytes_nf4_size(mixtral_pack, bnb_nf4):
    out, stdout = mixtral_pack
    w1 = bnb_nf4[(MIXTRAL_I, MIXTRAL_D)]
    w2 = bnb_nf4[(MIXTRAL_D, MIXTRAL_I)]
    expert = 2 * w1["bytes"] + w2["bytes"]
    assert expert == 99_090_624  # the figure offload info and FACTS.md give
    manifest = manifest_of(out)
    assert manifest["config"]["num_hidden_layers"] == 2
    assert manifest["synthetic"] == {"preset": "mixtral-8x7b", "seed": 0, "layers": 2}
    assert manifest["weight_format"] == {"dense": "bfloat16", "experts": "nf4", "attention": "bf16"}
    assert len(manifest["experts"]) == 16
    assert {e["length"] for e in manifest["experts"]} == {expert}
    assert (out / "experts.bin").stat().st_size == 16 * align_up(expert, 4096)
    assert stdout.startswith(f"wrote {out}: synthetic mixtral-8x7b, 2 of 32 layers, 16 experts (nf4,")
    with Pack(out) as pack:
        assert pack.config.num_hidden_layers == 2 and pack.config.hidden_size == MIXTRAL_D
        pack.verify_all()  # every record's crc32
        experts = pack.expert(1, 7)
        for w, oracle in zip(experts, (w1, w1, w2)):
            assert [(t.dtype, tuple(t.shape)) for t in w.tensors.values()] == oracle["tensors"]
            assert torch.equal(w.tensors["quant_map"], oracle["code"])  # bitsandbytes' nf4 table


@pytest.mark.slow
def test_mixtral_weights_have_the_intended_statistics(mixtral_pack):
    out, _ = mixtral_pack
    with Pack(out) as pack:
        for layer, expert in ((0, 0), (1, 5)):
            for w in pack.expert(layer, expert):
                deq = dequantized(w)
                assert 0.97 <= deq.std().item() * math.sqrt(w.shape[1]) <= 1.03  # std 1/sqrt(in)
                assert abs(deq.mean().item()) * math.sqrt(w.shape[1]) < 0.03
                assert (w.tensors["absmax"] > 0).all()
        embed = pack.dense("embed_tokens").float()
        assert embed.shape == (32000, MIXTRAL_D) and abs(embed.std().item() - 1) < 0.02
        norm = pack.dense("input_layernorm", 1).float()
        assert abs(norm.mean().item() - 1) < 0.02 and abs(norm.std().item() - 0.1) < 0.01
        q = pack.dense("q_proj", 0).float()
        assert abs(q.std().item() * math.sqrt(MIXTRAL_D) - 1) < 0.02


@pytest.mark.slow
def test_mixtral_pack_runs_through_the_cache(mixtral_pack):
    """Two true-size layers, 2 of 8 experts per layer on the device, every miss read from disk:
    the activations stay finite and the logits have the spread of N(0, 1)-ish weights."""
    out, _ = mixtral_pack
    engine = Engine.load(out, device="cpu", experts_per_layer=2, ram=0, policy="lru", context_length=64)
    try:
        ids = engine.tokenizer.encode("The capital", bos=True)
        logits = engine.logits(ids).float()
        assert logits.shape == (len(ids), 32000) and torch.isfinite(logits).all()
        assert 0.3 < logits.std().item() < 5
        assert engine.cache.stats.total().disk_loads > 0
    finally:
        engine.close()


# ---- a preset-like model through the engine --------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(expert_format="int8", attn_bits=8), dict(expert_bits=4, attn_bits=4), dict(expert_format="nf4-dq")],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "bf16",
)
def test_tiny_synthetic_model_generates_and_the_cache_is_exact(settings, tmp_path):
    out = synthesize(TINY, tmp_path / "pack", seed=3, **settings)
    resident = Engine.load(out, device="cpu")
    ids = resident.tokenizer.encode(PROMPT, bos=True)
    want = resident.logits(ids)
    assert torch.isfinite(want).all() and want.float().std() > 0.1
    run_settings = GenerationSettings(max_new_tokens=12, ignore_eos=True)
    tokens = resident.generate(ids, run_settings).run().tokens
    assert len(tokens) == 12
    cached = Engine.load(out, device="cpu", experts_per_layer=2, ram=0, policy="lru")
    assert cached.generate(ids, run_settings).run().tokens == tokens
    assert torch.equal(cached.logits(ids), want)
    if "attn_bits" in settings:  # stored quantized, taken as stored
        assert isinstance(resident.model.dense.layers[0].q_proj, quant.QuantizedMatrix)
    cached.close()


@pytest.mark.parametrize("fmt", ["bf16", "fp32", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "nf4-cpu", "fp4-cpu"])
def test_every_format_is_valid_and_has_the_intended_spread(fmt, tmp_path):
    out = synthesize(TINY, tmp_path / "pack", expert_format=fmt, layers=1, dtype=torch.float32 if fmt == "fp32" else None)
    with Pack(out) as pack:
        assert pack.layout == RecordLayout.for_config(pack.config, fmt)
        pack.verify_all()
        for w in pack.expert(0, 4):
            deq = dequantized(w)
            assert torch.isfinite(deq).all()
            # std 1/sqrt(in) (measured within 1%), mean 0 (within 0.017 std: the 256-entry code tables)
            assert 0.97 <= deq.std().item() * math.sqrt(w.shape[1]) <= 1.03, fmt
            assert abs(deq.mean().item()) * math.sqrt(w.shape[1]) < 0.03, fmt
        if quant.get_format(fmt).kind != "plain":
            sample = quant.quantize(torch.randn(64, 256), fmt).tensors
            got = pack.expert(0, 4).w1.tensors
            for name in ("quant_map", "nested_quant_map"):  # bitsandbytes' own tables
                if name in sample:
                    assert torch.equal(got[name], sample[name])


def test_quantized_attention_is_taken_as_stored(tmp_path, monkeypatch):
    out = synthesize(TINY, tmp_path / "pack", expert_format="int8", attn_bits=8, layers=2)
    with Pack(out) as pack:
        assert pack.attn_format.name == "int8" and pack.version == 3
        q = pack.dense("q_proj", 1)
        assert isinstance(q, quant.QuantizedMatrix) and q.fmt.name == "int8"
        assert abs(dequantized(q).std().item() * math.sqrt(256) - 1) < 0.1

    def refuse(*args, **kwargs):
        raise AssertionError("loading a quantized pack quantized something")

    quant.select_kernels("cpu")  # its one-off probe quantizes a tiny matrix: not part of loading
    monkeypatch.setattr(quant, "quantize", refuse)
    monkeypatch.setattr("offload.loader.quantize", refuse)
    engine = Engine.load(out, device="cpu")
    assert engine.model.dense.layers[1].q_proj.fmt.name == "int8"
    assert torch.isfinite(engine.logits(engine.tokenizer.encode(PROMPT, bos=True))).all()


# ---- seeds, target device, refusals ----------------------------------------------------------


def test_a_seed_reproduces_every_byte(tmp_path):
    a = synthesize(TINY, tmp_path / "a", expert_bits=4, attn_bits=8, layers=2, seed=7)
    b = synthesize(TINY, tmp_path / "b", expert_bits=4, attn_bits=8, layers=2, seed=7)
    c = synthesize(TINY, tmp_path / "c", expert_bits=4, attn_bits=8, layers=2, seed=8)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "experts.bin").read_bytes() != (c / "experts.bin").read_bytes()
    assert (a / "dense.safetensors").read_bytes() != (c / "dense.safetensors").read_bytes()
    assert manifest_of(c)["synthetic"]["seed"] == 8


def test_records_differ_between_experts_and_layers(tmp_path):
    out = synthesize(TINY, tmp_path / "pack", expert_format="nf4", layers=2)
    with Pack(out) as pack:
        first = pack.expert(0, 0).w1.tensors["data"]
        assert not torch.equal(first, pack.expert(0, 1).w1.tensors["data"])
        assert not torch.equal(first, pack.expert(1, 0).w1.tensors["data"])
        assert not torch.equal(first, pack.expert(0, 0).w3.tensors["data"])


def test_the_4bit_layout_follows_the_target_device(tmp_path):
    cuda = synthesize(TINY, tmp_path / "cuda", expert_bits=4, attn_bits=4, layers=1, target="cuda")
    with Pack(cuda) as pack:
        assert (pack.layout.fmt.name, pack.attn_format.name) == ("nf4-dq", "nf4-dq")  # no GPU needed to write it
    cpu = synthesize(TINY, tmp_path / "cpu", expert_bits=4, layers=1, target="cpu")
    with Pack(cpu) as pack:  # one record format for both devices: the CPU kernel reads nf4-dq's bytes
        assert pack.layout.fmt.name == "nf4-dq"
    with pytest.raises(SettingError, match=r"--for 'gpu'"):
        synthesize(TINY, tmp_path / "x", target="gpu")
    with pytest.raises(SettingError, match="nf4-cpu is the layout of bitsandbytes' fused CPU kernel"):
        synthesize(TINY, tmp_path / "x", expert_format="nf4-cpu", target="cuda")
    assert not (tmp_path / "x").exists()


def test_a_cpu_layout_synthetic_pack_is_refused_on_cuda_with_the_command(tmp_path, monkeypatch):
    out = synthesize(TINY, tmp_path / "pack", expert_format="nf4-cpu", layers=1, seed=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("touched CUDA"))
    with Pack(out) as pack, pytest.raises(SettingError) as error:
        weight_formats(pack, torch.device("cuda"), None, None, None, None)
    message = str(error.value)
    assert "\n" not in message and "nf4-cpu experts" in message and "CUDA cannot run" in message
    # no preset (a config dict): the generic commands
    assert "`offload convert HF_DIR OUT_DIR --expert-bits 4 --for cuda`" in message


def test_bad_settings_are_refused_before_writing(tmp_path):
    out = tmp_path / "pack"
    with pytest.raises(SettingError, match=r"--layers 0: the model has 4 layers; choose 1 to 4"):
        synthesize(TINY, out, layers=0)
    with pytest.raises(SettingError, match="not both"):
        synthesize(TINY, out, expert_format="nf4", expert_bits=4)
    with pytest.raises(SettingError, match="--seed -1"):
        synthesize(TINY, out, seed=-1)
    with pytest.raises(SettingError, match="the bundled tokenizer has 4096 pieces"):
        synthesize(dict(TINY, vocab_size=512), out)
    with pytest.raises(ConfigError, match="no built-in model"):
        synthesize("mixtral-9x7b", out)
    assert not out.exists() and siblings(out) == []


# ---- atomic writes, --force -------------------------------------------------------------------


def test_existing_directory_needs_force_and_force_replaces_a_pack(tmp_path):
    out = synthesize(TINY, tmp_path / "pack", layers=1, seed=1)
    (out / "marker").write_text("old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=r"pack: already exists; give --force"):
        synthesize(TINY, out, layers=1, seed=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    synthesize(TINY, out, layers=2, seed=2, force=True)
    assert manifest_of(out)["synthetic"] == {"preset": None, "seed": 2, "layers": 2}
    assert (out / "marker").read_text() == "old" and siblings(out) == ["pack"]  # the user's file stays
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match="not an offload pack"):
        synthesize(TINY, documents, layers=1, force=True)
    assert (documents / "thesis.txt").read_text() == "precious"


class Stop(Exception):
    pass


@pytest.mark.parametrize("at", ["dense", "last expert"])
def test_interrupted_synth_leaves_nothing(tmp_path, at):
    def progress(done: int, total: int, what: str) -> None:
        if (at == "dense" and done == 5) or (at == "last expert" and done == total):
            raise Stop

    out = tmp_path / "pack"
    with pytest.raises(Stop):
        synthesize(TINY, out, layers=2, progress=progress)
    assert not out.exists() and siblings(out) == []


def test_interrupted_forced_synth_keeps_the_old_pack(tmp_path):
    out = synthesize(TINY, tmp_path / "pack", layers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def progress(done: int, total: int, what: str) -> None:
        if done == total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(TINY, out, layers=2, seed=4, force=True, progress=progress)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == ["pack"]


# ---- command line -----------------------------------------------------------------------------


def test_cli_synth_writes_a_pack_and_refuses_a_second_without_force(tmp_path):
    out = tmp_path / "pack"
    result = run("mixtral-8x7b", out, "--layers", "1", "--expert-bits", "8", "--attn-bits", "8", "--seed", "2",
                 "--for", "cuda")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1
    assert result.stdout.startswith(f"wrote {out}: synthetic mixtral-8x7b, 1 of 32 layers, 8 experts (int8,")
    assert "attention int8" in result.stdout
    with Pack(out) as pack:
        assert pack.synthetic == {"preset": "mixtral-8x7b", "seed": 2, "layers": 1}
        assert pack.config.num_hidden_layers == 1 and pack.config.vocab_size == 32000
    again = run("mixtral-8x7b", out, "--layers", "1")
    assert again.exit_code == 2 and "give --force" in again.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["mixtral-9x7b"], "mixtral-9x7b"),
        (["mixtral-8x7b", "--layers", "33"], "--layers 33"),
        (["mixtral-8x7b", "--expert-bits", "3"], "--expert-bits 3"),
        (["mixtral-8x7b", "--expert-bits", "4", "--expert-format", "nf4"], "not both"),
        (["mixtral-8x22b", "--for", "tpu"], "--for 'tpu'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, named):
    out = tmp_path / "pack"
    result = run(args[0], out, *args[1:])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]
    assert not out.exists()



def test_generate_takes_a_quantized_synthetic_pack(tmp_path):
    from cli.main import app

    out = synthesize(TINY, tmp_path / "pack", expert_format="nf4", layers=2)
    result = CliRunner().invoke(app, ["generate", str(out), "-p", "x", "-n", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) == 2


def test_generate_takes_a_synthetic_pack_with_quantized_attention(tmp_path):
    from cli.main import app

    out = synthesize(TINY, tmp_path / "pack", expert_format="nf4", attn_bits=8, layers=2)
    result = CliRunner().invoke(app, ["generate", str(out), "-p", "x", "-n", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output


def test_generate_takes_quantized_attention_given_its_bits(tmp_path):
    from cli.main import app

    out = synthesize(TINY, tmp_path / "pack", expert_format="nf4", attn_bits=8, layers=2)
    args = ["generate", str(out), "-p", "x", "-n", "2", "--device", "cpu", "--json", "--attn-bits", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) == 2
