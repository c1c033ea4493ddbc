"""The offload pack: convert writes records that read back as the checkpoint's experts, the
reader refuses damaged packs with typed one-line errors, and an interrupted convert leaves nothing."""

from __future__ import annotations

import json
import shutil
import zlib

import pytest
import torch
import typer
from safetensors import safe_open
from typer.testing import CliRunner

from cli.convert import convert_command
from offload.checkpoint import DENSE_TABLE, Checkpoint, layer_table
from offload.config import ModelConfig
from offload.errors import CorruptCheckpointError, CorruptPackError, OutputError, PackError, SettingError
from offload.experts.record import RECORD_ALIGNMENT, RecordLayout
from offload.pack import MANIFEST, PACK_FORMAT, PACK_VERSION, Pack, convert, is_pack, manifest_checksum
from offload.quant import get_format
from offload.tokenizer import Tokenizer
from tests.model_builder import SHAPES, WINDOWED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture
def pack_copy(packs, tmp_path):
    """A private copy of the windowed fp32 pack that a test may damage."""
    return shutil.copytree(packs[(WINDOWED.name, "float32")], tmp_path / "pack")


def manifest_of(pack_dir) -> dict:
    return json.loads((pack_dir / MANIFEST).read_text())


def rewrite_manifest(pack_dir, manifest: dict, **dumps) -> None:
    """Write ``manifest`` as the pack's, with its own checksum recomputed (as if a writer had
    written that content), so that what is tested is the field, not the checksum."""
    if "manifest_crc32" in manifest:
        manifest["manifest_crc32"] = manifest_checksum(manifest)
    (pack_dir / MANIFEST).write_text(json.dumps(manifest, **dumps))


def dense_items(config: ModelConfig):
    """(logical key, layer) of every dense weight, lm_head included even when tied."""
    yield from ((key, None) for key in DENSE_TABLE)
    yield from ((key, layer) for layer in range(config.num_hidden_layers) for key in layer_table(config))


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ---- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_pack_reads_back_the_checkpoint(model_dirs, packs, shape, dtype_name):
    dtype = DTYPES[dtype_name]
    pack_dir = packs[(shape.name, dtype_name)]
    manifest = manifest_of(pack_dir)
    assert manifest["format"] == PACK_FORMAT and is_pack(pack_dir)
    plain = get_format(dtype_name).name
    assert manifest["weight_format"] == {"dense": dtype_name, "experts": plain, "attention": plain}
    assert manifest["format_version"] == PACK_VERSION == 3
    with Checkpoint(model_dirs[shape.name]) as ck, Pack(pack_dir) as pack:
        c = pack.config
        assert c == ck.config
        for layer in range(c.num_hidden_layers):
            for expert in range(c.num_local_experts):
                got = pack.expert(layer, expert)
                want = ck.expert(layer, expert)
                for g, w in zip(got, want):
                    assert g.dtype == dtype
                    assert torch.equal(g, w.to(dtype)), (layer, expert)
        for key, layer in dense_items(c):
            got = pack.dense(key, layer)
            assert got.dtype == dtype
            assert torch.equal(got, ck.dense(key, layer).to(dtype)), (key, layer)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_records_are_aligned_checksummed_and_zero_padded(packs, shape, dtype_name):
    pack_dir = packs[(shape.name, dtype_name)]
    manifest = manifest_of(pack_dir)
    stride, nbytes = manifest["record"]["stride"], manifest["record"]["nbytes"]
    experts = shape.config_kwargs()["num_local_experts"]
    assert stride % RECORD_ALIGNMENT == 0 and stride >= nbytes
    entries = manifest["experts"]
    assert len(entries) == shape.config_kwargs()["num_hidden_layers"] * experts
    with open(pack_dir / "experts.bin", "rb") as f:
        for index, entry in enumerate(entries):
            assert (entry["layer"], entry["expert"]) == divmod(index, experts)
            assert entry["offset"] % 4096 == 0 and entry["offset"] == index * stride
            assert entry["length"] == nbytes
            f.seek(entry["offset"])
            record = f.read(stride)
            assert len(record) == stride
            assert zlib.crc32(record[:nbytes]) == entry["crc32"]
            assert not any(record[nbytes:])  # padding is zero


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_dense_file_is_valid_safetensors(model_dirs, packs, shape):
    pack_dir = packs[(shape.name, "bfloat16")]
    with Checkpoint(model_dirs[shape.name]) as ck, safe_open(pack_dir / "dense.safetensors", "pt") as f:
        names = set(f.keys())
        config = ck.config
        expected = {names_[0] for key, (names_, _) in DENSE_TABLE.items()
                    if not (key == "lm_head" and config.tie_word_embeddings)}
        expected |= {names_[0].format(layer=layer) for layer in range(config.num_hidden_layers)
                     for names_, _ in layer_table(config).values()}
        assert names == expected
        assert "model.layers.1.block_sparse_moe.gate.weight" in names
        assert not any("experts" in n for n in names)
        for key, layer in dense_items(config):
            if key == "lm_head" and config.tie_word_embeddings:
                continue
            name = (DENSE_TABLE if layer is None else layer_table(config))[key][0][0].format(layer=layer)
            assert torch.equal(f.get_tensor(name), ck.dense(key, layer).to(torch.bfloat16)), name


