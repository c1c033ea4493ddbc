"""Integrity wherever a pack or checkpoint can rot (issue 12): checksums of the pack's dense file
and manifest, its config.json against its manifest, weights checked finite at load and at the
first read of each expert, float16 overflow refused by convert and load, the safetensors and
index readers' refusals, and fuzz tests of every reader of these files (safetensors header,
index JSON, config.json, manifest.json) that accept only an ``OffloadError`` or a correct load.

Each damage test makes one defect by hand in a private copy and checks the refusal names the
file and tensor (or field); the fuzz tests take the reader's own checks as nothing: what loads
is compared with what the undamaged file gives (or with safetensors' own reader)."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from offload.checkpoint import SAFETENSORS_DTYPES, Checkpoint, read_header
from offload.config import MAX_SIZE, ModelConfig
from offload.engine import Engine
from offload.errors import (
    ConfigError,
    ConfigMismatchError,
    CorruptCheckpointError,
    CorruptPackError,
    OffloadError,
    SettingError,
)
from offload.pack import MANIFEST, Pack, convert, manifest_checksum
from tests.model_builder import WINDOWED, rewrite_config, write_tiny_mixtral
from tests.test_config import MIXTRAL_8X7B

FUZZ_DEADLINE_MS = 2000  # per example: every reader answers in well under this
FUZZ = dict(deadline=FUZZ_DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ---- helpers --------------------------------------------------------------------------------------


def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    """Absolute [start, end) of tensor ``name`` in the safetensors file ``path``."""
    n, header = header_of(path)
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def poke(path: Path, name: str, index: int, value: float) -> None:
    """Set element ``index`` (flat) of tensor ``name`` in a safetensors file to ``value``."""
    _, header = header_of(path)
    dtype = SAFETENSORS_DTYPES[header[name]["dtype"]]
    start, _ = tensor_range(path, name)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(start + index * size)
        f.write(raw)


def shard_with(model_dir: Path, name: str) -> Path:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][name]


def manifest_of(pack_dir: Path) -> dict:
    return json.loads((pack_dir / MANIFEST).read_text())


def rewrite_manifest(pack_dir: Path, manifest: dict) -> None:
    """Write ``manifest`` with its own checksum recomputed, as a writer of that content would
    (a manifest without one, of an older format, is written as it is)."""
    if "manifest_crc32" in manifest:
        manifest["manifest_crc32"] = manifest_checksum(manifest)
    (pack_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def as_version_2(pack_dir: Path) -> None:
    """What format version 2 wrote: the same files, no dense or manifest checksums."""
    manifest = manifest_of(pack_dir)
    manifest["format_version"] = 2
    manifest.pop("dense_crc32", None)
    manifest.pop("manifest_crc32", None)
    (pack_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def rechecksum_dense(pack_dir: Path, name: str) -> None:
    """Record the dense tensor's current bytes as its checksum (a pack written with them)."""
    manifest = manifest_of(pack_dir)
    if "dense_crc32" in manifest:
        start, end = tensor_range(pack_dir / "dense.safetensors", name)
        manifest["dense_crc32"]["tensors"][name] = zlib.crc32((pack_dir / "dense.safetensors").read_bytes()[start:end])
    rewrite_manifest(pack_dir, manifest)


def rechecksum_record(pack_dir: Path, layer: int, expert: int, experts_per_layer: int = 8) -> None:
    manifest = manifest_of(pack_dir)
    entry = manifest["experts"][layer * experts_per_layer + expert]
    data = (pack_dir / "experts.bin").read_bytes()[entry["offset"] : entry["offset"] + entry["length"]]
    entry["crc32"] = zlib.crc32(data)
    rewrite_manifest(pack_dir, manifest)


@pytest.fixture
def pack_copy(packs, tmp_path) -> Path:
    """A private copy of the windowed fp32 pack that a test may damage."""
    return Path(shutil.copytree(packs[(WINDOWED.name, "float32")], tmp_path / "pack"))


IDS = [1, 5, 9, 200, 31]


# ---- the pack's dense file and manifest -----------------------------------------------------------


