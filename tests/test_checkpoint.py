"""The safetensors reader: both tensor layouts, lazy expert reads, and typed errors for bad files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from offload.checkpoint import Checkpoint
from offload.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingShardError,
    MissingTensorError,
    TensorShapeError,
)
from tests.model_builder import WINDOWED, write_tiny_mixtral, rewrite_config


def all_tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def shard_of(model_dir, tensor: str):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][tensor]


def test_fixture_is_sharded_in_the_hub_layout(model_dirs):
    d = model_dirs[WINDOWED.name]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.2.block_sparse_moe.experts.7.w1.weight" in index["weight_map"]


def test_reads_every_weight_exactly_as_safetensors_does(model_dirs):
    d = model_dirs[WINDOWED.name]
    truth = all_tensors(d)
    with Checkpoint(d) as ck:
        assert ck.layout == "hub"
        assert torch.equal(ck.dense("embed_tokens"), truth["model.embed_tokens.weight"])
        assert torch.equal(ck.dense("router", 1), truth["model.layers.1.block_sparse_moe.gate.weight"])
        w1, w3, w2 = ck.expert(2, 5)
        prefix = "model.layers.2.block_sparse_moe.experts.5"
        assert torch.equal(w1, truth[f"{prefix}.w1.weight"])
        assert torch.equal(w3, truth[f"{prefix}.w3.weight"])
        assert torch.equal(w2, truth[f"{prefix}.w2.weight"])


def test_fused_layout_reads_the_same_experts(model_dirs, tmp_path):
    fused_dir = write_tiny_mixtral(tmp_path / "fused", WINDOWED, layout="fused")
    fused = load_file(fused_dir / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused  # really the fused layout
    with Checkpoint(fused_dir) as f, Checkpoint(model_dirs[WINDOWED.name]) as h:
        assert f.layout == "fused"
        for layer, expert in [(0, 0), (1, 7), (2, 3)]:
            for a, b in zip(f.expert(layer, expert), h.expert(layer, expert)):
                assert torch.equal(a, b)
        assert torch.equal(f.dense("router", 2), h.dense("router", 2))


def test_reading_one_expert_reads_only_its_bytes(model_dirs):
    c = WINDOWED.config_kwargs()
    with Checkpoint(model_dirs[WINDOWED.name]) as ck:
        ck.expert(1, 3)
        assert ck.bytes_read == 3 * c["hidden_size"] * c["intermediate_size"] * 4  # fp32


def test_missing_shard_names_the_file(model_copy):
    shard = shard_of(model_copy, "model.layers.1.block_sparse_moe.experts.0.w1.weight")
    shard.unlink()
    with pytest.raises(MissingShardError, match=shard.name):
        Checkpoint(model_copy)


def test_truncated_shard_names_file_and_tensor(model_copy):
    shard = shard_of(model_copy, "model.layers.0.self_attn.q_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}.*tensor '.*' data .* not within the file"):
        Checkpoint(model_copy)


def test_header_length_past_the_end(model_copy):
    shard = shard_of(model_copy, "model.embed_tokens.weight")
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: header length .* past the end"):
        Checkpoint(model_copy)


def test_header_offsets_past_the_end_name_the_tensor(model_copy):
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = shard_of(model_copy, name)
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    begin, end = header[name]["data_offsets"]
    shift = len(data)  # move this tensor's range beyond the file
    header[name]["data_offsets"] = [begin + shift, end + shift]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(CorruptCheckpointError, match=rf"tensor '{name}' data .* not within the file bounds"):
        Checkpoint(model_copy)


def test_garbage_header(model_copy):
    shard = shard_of(model_copy, "model.norm.weight")
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="header is not valid JSON"):
        Checkpoint(model_copy)


def test_wrong_shape_names_tensor_and_expected_shape(model_copy):
    rewrite_config(model_copy, intermediate_size=100)
    with pytest.raises(TensorShapeError, match=r"experts.0.w1.weight' has shape \[96, 64\], expected \[100, 64\]"):
        Checkpoint(model_copy)


def test_tensor_missing_from_every_shard(model_copy):
    rewrite_config(model_copy, num_hidden_layers=4)
    with pytest.raises(MissingTensorError, match="model.layers.3.input_layernorm.weight"):
        Checkpoint(model_copy)


def test_non_float_weight_is_refused(tmp_path):
    from safetensors.torch import save_file

    write_tiny_mixtral(tmp_path / "m", WINDOWED, layout="fused")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, str(path))
    with pytest.raises(TensorShapeError, match="'model.norm.weight' has dtype torch.int32"):
        Checkpoint(tmp_path / "m")


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(WINDOWED.config_kwargs(), architectures=["MixtralForCausalLM"])))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        Checkpoint(tmp_path)