def test_default_dtype_is_the_checkpoints(model_dirs, tmp_path):
    out = convert(model_dirs[WINDOWED.name], tmp_path / "pack")
    assert manifest_of(out)["weight_format"] == {"dense": "float32", "experts": "fp32", "attention": "fp32"}


def test_reading_one_expert_reads_only_its_record(packs):
    with Pack(packs[(WINDOWED.name, "bfloat16")]) as pack:
        pack.expert(2, 5)
        assert pack.bytes_read == pack.layout.nbytes
        buffer = torch.zeros(pack.layout.stride, dtype=torch.uint8)
        record = pack.read_record(1, 3, buffer)
        assert pack.bytes_read == 2 * pack.layout.nbytes
        assert record.data_ptr() == buffer.data_ptr() and record.numel() == pack.layout.nbytes
        assert not buffer[pack.layout.nbytes :].any()  # nothing past the record was touched


def test_tokenizer_and_config_load_from_a_pack(model_dirs, packs):
    src, pack_dir = model_dirs[WINDOWED.name], packs[(WINDOWED.name, "float32")]
    assert ModelConfig.from_dir(pack_dir) == ModelConfig.from_dir(src)
    a, b = Tokenizer.from_dir(pack_dir), Tokenizer.from_dir(src)
    text = "def parse_args(argv): Größere Brücken"
    assert a.encode(text, bos=True) == b.encode(text, bos=True)
    assert (a.bos_id, a.eos_id) == (b.bos_id, b.eos_id)
    assert "tokenizer.model" in manifest_of(pack_dir)["tokenizer_files"]


# ---- damaged packs ------------------------------------------------------------------------------


def test_flipped_byte_fails_that_experts_checksum_only(pack_copy):
    entry = manifest_of(pack_copy)["experts"][1 * 8 + 3]  # layer 1, expert 3
    experts_bin = pack_copy / "experts.bin"
    data = bytearray(experts_bin.read_bytes())
    data[entry["offset"] + 1000] ^= 0x01
    experts_bin.write_bytes(bytes(data))
    with Pack(pack_copy) as pack:  # opening does not read records
        pack.expert(1, 2)
        pack.expert(2, 3)
        with pytest.raises(CorruptPackError, match=r"experts\.bin: expert 3 of layer 1 \(offset \d+\) fails its checksum"):
            pack.expert(1, 3)
        pack.expert(1, 4)
    with Pack(pack_copy) as pack:
        with pytest.raises(CorruptPackError, match="expert 3 of layer 1"):
            pack.verify_all()