def test_a_bit_flip_in_the_dense_file_is_refused_naming_file_and_tensor(pack_copy):
    name = "model.layers.1.self_attn.v_proj.weight"
    start, _ = tensor_range(pack_copy / "dense.safetensors", name)
    with open(pack_copy / "dense.safetensors", "r+b") as f:  # the lowest mantissa bit: still finite
        f.seek(start + 40)
        byte = f.read(1)[0]
        f.seek(start + 40)
        f.write(bytes([byte ^ 0x01]))
    with pytest.raises(CorruptPackError, match=rf"dense\.safetensors: tensor '{re.escape(name)}' fails its checksum"):
        Engine.load(pack_copy, device="cpu")


def test_the_dense_header_and_its_tensor_list_are_checked(pack_copy):
    manifest = manifest_of(pack_copy)
    assert manifest["format_version"] == 3 and set(manifest["dense_crc32"]) == {"header", "tensors"}
    name = "model.norm.weight"
    del manifest["dense_crc32"]["tensors"][name]
    rewrite_manifest(pack_copy, manifest)
    with pytest.raises(CorruptPackError, match=rf"dense\.safetensors: holds tensor '{name}', which manifest\.json has no checksum"):
        Pack(pack_copy)


def test_nan_in_the_dense_file_of_a_version_2_pack_is_refused_at_load(pack_copy):
    as_version_2(pack_copy)  # no checksum: the finite check at load is what stands
    poke(pack_copy / "dense.safetensors", "model.layers.2.post_attention_layernorm.weight", 7, math.nan)
    with pytest.raises(
        CorruptPackError,
        match=r"dense\.safetensors: tensor 'model\.layers\.2\.post_attention_layernorm\.weight' holds "
              r"1 non-finite value \(1 NaN, 0 Inf\), the first at \[7\]",
    ):
        Engine.load(pack_copy, device="cpu")


def test_inf_written_into_a_checksummed_pack_is_refused_at_load(pack_copy):
    name = "model.embed_tokens.weight"
    poke(pack_copy / "dense.safetensors", name, 130, -math.inf)
    rechecksum_dense(pack_copy, name)  # as if written so: the checksum holds, the value does not
    with pytest.raises(CorruptPackError, match=rf"tensor '{re.escape(name)}' holds 1 non-finite value \(0 NaN, 1 Inf\), the first at \[2, 2\]"):
        Engine.load(pack_copy, device="cpu", experts_per_layer=4, ram=0)


def test_an_edited_manifest_fails_its_checksum(pack_copy):
    manifest = manifest_of(pack_copy)
    manifest["experts"][3]["crc32"] ^= 1  # an edit of any value, not re-signed
    (pack_copy / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(CorruptPackError, match=r"manifest\.json: fails its checksum"):
        Pack(pack_copy)
    del manifest["manifest_crc32"]
    (pack_copy / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(CorruptPackError, match=r"manifest\.json: manifest_crc32 must be a crc32"):
        Pack(pack_copy)


def test_manifest_checksum_does_not_depend_on_layout(pack_copy):
    manifest = manifest_of(pack_copy)
    (pack_copy / MANIFEST).write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=None))
    with Pack(pack_copy) as pack:
        pack.verify_all()


def test_config_json_must_agree_with_the_manifest(pack_copy):
    rope = manifest_of(pack_copy)["config"]["rope_parameters"]
    rewrite_config(pack_copy, rope_parameters=dict(rope, rope_theta=500000.0))  # what ModelConfig.from_dir reads
    with pytest.raises(CorruptPackError, match=r"config\.json: rope_parameters is \{.*'rope_theta': 500000\.0.*\} but manifest\.json's config says \{.*'rope_theta': 10000\.0"):
        Pack(pack_copy)
    with pytest.raises(CorruptPackError, match="rope_parameters"):
        Engine.load(pack_copy, device="cpu")
    raw = manifest_of(pack_copy)["config"]
    (pack_copy / "config.json").write_text(json.dumps(dict(reversed(list(raw.items()))), indent=4))  # same values
    Pack(pack_copy).close()
    (pack_copy / "config.json").write_text(json.dumps(dict(raw, extra_field=1)))
    with pytest.raises(CorruptPackError, match=r"extra_field is 1 but manifest\.json's config says absent"):
        Pack(pack_copy)


def test_packs_of_versions_1_and_2_still_open_and_give_the_same_logits(packs, pack_copy, tmp_path):
    v3 = packs[(WINDOWED.name, "float32")]
    v1 = Path(shutil.copytree(pack_copy, tmp_path / "v1"))
    as_version_2(pack_copy)
    manifest = manifest_of(v1)
    manifest["format_version"] = 1
    for key in ("dense_crc32", "manifest_crc32"):
        manifest.pop(key, None)
    manifest["weight_format"].pop("attention", None)
    (v1 / MANIFEST).write_text(json.dumps(manifest))
    want = Engine.load(v3, device="cpu").logits(IDS)
    for old, version in ((pack_copy, 2), (v1, 1)):
        with Pack(old) as pack:
            assert pack.version == version and pack.without_checksums == ("dense.safetensors", "manifest.json")
            pack.verify_all()
        assert torch.equal(Engine.load(old, device="cpu", experts_per_layer=4, ram=0).logits(IDS), want)
    with Pack(v3) as pack:
        assert pack.without_checksums == ()


# ---- expert records -------------------------------------------------------------------------------


def test_nan_in_a_record_is_refused_at_its_first_read(pack_copy):
    entry = manifest_of(pack_copy)["experts"][1 * 8 + 3]
    with Pack(pack_copy) as pack:
        w2 = pack.layout.matrices[2]
    with open(pack_copy / "experts.bin", "r+b") as f:
        f.seek(entry["offset"] + w2.offset + 4 * 10)
        f.write(struct.pack("<f", math.nan))
    rechecksum_record(pack_copy, 1, 3)  # a record written with a NaN passes its checksum
    with Pack(pack_copy) as pack:
        pack.expert(1, 2)
        with pytest.raises(CorruptPackError, match=r"experts\.bin: expert 3 of layer 1 \(offset \d+\): w2 data holds 1 non-finite value \(1 NaN, 0 Inf\), the first at \[0, 10\]"):
            pack.expert(1, 3)
    with pytest.raises(CorruptPackError, match="expert 3 of layer 1"):
        Engine.load(pack_copy, device="cpu")


def test_a_quantized_records_scales_are_checked(model_dirs, tmp_path):
    out = convert(model_dirs[WINDOWED.name], tmp_path / "nf4", expert_format="nf4")
    entry = manifest_of(out)["experts"][2 * 8 + 6]
    with Pack(out) as pack:
        w1 = pack.layout.matrices[0]
        assert [t.name for t in pack.layout.fmt.tensor_specs(w1.shape)][0] == "absmax"  # first in the matrix
    with open(out / "experts.bin", "r+b") as f:
        f.seek(entry["offset"] + w1.offset + 4 * 5)
        f.write(struct.pack("<f", math.inf))
    rechecksum_record(out, 2, 6)
    with Pack(out) as pack:
        with pytest.raises(CorruptPackError, match=r"expert 6 of layer 2 \(offset \d+\): w1 absmax holds 1 non-finite value \(0 NaN, 1 Inf\), the first at \[5\]"):
            pack.expert(2, 6)


def test_nan_in_a_checkpoint_expert_is_refused_naming_file_and_tensor(model_copy):
    name = "model.layers.2.block_sparse_moe.experts.5.w3.weight"
    poke(shard_with(model_copy, name), name, 100, math.nan)
    with Checkpoint(model_copy) as ck:
        ck.expert(2, 4)
        with pytest.raises(CorruptCheckpointError, match=rf"{shard_with(model_copy, name).name}: tensor '{re.escape(name)}' holds 1 non-finite"):
            ck.expert(2, 5)
    with pytest.raises(CorruptCheckpointError, match=re.escape(name)):
        Engine.load(model_copy, device="cpu")  # every expert resident
    engine = Engine.load(model_copy, device="cpu", experts_per_layer=8, ram=0)  # records from the checkpoint
    with pytest.raises(CorruptCheckpointError, match=re.escape(name)):
        engine.cache.source.read_record(2, 5, torch.empty(engine.cache.layout.nbytes, dtype=torch.uint8))