def test_checksum_is_checked_on_the_first_read_only(pack_copy):
    entry = manifest_of(pack_copy)["experts"][0]
    with Pack(pack_copy) as pack:
        pack.expert(0, 0)
        with open(pack_copy / "experts.bin", "r+b") as f:
            f.seek(entry["offset"] + 8)
            byte = f.read(1)
            f.seek(entry["offset"] + 8)
            f.write(bytes([byte[0] ^ 0xFF]))
        pack.expert(0, 0)  # verified already: not checked again
    with Pack(pack_copy) as pack, pytest.raises(CorruptPackError, match="expert 0 of layer 0"):
        pack.expert(0, 0)


def test_truncated_experts_file_fails_at_open(pack_copy):
    entries = manifest_of(pack_copy)["experts"]
    experts_bin = pack_copy / "experts.bin"
    with open(experts_bin, "r+b") as f:
        f.truncate(entries[-2]["offset"] + 10)  # layer 2 expert 6 no longer fits
    with pytest.raises(CorruptPackError, match=r"experts\.bin: truncated.* expert 6 of layer 2"):
        Pack(pack_copy)


def test_newer_format_version_is_refused(pack_copy):
    manifest = manifest_of(pack_copy)
    manifest["format_version"] = 99
    (pack_copy / MANIFEST).write_text(json.dumps(manifest))
    newer = r"manifest\.json: pack format version 99 is newer than this offload reads \(3\); upgrade offload"
    with pytest.raises(PackError, match=newer):
        Pack(pack_copy)


def test_missing_dense_file_is_named(pack_copy):
    (pack_copy / "dense.safetensors").unlink()
    with pytest.raises(PackError, match=r"dense\.safetensors"):
        Pack(pack_copy)