def test_nan_in_a_fused_checkpoint_expert_names_the_expert(tmp_path):
    model = write_tiny_mixtral(tmp_path / "fused", WINDOWED, layout="fused")
    path = model / "model.safetensors"
    c = WINDOWED.config_kwargs()
    I, D = c["intermediate_size"], c["hidden_size"]
    poke(path, "model.layers.1.mlp.experts.gate_up_proj", 3 * 2 * I * D + I * D + 7, math.inf)  # expert 3, w3
    with Checkpoint(model) as ck:
        with pytest.raises(CorruptCheckpointError, match=r"gate_up_proj' \(expert 3, w3\) holds 1 non-finite value \(0 NaN, 1 Inf\), the first at \[0, 7\]"):
            ck.expert(1, 3)


@pytest.mark.parametrize("attn_bits", [None, 8])
def test_nan_in_a_checkpoints_dense_weight_is_refused_at_load(model_copy, attn_bits):
    name = "model.layers.0.self_attn.q_proj.weight"
    poke(shard_with(model_copy, name), name, 0, math.nan)
    with pytest.raises(CorruptCheckpointError, match=rf"tensor '{re.escape(name)}' holds 1 non-finite value \(1 NaN, 0 Inf\)"):
        Engine.load(model_copy, device="cpu", attn_bits=attn_bits)


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp32", "int8", "nf4", "nf4-dq", "fp4", "nf4-cpu"])
def test_the_checked_float_spans_are_where_the_record_views_are(fmt):
    from offload.experts.record import RecordLayout
    from offload.pack import float_spans
    from offload.quant import get_format

    raw = dict(WINDOWED.config_kwargs(), architectures=["MixtralForCausalLM"], intermediate_size=128)  # nf4-cpu fits
    config = ModelConfig.from_dict(raw)
    layout = RecordLayout.for_config(config, get_format(fmt))
    record = torch.zeros(layout.nbytes, dtype=torch.uint8)
    base = record.data_ptr()
    want = []
    for slot, weight in zip(layout.matrices, layout.views(record)):
        tensors = {"data": weight} if layout.plain else weight.tensors
        for name, t in tensors.items():
            if t.is_floating_point():
                start = t.data_ptr() - base
                want.append((slot.name, name, start, start + t.numel() * t.element_size(), t.dtype))
    assert float_spans(layout) == want and want


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    n=st.integers(0, 600_000),
    bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf, 65504.0, -0.0])), max_size=3),
)
def test_the_finite_test_agrees_with_isfinite(dtype, n, bad):
    """The exponent-bit test (numpy, in chunks) against torch.isfinite, on tensors long enough
    to span several chunks, with NaN, Inf and large finite values placed anywhere."""
    from offload.checkpoint import all_finite

    t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) * 100
    for where, value in bad:
        if n:
            t[int(where * n)] = value
    assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(t.reshape(-1, 2) if n % 2 == 0 and n else t) == bool(torch.isfinite(t).all())


# ---- float16 overflow -----------------------------------------------------------------------------


def test_convert_to_float16_refuses_values_beyond_its_range(model_copy, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    poke(shard_with(model_copy, name), name, 17, -123456.0)
    out = tmp_path / "fp16"
    with pytest.raises(SettingError, match=rf"tensor '{re.escape(name)}' has values up to 123456 in magnitude, beyond float16's largest 65504"):
        convert(model_copy, out, dtype=torch.float16)
    assert not out.exists()
    with pytest.raises(SettingError, match=re.escape(name)):
        Engine.load(model_copy, device="cpu", dtype="float16")
    convert(model_copy, tmp_path / "bf16", dtype=torch.bfloat16)  # bf16 holds it


def test_convert_to_float16_refuses_an_expert_beyond_its_range(model_copy, tmp_path):
    name = "model.layers.2.block_sparse_moe.experts.6.w2.weight"
    poke(shard_with(model_copy, name), name, 3, 70000.0)
    with pytest.raises(SettingError, match=rf"tensor '{re.escape(name)}' has values up to 70000 in magnitude, beyond float16's largest"):
        convert(model_copy, tmp_path / "fp16", dtype=torch.float16)
    with pytest.raises(SettingError, match=re.escape(name)):
        Engine.load(model_copy, device="cpu", dtype="float16")  # resident experts cast on load
    with pytest.raises(SettingError, match=rf"tensor '{re.escape(name)}' has values up to 70000"):
        Engine.load(model_copy, device="cpu", dtype="float16", experts_per_layer=2)  # the cache's records too
    convert(model_copy, tmp_path / "nf4", dtype=torch.float16, expert_format="nf4")  # absmax in fp32: fits


def test_convert_refuses_a_checkpoint_with_nan(model_copy, tmp_path):
    name = "model.norm.weight"
    poke(shard_with(model_copy, name), name, 2, math.nan)
    with pytest.raises(CorruptCheckpointError, match=rf"tensor '{re.escape(name)}' holds 1 non-finite"):
        convert(model_copy, tmp_path / "pack")


# ---- safetensors files and the index ------------------------------------------------------------


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }, bytes(24))
    with pytest.raises(CorruptCheckpointError, match=r"x\.safetensors: tensor 'b' data \[\d+, \d+\) overlaps tensor 'a'"):
        read_header(path)


def test_overlapping_tensors_in_a_checkpoint_shard_are_refused(model_copy):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    shard = shard_with(model_copy, a)
    assert shard_with(model_copy, b) == shard
    data = shard.read_bytes()
    n, header = header_of(shard)
    header[b]["data_offsets"] = header[a]["data_offsets"]  # b reads a's bytes
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    shard.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(CorruptCheckpointError, match=r"overlaps tensor"):
        Checkpoint(model_copy)


def test_a_tensor_in_two_shards_without_an_index_is_refused(model_copy):
    name = "model.layers.1.block_sparse_moe.gate.weight"
    original = load_file(shard_with(model_copy, name))[name]
    (model_copy / "model.safetensors.index.json").unlink()
    save_file({name: original + 1}, str(model_copy / "zz-extra.safetensors"))  # read last
    with pytest.raises(CorruptCheckpointError, match=rf"zz-extra\.safetensors: tensor '{re.escape(name)}' is also in model-\d+-of-\d+\.safetensors, and no model\.safetensors\.index\.json"):
        Checkpoint(model_copy)


def test_with_an_index_the_indexed_shard_wins_a_duplicate(model_copy):
    name = "model.layers.0.block_sparse_moe.gate.weight"
    home = shard_with(model_copy, name)
    truth = load_file(home)[name]
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    other = model_copy / next(s for s in reversed(shards) if s != home.name)  # read after the home shard
    tensors = load_file(other)
    tensors[name] = truth + 1
    save_file(tensors, str(other), metadata={"format": "pt"})
    with Checkpoint(model_copy) as ck:
        assert torch.equal(ck.dense("router", 0), truth)


def test_a_config_with_fewer_layers_than_the_checkpoint_is_refused(model_copy):
    rewrite_config(model_copy, num_hidden_layers=2)
    with pytest.raises(ConfigMismatchError, match=r"tensor 'model\.layers\.2\..*' is of layer 2, but .*config\.json says num_hidden_layers 2"):
        Checkpoint(model_copy)


def test_a_header_length_beyond_the_file_is_refused_before_allocating(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(CorruptCheckpointError, match=r"header length 18446744073709551615 points past the end of the file \(10 bytes\)"):
        read_header(path)


@pytest.mark.parametrize(
    "index, complaint",
    [
        ({"weight_map": {"model.norm.weight": 7}}, r"tensor 'model\.norm\.weight' maps to 7, not a shard file name"),
        ({"weight_map": {"model.norm.weight": "../model.safetensors"}}, r"maps to '\.\./model\.safetensors'"),
        ({"weight_map": {"model.norm.weight": ["a"]}}, r"maps to \['a'\]"),
        ({"weight_map": []}, r"weight_map"),
        ([1, 2], r"weight_map"),
    ],
)
def test_a_malformed_index_is_refused_naming_the_field(model_copy, index, complaint):
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json: .*" + complaint):
        Checkpoint(model_copy)


def test_a_deeply_nested_index_or_header_is_a_corrupt_checkpoint_error(model_copy, tmp_path):
    (model_copy / "model.safetensors.index.json").write_text('{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CorruptCheckpointError, match=r"index\.json: not a valid safetensors index \(nested too deeply\)"):
        Checkpoint(model_copy)
    deep = ("{" + '"a":' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CorruptCheckpointError, match=r"header is not valid JSON \(nested too deeply\)"):
        read_header(tmp_path / "x.safetensors")


# ---- fuzzing ---------------------------------------------------------------------------------------

LEAVES = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63), 10**400, 1e308, -0.0, "", "F32", "bf16"])
)
JSON = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DEEP = "[" * 50_000 + "]" * 50_000  # RecursionError in json.loads, which must become an OffloadError
DEEP_OBJECT = '{"a":' * 50_000 + "1" + "}" * 50_000