def test_corrupt_dense_header_fails_its_checksum(pack_copy):
    dense = pack_copy / "dense.safetensors"
    data = bytearray(dense.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    dense.write_bytes(bytes(data))
    with pytest.raises(CorruptPackError, match=r"dense\.safetensors: header fails its checksum"):
        Pack(pack_copy)
    v2_manifest(pack_copy)  # no checksum: the header is parsed, and refused as what it is
    with pytest.raises(CorruptCheckpointError, match=r"dense\.safetensors: header is not valid JSON"):
        Pack(pack_copy)


def test_not_a_pack(model_dirs, tmp_path):
    assert not is_pack(model_dirs[WINDOWED.name])
    with pytest.raises(PackError, match=r"manifest\.json: missing"):
        Pack(model_dirs[WINDOWED.name])
    with pytest.raises(PackError, match="no such pack directory"):
        Pack(tmp_path / "nowhere")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(PackError, match="not valid JSON"):
        Pack(tmp_path)


# ---- writing: existing targets and interruption -----------------------------------------------


def test_existing_directory_needs_force(model_dirs, tmp_path):
    src = model_dirs[WINDOWED.name]
    out = convert(src, tmp_path / "pack", dtype=torch.float32)
    (out / "marker").write_text("old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=r"pack: already exists; give --force"):
        convert(src, out, dtype=torch.bfloat16)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    convert(src, out, dtype=torch.bfloat16, force=True)
    assert manifest_of(out)["weight_format"]["experts"] == "bf16"
    assert (out / "marker").read_text() == "old"  # --force replaces the pack's files, not the user's
    assert siblings(out) == ["pack"]  # no temporary, old directory or lock left beside it
    with Pack(out) as pack:
        pack.verify_all()


def test_force_does_not_delete_a_directory_that_is_not_a_pack(model_dirs, tmp_path):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match="not an offload pack"):
        convert(model_dirs[WINDOWED.name], out, force=True)
    assert (out / "thesis.txt").read_text() == "precious"
    with pytest.raises(PackError, match="its own source"):
        convert(model_dirs[WINDOWED.name], model_dirs[WINDOWED.name], force=True)


class Stop(Exception):
    pass


@pytest.mark.parametrize("at", ["dense", "last expert"])
def test_interrupted_convert_leaves_nothing(model_dirs, tmp_path, at):
    seen = []

    def progress(done: int, total: int, what: str) -> None:
        seen.append(what)
        if (at == "dense" and done == 5) or (at == "last expert" and done == total):
            raise Stop

    out = tmp_path / "pack"
    with pytest.raises(Stop):
        convert(model_dirs[WINDOWED.name], out, progress=progress)
    assert seen[-1].startswith("model.layers.0.") if at == "dense" else seen[-1] == "layer 2 expert 7"
    assert not out.exists() and siblings(out) == []


def test_interrupted_forced_convert_keeps_the_old_pack(model_dirs, tmp_path):
    src = model_dirs[WINDOWED.name]
    out = convert(src, tmp_path / "pack", dtype=torch.float32)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def progress(done: int, total: int, what: str) -> None:
        if done == total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(src, out, dtype=torch.bfloat16, force=True, progress=progress)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == ["pack"]


# ---- command line ---------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    """cli.main's app once it registers convert_command; until then, a local app with only it."""
    from cli.main import app

    if any(c.name == "convert" for c in app.registered_commands):
        return app
    app = typer.Typer()
    app.callback()(lambda: None)  # keep "convert" a subcommand, as in cli.main
    app.command("convert")(convert_command)
    return app


def test_cli_convert(model_dirs, tmp_path):
    out = tmp_path / "pack"
    result = CliRunner().invoke(cli_app(), ["convert", str(model_dirs[WINDOWED.name]), str(out), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 24 experts (bf16,")
    assert len(result.stdout.strip().splitlines()) == 1
    with Pack(out) as pack:
        assert pack.layout.dtype == torch.bfloat16


@pytest.mark.parametrize("args", [["missing-dir"], ["MODEL", "--dtype", "int3"]], ids=["bad source", "bad dtype"])
def test_cli_errors_are_one_line_and_exit_2(model_dirs, tmp_path, args):
    args = [str(model_dirs[WINDOWED.name]) if a == "MODEL" else a for a in args]
    if args[0] == "missing-dir":
        args[0] = str(tmp_path / "missing-dir")
    out = tmp_path / "pack"
    result = CliRunner().invoke(cli_app(), ["convert", args[0], str(out), *args[1:]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert ("missing-dir" in lines[0]) if "missing-dir" in args[0] else ("int3" in lines[0])
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["int8", "nf4", "nf4-dq"])
def test_quantized_pack_holds_what_the_quantizer_makes(fmt, model_dirs, tmp_path):
    from offload.quant import quantize

    pack_dir = convert(model_dirs[WINDOWED.name], tmp_path / "pack", expert_format=fmt)
    assert manifest_of(pack_dir)["weight_format"]["experts"] == fmt
    with Checkpoint(model_dirs[WINDOWED.name]) as ck, Pack(pack_dir) as pack:
        assert pack.layout.nbytes < RecordLayout.for_config(pack.config, torch.float32).nbytes / 3
        for layer, expert in [(0, 0), (2, 7)]:
            for got, raw in zip(pack.expert(layer, expert), ck.expert(layer, expert)):
                want = quantize(raw, fmt)
                assert got.fmt.name == fmt and got.shape == want.shape
                for name, tensor in want.tensors.items():
                    assert torch.equal(got.tensors[name], tensor), (layer, expert, name)
        pack.verify_all()


# ---- format version 2: quantized attention ------------------------------------------------------


def bnb():
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes.functional as F
    return F


def test_quantized_attention_is_stored_as_bitsandbytes_quantizes_it(model_dirs, tmp_path):
    """int8, nf4-dq (--attn-bits 4) and plain nf4 (by name) attention in dense.safetensors: each
    projection as its format's tensors, named <hub name>.<tensor>, holding what bitsandbytes itself
    makes of the checkpoint's tensor (nf4-dq: quantize_4bit with compress_statistics=True)."""
    F = bnb()
    src = model_dirs[WINDOWED.name]
    int8 = convert(src, tmp_path / "int8", attn_bits=8, expert_format="nf4")
    dq = convert(src, tmp_path / "dq", attn_bits=4, target="cuda")  # portable 4-bit: the CUDA layout
    nf4 = convert(src, tmp_path / "nf4", attn_format="nf4", target="cuda")
    assert manifest_of(int8)["weight_format"] == {"dense": "float32", "experts": "nf4", "attention": "int8"}
    assert manifest_of(dq)["weight_format"]["attention"] == "nf4-dq"
    assert manifest_of(nf4)["weight_format"]["attention"] == "nf4"
    assert manifest_of(int8)["format_version"] == 3
    with (Checkpoint(src) as ck, safe_open(int8 / "dense.safetensors", "pt") as a,
          safe_open(nf4 / "dense.safetensors", "pt") as b, safe_open(dq / "dense.safetensors", "pt") as d):
        name = "model.layers.2.self_attn.k_proj.weight"
        assert name not in set(a.keys()) and name not in set(b.keys()) and name not in set(d.keys())
        assert {n for n in a.keys() if n.startswith(name)} == {f"{name}.row_absmax", f"{name}.data"}
        raw = ck.dense("k_proj", 2)
        data, row_absmax, _ = F.int8_vectorwise_quant(raw.clone())
        assert torch.equal(a.get_tensor(f"{name}.data"), data)
        assert torch.equal(a.get_tensor(f"{name}.row_absmax"), row_absmax)
        data, state = F.quantize_4bit(raw, blocksize=64, quant_type="nf4", compress_statistics=False)
        assert {n for n in b.keys() if n.startswith(name)} == {f"{name}.{t}" for t in ("data", "absmax", "quant_map")}
        assert torch.equal(b.get_tensor(f"{name}.data"), data)
        assert torch.equal(b.get_tensor(f"{name}.absmax"), state.absmax)
        assert torch.equal(b.get_tensor(f"{name}.quant_map"), state.code)
        # double quantization: the block absmax as uint8 codes of a 256-entry map, one fp32 absmax per
        # 256 blocks and the offset subtracted before (bitsandbytes' QuantState.state2 and .offset)
        data, state = F.quantize_4bit(raw, blocksize=64, quant_type="nf4", compress_statistics=True)
        stored = {t: d.get_tensor(f"{name}.{t}") for t in ("data", "absmax", "quant_map", "nested_absmax",
                                                             "nested_quant_map", "nested_offset")}
        assert {n for n in d.keys() if n.startswith(name)} == {f"{name}.{t}" for t in stored}
        assert stored["absmax"].dtype == torch.uint8 and state.absmax.dtype == torch.uint8
        assert torch.equal(stored["data"], data) and torch.equal(stored["absmax"], state.absmax)
        assert torch.equal(stored["quant_map"], state.code)
        assert torch.equal(stored["nested_absmax"], state.state2.absmax)
        assert torch.equal(stored["nested_quant_map"], state.state2.code)
        assert torch.equal(stored["nested_offset"], state.offset.reshape(()))
        # everything that is not attention is as before
        assert torch.equal(a.get_tensor("model.layers.2.block_sparse_moe.gate.weight"), ck.dense("router", 2))
    with Pack(int8) as pack:
        q = pack.dense("o_proj", 1)
        assert q.fmt.name == "int8" and q.shape == (64, 4 * 32)
        assert pack.attn_format.name == "int8" and pack.dense("router", 1).dtype == torch.float32


def v2_manifest(pack_dir) -> None:
    """Turn a version 3 pack into what format version 2 wrote: the same files, the manifest
    without the checksums of version 3."""
    manifest = manifest_of(pack_dir)
    manifest["format_version"] = 2
    del manifest["dense_crc32"], manifest["manifest_crc32"]
    (pack_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def v1_manifest(pack_dir) -> None:
    """Turn a pack with 16-bit attention into what format version 1 wrote: the same files, the
    manifest without the attention format and the checksums of versions 3 (it had neither)."""
    manifest = manifest_of(pack_dir)
    manifest["format_version"] = 1
    del manifest["weight_format"]["attention"], manifest["dense_crc32"], manifest["manifest_crc32"]
    (pack_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def test_version_1_packs_still_open(packs, pack_copy):
    from offload.engine import Engine

    v1_manifest(pack_copy)
    with Pack(pack_copy) as pack, Pack(packs[(WINDOWED.name, "float32")]) as v2:
        assert pack.version == 1 and pack.attn_format == get_format("fp32") and pack.synthetic is None
        assert pack.without_checksums == ("dense.safetensors", "manifest.json") and v2.without_checksums == ()
        for key, layer in (("q_proj", 1), ("embed_tokens", None), ("router", 0)):
            assert torch.equal(pack.dense(key, layer), v2.dense(key, layer))
        pack.verify_all()
    ids = [1, 5, 9, 200, 31]
    old = Engine.load(pack_copy, device="cpu", experts_per_layer=4, ram=0)
    new = Engine.load(packs[(WINDOWED.name, "float32")], device="cpu")
    assert torch.equal(old.logits(ids), new.logits(ids))


def test_bad_attention_formats_are_refused(pack_copy):
    from offload.errors import MissingTensorError

    manifest = manifest_of(pack_copy)
    for attention, complaint in ((None, "attention None"), ("fp16", "attention 'fp16'"), ("int3", "attention 'int3'")):
        manifest["weight_format"]["attention"] = attention
        rewrite_manifest(pack_copy, manifest)
        with pytest.raises(PackError, match=rf"manifest\.json: weight_format {complaint} must be the dense dtype \(fp32\)"):
            Pack(pack_copy)
    manifest["weight_format"]["attention"] = "int8"  # says quantized; the file holds fp32 weights
    rewrite_manifest(pack_copy, manifest)
    with pytest.raises(MissingTensorError, match=r"dense\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight\.row_absmax'"):
        Pack(pack_copy)


def test_bits_pick_the_layout_of_the_target_device(model_dirs, tmp_path):
    from offload.plan import attention_shapes
    from offload.quant import format_for_bits

    src = model_dirs[WINDOWED.name]
    cuda = convert(src, tmp_path / "cuda", expert_bits=4, attn_bits=4, target="cuda")
    assert manifest_of(cuda)["weight_format"] == {"dense": "float32", "experts": "nf4-dq", "attention": "nf4-dq"}
    cpu = convert(src, tmp_path / "cpu", expert_bits=8, attn_bits=4, target="cpu")
    shapes = tuple(attention_shapes(ModelConfig.from_dir(src)).values())
    want = format_for_bits(4, torch.float32, "cpu", shapes)
    assert want.name == "nf4-dq"  # the portable double-quantized nf4 on every device
    assert manifest_of(cpu)["weight_format"] == {"dense": "float32", "experts": "int8", "attention": want.name}
    with pytest.raises(SettingError, match="--expert-format nf4-cpu: nf4-cpu is the layout of bitsandbytes' fused CPU kernel"):
        convert(src, tmp_path / "x", expert_format="nf4-cpu", target="cuda")
    with pytest.raises(SettingError, match="not both"):
        convert(src, tmp_path / "x", expert_format="nf4", expert_bits=4)
    with pytest.raises(SettingError, match="--for 'tpu'"):
        convert(src, tmp_path / "x", target="tpu")
    assert not (tmp_path / "x").exists()


def test_cli_convert_takes_bits_and_the_target(model_dirs, tmp_path):
    out = tmp_path / "pack"
    args = ["convert", str(model_dirs[WINDOWED.name]), str(out), "--expert-bits", "8", "--attn-bits", "4", "--for", "cuda"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 24 experts (int8,") and ", attention nf4-dq," in result.stdout
    bad = CliRunner().invoke(cli_app(), ["convert", str(model_dirs[WINDOWED.name]), str(tmp_path / "p2"), "--attn-bits", "5"])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error:") and "--attn-bits 5" in bad.stderr