def timed(call):
    """Run ``call``; returns (result or the OffloadError raised, seconds). Any other exception fails."""
    start = time.perf_counter()
    try:
        result = call()
    except OffloadError as exc:
        result = exc
    event("refused" if isinstance(result, OffloadError) else "loaded")  # --hypothesis-show-statistics
    return result, time.perf_counter() - start


# -- safetensors header --


def check_entries(path: Path, entries) -> None:
    """What a successful read_header promises, checked from the file itself, and safetensors'
    own reader agrees wherever it accepts the file."""
    size = path.stat().st_size
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    spans = []
    for name, e in entries.items():
        assert 8 + n <= e.start <= e.end <= size
        assert e.end - e.start == math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        spans.append((e.start, e.end))
    spans = sorted(s for s in spans if s[1] > s[0])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def safetensors_view(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


@settings(max_examples=150, **FUZZ)
@given(data=st.binary(max_size=300))
@example(data=b"")
@example(data=struct.pack("<Q", 2**63) + b"{}")
@example(data=struct.pack("<Q", len(DEEP)) + DEEP.encode())
def test_fuzz_safetensors_bytes(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.safetensors"
    path.write_bytes(data)
    result, seconds = timed(lambda: read_header(path))
    assert seconds < 1.0
    if not isinstance(result, OffloadError):
        check_entries(path, result)


ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(SAFETENSORS_DTYPES)) | JSON,
    "shape": st.lists(st.integers(0, 6), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(0, 80), min_size=2, max_size=2) | JSON,
})
HEADERS = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__", "w.weight"]), ENTRY | JSON, max_size=4) | JSON


@settings(max_examples=200, **FUZZ)
@given(header=HEADERS, tail=st.integers(0, 96))
def test_fuzz_safetensors_header_values(tmp_path_factory, header, tail):
    path = tmp_path_factory.getbasetemp() / "fuzz-header.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(tail)))
    result, seconds = timed(lambda: read_header(path))
    assert seconds < 1.0
    if isinstance(result, OffloadError):  # refused: safetensors' own reader refuses it too
        assert safetensors_view(path) is None, result
        return
    check_entries(path, result)
    theirs = safetensors_view(path)
    if theirs is not None:  # the independent reader accepts the file: both read the same tensors
        assert set(theirs) == set(result)
        for name, e in result.items():
            with open(path, "rb") as f:
                f.seek(e.start)
                assert theirs[name].contiguous().view(torch.uint8).numpy().tobytes() == f.read(e.end - e.start)


# -- index JSON --


@pytest.fixture(scope="module")
def fuzz_model(model_dirs, tmp_path_factory) -> tuple[Path, dict, dict]:
    """(a copy of the windowed checkpoint, its index, what it reads: expert and dense tensors)."""
    dest = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(model_dirs[WINDOWED.name], dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    with Checkpoint(dest) as ck:
        truth = read_checkpoint(ck)
    return dest, index, truth


def read_checkpoint(ck: Checkpoint) -> dict:
    out = {("expert", l, e): ck.expert(l, e) for l in range(3) for e in range(8)}
    out |= {("dense", "router", l): ck.dense("router", l) for l in range(3)}
    out[("dense", "embed_tokens", None)] = ck.dense("embed_tokens")
    return out


def mutations(index: dict):
    names = sorted(index["weight_map"])
    whole = JSON.map(lambda v: ("whole", v))
    top = st.tuples(st.just("top"), st.sampled_from(["weight_map", "metadata", "metadata", "other"]), JSON)
    entry = st.tuples(st.just("entry"), st.sampled_from(names), JSON)
    key = st.tuples(st.just("key"), st.sampled_from(names), st.text(max_size=30))
    return top | whole | entry | key  # top-level keys but weight_map are not read: those must load


def apply_index(index: dict, mutation) -> object:
    kind = mutation[0]
    if kind == "whole":
        return mutation[1]
    out = json.loads(json.dumps(index))
    if kind == "top":
        out[mutation[1]] = mutation[2]
    elif kind == "entry":
        out["weight_map"][mutation[1]] = mutation[2]
    else:
        out["weight_map"][mutation[2]] = out["weight_map"].pop(mutation[1])
    return out


@settings(max_examples=80, **FUZZ)
@given(data=st.data())
def test_fuzz_index_json(fuzz_model, data):
    model, index, truth = fuzz_model
    mutation = data.draw(mutations(index))
    text = json.dumps(apply_index(index, mutation), allow_nan=True)
    if data.draw(st.booleans(), label="bytes instead") and mutation[0] == "whole":
        text = data.draw(st.sampled_from([DEEP, DEEP_OBJECT, "{", "\xff", '{"weight_map": {"a": 1e999}}']))
    (model / "model.safetensors.index.json").write_text(text, errors="surrogateescape")

    def load():
        with Checkpoint(model) as ck:
            return read_checkpoint(ck)

    result, seconds = timed(load)
    assert seconds < 1.5
    if not isinstance(result, OffloadError):  # a correct load: every tensor as the real index gives it
        for k, want in truth.items():
            got = result[k]
            assert all(torch.equal(a, b) for a, b in zip(got, want)) if k[0] == "expert" else torch.equal(got, want)


# -- config.json --

CONFIG_FIELDS = sorted(set(MIXTRAL_8X7B) | {"head_dim", "rope_parameters", "rope_scaling", "dtype"})


def check_config(c: ModelConfig) -> None:
    """What an accepted config promises, checked independently of config.py."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                 "max_position_embeddings"):
        v = getattr(c, name)
        assert type(v) is int and 1 <= v <= MAX_SIZE, name
    assert c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim % 2 == 0
    assert c.num_experts_per_tok <= c.num_local_experts
    assert type(c.rms_norm_eps) is float and 0 < c.rms_norm_eps < 1 and math.isfinite(c.rms_norm_eps)
    assert type(c.rope_theta) is float and c.rope_theta > 0 and math.isfinite(c.rope_theta)
    assert c.sliding_window is None or (type(c.sliding_window) is int and c.sliding_window >= 1)
    assert type(c.tie_word_embeddings) is bool
    assert c.torch_dtype is None or isinstance(c.torch_dtype, str)
    hash(c)  # frozen and made of hashable values


@settings(max_examples=300, **FUZZ)
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), JSON, min_size=1, max_size=3))
def test_fuzz_config_fields(changes):
    raw = dict(MIXTRAL_8X7B, **changes)
    result, seconds = timed(lambda: ModelConfig.from_dict(raw, source="config.json"))
    assert seconds < 0.5
    if isinstance(result, OffloadError):
        assert isinstance(result, ConfigError) and str(result).startswith("config.json: ")
        return
    check_config(result)
    base = ModelConfig.from_dict(MIXTRAL_8X7B)
    for field, value in vars(base).items():  # an unchanged field reads as before
        if field not in changes and not (field == "head_dim" and {"hidden_size", "num_attention_heads"} & set(changes)) \
                and not (field == "num_key_value_heads" and "num_key_value_heads" in changes) \
                and not (field == "rope_theta" and {"rope_parameters", "rope_scaling"} & set(changes)) \
                and not (field == "torch_dtype" and "dtype" in changes):
            assert getattr(result, field) == value, field


@settings(max_examples=100, **FUZZ)
@given(data=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
@example(data=DEEP.encode())
@example(data=DEEP_OBJECT.encode())
@example(data=b'{"vocab_size": ' + b"9" * 5000 + b"}")
def test_fuzz_config_json_bytes(tmp_path_factory, data):
    folder = tmp_path_factory.getbasetemp() / "fuzz-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    result, seconds = timed(lambda: ModelConfig.from_dir(folder))
    assert seconds < 0.5
    if not isinstance(result, OffloadError):
        check_config(result)


# -- manifest.json --


@pytest.fixture(scope="module")
def fuzz_pack(packs, tmp_path_factory) -> tuple[Path, dict, dict]:
    """(a copy of the windowed fp32 pack, its manifest, what it reads)."""
    dest = tmp_path_factory.mktemp("fuzz") / "pack"
    shutil.copytree(packs[(WINDOWED.name, "float32")], dest)
    manifest = manifest_of(dest)
    with Pack(dest) as pack:
        truth = read_pack(pack)
    return dest, manifest, truth


def read_pack(pack: Pack) -> dict:
    out = {("expert", l, e): pack.expert(l, e) for l in range(3) for e in range(8)}
    out |= {("dense", k, l): pack.dense(k, l) for k, l in [("embed_tokens", None), ("norm", None), ("lm_head", None)]}
    out |= {("dense", k, l): pack.dense(k, l) for l in range(3) for k in ("q_proj", "router", "input_layernorm")}
    return out


def manifest_paths(manifest: dict) -> list[tuple]:
    """Every place a value sits in the manifest (a sample of the 24 record entries)."""
    paths = [(k,) for k in manifest] + [("new key",)]
    paths += [("config", k) for k in manifest["config"]]
    paths += [("weight_format", k) for k in manifest["weight_format"]]
    paths += [("record", k) for k in manifest["record"]] + [("record", "matrices", 1, "offset")]
    paths += [("experts", i, k) for i in (0, 13, 23) for k in manifest["experts"][0]] + [("experts", 24)]
    paths += [("dense_crc32", "header"), ("dense_crc32", "tensors", "model.norm.weight"), ("dense_crc32", "tensors", "x")]
    return paths


def set_path(manifest: dict, path: tuple, value) -> dict:
    out = json.loads(json.dumps(manifest))
    node = out
    for step in path[:-1]:
        node = node[step]
    if isinstance(node, list) and path[-1] >= len(node):
        node.append(value)
    else:
        node[path[-1]] = value
    return out


@settings(max_examples=250, **FUZZ)
@given(data=st.data())
def test_fuzz_manifest_fields(fuzz_pack, data):
    """Any JSON value anywhere in the manifest: an OffloadError, or a pack that reads exactly what
    the real one does. Re-signed (checksum recomputed, as a writer of that content would), the
    value reaches every check; not re-signed, any change of content must fail the checksum."""
    pack_dir, manifest, truth = fuzz_pack
    unread = [("synthetic",), ("tokenizer_files",), ("new key",)]  # fields Pack does not read: loads must succeed
    path = data.draw(st.sampled_from(unread) | st.sampled_from(manifest_paths(manifest)), label="path")
    value = data.draw(JSON, label="value")
    resign = data.draw(st.booleans(), label="re-signed")
    changed = set_path(manifest, path, value)
    if resign:
        try:
            changed["manifest_crc32"] = manifest_checksum(changed)
        except (TypeError, ValueError):
            pass
    (pack_dir / MANIFEST).write_text(json.dumps(changed, allow_nan=True))

    def load():
        with Pack(pack_dir) as pack:
            return read_pack(pack)

    result, seconds = timed(load)
    assert seconds < 1.5
    if isinstance(result, OffloadError):
        return
    if not resign:  # accepted unsigned: the content must be the original's
        assert json.dumps(changed, sort_keys=True) == json.dumps(manifest, sort_keys=True)
    for key, want in truth.items():
        got = result[key]
        if key[0] == "expert":
            assert all(torch.equal(a, b) for a, b in zip(got, want)), key
        else:
            assert torch.equal(got, want), key


@settings(max_examples=60, **FUZZ)
@given(data=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()))
@example(data=DEEP.encode())
@example(data=DEEP_OBJECT.encode())
@example(data=b'{"format": "offload-pack", "format_version": 3, "x": ' + b"9" * 5000 + b"}")
def test_fuzz_manifest_bytes(fuzz_pack, data):
    pack_dir = fuzz_pack[0]
    (pack_dir / MANIFEST).write_bytes(data)
    result, seconds = timed(lambda: Pack(pack_dir).close())
    assert seconds < 1.0
    assert isinstance(result, OffloadError), "random bytes are no manifest"
