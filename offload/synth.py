"""Synthetic packs: a built-in model's true shapes with seeded random weights, at disk speed.

What it is: ``synthesize`` writes an ordinary offload pack (``offload.pack``'s format, version
3, with its checksums: ``Pack`` reads it, so generate, bench and info take it) for a preset of
``offload.plan.BUILTIN_MODELS`` (Mixtral-8x7B and -8x22B, Qwen3-30B-A3B and -235B-A22B,
OLMoE-1B-7B, Qwen1.5-MoE-A2.7B; tests may pass a config.json dict instead), with only its first
N layers and random weights drawn from a seed, so the real sizes, record layout and I/O of a
model can be measured without its weights. Every dense tensor of the family's table is
written (``offload.pack.dense_specs``: q/k norms, biases, a shared expert and its gate, a dense
layer's MLP too). It is atomic as ``offload.pack.convert`` is (a hidden directory renamed at the
end) and holds two expert records in memory (one being made, one being written), never a whole
model.

How the weights are made. Quantized formats are generated in their stored representation, not
quantized: codes (4-bit pairs, int8 codes, double quantization's 8-bit scales) are random bytes
mapped through a 256-entry table of the byte distribution of one small Gaussian matrix that
bitsandbytes quantized (``offload.quant.quantize``, once per format and row length), scales
(block or row absmax) are drawn from 256 quantiles of that matrix's scales times the weight's
standard deviation (calibrated once so that codes and scales drawn independently still give the
sample's spread), and quant maps are that matrix's own (bitsandbytes' tables). So every
record is a valid ``RecordLayout`` record whose weights have the intended spread. Plain formats
(bf16, fp16, fp32) are random 16-bit indices into a table of 65,536 normal quantiles. A 2-D
weight [out, in] has standard deviation 1/sqrt(in), so activations stay finite through every
layer; embeddings have 1, norm weights 1 +- 0.1, projection biases 0 +- 0.02. Every tensor has
its own random stream (numpy's SFC64, seeded by (seed, tensor)), so a seed reproduces the pack
byte for byte. A writer
thread checksums and writes one record while the next is made, and records are handed to the
kernel's writeback as they are written (``offload.pack.start_writeback``), so the disk works
while the CPU does. The tokenizer is the bundled demo model's (4096
pieces), grown to the preset's vocabulary with user-defined pieces ``<synth N>``, so every id
the random model samples decodes (up to ``MAX_SYNTH_VOCAB`` ids, above every preset's: Qwen's
151,936 is the largest).

What it is not: a model. Its text is noise and its routing is random-uniform-ish; it is for
sizes, memory and speed. It never prints.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from offload.config import ModelConfig
from offload.demo import DEMO_MODEL_DIR
from offload.errors import ConfigError, SettingError
from offload.experts.record import RecordLayout
from offload.pack import (
    ATTENTION_KEYS,
    CONFIG_FILE,
    DENSE_FILE,
    DTYPE_NAMES,
    EXPERTS_FILE,
    OPTIONAL_TOKENIZER_FILES,
    TOKENIZER_MODEL,
    ProgressFn,
    RecordWriter,
    SafetensorsStreamWriter,
    atomic_pack_dir,
    check_target,
    copy_synced,
    dense_specs,
    progress_steps,
    file_tensors,
    pack_formats,
    quantized_attention,
    write_manifest,
)
from offload.plan import BUILTIN_MODELS
from offload.quant import QuantizedMatrix, WeightFormat, dequantize, quantize, tensor_specs

NORMAL_TABLE_SIZE = 1 << 16  # plain weights: a random 16-bit index into this many normal quantiles
CODE_TABLE_SIZE = 256  # quantized tensors: a random byte into this many quantiles of a real sample
CHUNK = 1 << 22  # elements (plain) or bytes (codes) made per step, so temporaries stay small
SAMPLE_ELEMENTS = 1 << 20  # the Gaussian matrix bitsandbytes quantizes per (format, row length)
INT8_SAMPLE_ROWS = 256  # int8 scales are row maxima: a sample of this many rows of the real length
NORM_SPREAD = 0.1  # norm weights: 1 +- this
BIAS_SPREAD = 0.02  # projection biases: 0 +- this

# random streams: (stream, ...) spawn keys of numpy's SeedSequence under the user's seed
DENSE_STREAM, EXPERT_STREAM, SAMPLE_STREAM = 0, 1, 2


def _bitgen(seed: int, key: tuple[int, ...]) -> np.random.SFC64:
    return np.random.SFC64(np.random.SeedSequence(seed, spawn_key=key))


def _random_bytes(bitgen: np.random.SFC64, n: int) -> np.ndarray:
    """n uniform random bytes (uint8 [n]) from the raw 64-bit output."""
    return bitgen.random_raw((n + 7) // 8).view(np.uint8)[:n]


@functools.cache
def _unit_quantiles() -> torch.Tensor:
    """[65536] fp64: the standard normal's quantiles at (i + 0.5) / 65536."""
    p = (torch.arange(NORMAL_TABLE_SIZE, dtype=torch.float64) + 0.5) / NORMAL_TABLE_SIZE
    return torch.special.ndtri(p)


@functools.cache
def _normal_table(dtype: torch.dtype, mean: float, std: float) -> torch.Tensor:
    """[65536] of ``dtype``: mean + std * the normal quantiles."""
    return (mean + std * _unit_quantiles()).to(dtype)


def _fill_normal(dest: torch.Tensor, mean: float, std: float, bitgen: np.random.SFC64) -> None:
    """Fill dest (contiguous, a float dtype) with N(mean, std) through the quantile table."""
    table = _normal_table(dest.dtype, mean, std)  # [65536]
    flat = dest.reshape(-1)  # a view: dest is contiguous
    n = flat.numel()
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        raw = bitgen.random_raw((m + 3) // 4).view(np.int16)[:m]  # [m] 16-bit indices
        index = torch.from_numpy(raw).to(torch.int32).bitwise_and_(0xFFFF)  # [m] in [0, 65536)
        torch.index_select(table, 0, index, out=flat[start : start + m])


def _fill_codes(dest: torch.Tensor, table: bytes, bitgen: np.random.SFC64) -> None:
    """Fill dest (contiguous uint8 or int8) with random bytes mapped through ``table`` (256 bytes)."""
    out = dest.view(torch.uint8).reshape(-1).numpy()  # [n] bytes, dest's memory
    n = out.shape[0]
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        out[start : start + m] = np.frombuffer(_random_bytes(bitgen, m).tobytes().translate(table), np.uint8)


def _fill_scales(dest: torch.Tensor, table: torch.Tensor, bitgen: np.random.SFC64) -> None:
    """Fill dest (contiguous, a float dtype) with entries of ``table`` ([256], dest's dtype)."""
    flat = dest.reshape(-1)
    index = torch.from_numpy(_random_bytes(bitgen, flat.numel()).copy()).to(torch.int32)  # [n] in [0, 256)
    torch.index_select(table, 0, index, out=flat)


def _quantiles(values: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced quantiles of ``values`` (any shape), at (i + 0.5) / count."""
    ordered = values.reshape(-1).sort().values
    at = ((torch.arange(count, dtype=torch.float64) + 0.5) * ordered.numel() / count).long()
    return ordered[at]


@functools.cache
def _recipe(fmt: WeightFormat, in_features: int, seed: int) -> dict[str, tuple[str, Any]]:
    """How to make each tensor of an [out, in_features] matrix in ``fmt``, learned from one
    Gaussian matrix (unit spread, ``in_features`` long rows) that bitsandbytes quantizes:
    name -> ("codes", 256-byte table) | ("scales", [256] fp64 unit quantiles) |
    ("fixed", tensor) | ("scaled", tensor times the weight's spread). The scales are calibrated
    so that a matrix made by the recipe has the sample's standard deviation."""
    if fmt.kind == "int8":
        rows = INT8_SAMPLE_ROWS
    else:  # 4-bit scales are per block of 64, whatever the row length: about 2^20 weights
        rows = max(32, -(-SAMPLE_ELEMENTS // in_features // 32) * 32)
    generator = np.random.Generator(_bitgen(seed, (SAMPLE_STREAM, in_features)))
    sample = torch.from_numpy(generator.standard_normal((rows, in_features), dtype=np.float32))  # [rows, In]
    shape = (rows, in_features)
    tensors = quantize(sample, fmt).tensors
    recipe: dict[str, tuple[str, Any]] = {}
    for spec in tensor_specs(shape, fmt):
        t = tensors[spec.name]
        if spec.name in ("quant_map", "nested_quant_map"):
            recipe[spec.name] = ("fixed", t.clone())  # bitsandbytes' own tables
        elif spec.name == "nested_offset":
            recipe[spec.name] = ("scaled", t.double())  # the mean block absmax
        elif spec.dtype in (torch.uint8, torch.int8):
            codes = _quantiles(t.view(torch.uint8), CODE_TABLE_SIZE)
            recipe[spec.name] = ("codes", bytes(codes.tolist()))
        else:
            recipe[spec.name] = ("scales", _quantiles(t.double(), CODE_TABLE_SIZE))
    # Codes and scales are drawn independently, which widens the weights a little (a block's
    # codes and its absmax are not independent in a real quantization): scale the scales so that
    # a matrix made by this recipe has the sample's own spread.
    made = {spec.name: torch.empty(spec.shape, dtype=spec.dtype) for spec in tensor_specs(shape, fmt)}
    _apply(recipe, made, shape, fmt, 1.0, seed, (SAMPLE_STREAM, in_features, 1))
    correction = float(sample.std()) / float(dequantize(QuantizedMatrix(fmt, shape, made), torch.float32).std())
    return {name: (kind, value * correction if kind in ("scales", "scaled") else value)
            for name, (kind, value) in recipe.items()}


def _apply(
    recipe: dict[str, tuple[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    shape: tuple[int, int],
    fmt: WeightFormat,
    std: float,
    seed: int,
    key: tuple[int, ...],
) -> None:
    for index, spec in enumerate(tensor_specs(shape, fmt)):
        kind, value = recipe[spec.name]
        dest = tensors[spec.name]
        if kind == "fixed":
            dest.copy_(value)
        elif kind == "scaled":
            dest.copy_((value * std).to(spec.dtype))
        elif kind == "codes":
            _fill_codes(dest, value, _bitgen(seed, key + (index,)))
        else:
            _fill_scales(dest, (value * std).to(spec.dtype), _bitgen(seed, key + (index,)))


def fill_matrix(
    tensors: Mapping[str, torch.Tensor],
    shape: tuple[int, int],
    fmt: WeightFormat,
    std: float,
    seed: int,
    key: tuple[int, ...],
) -> None:
    """Fill the stored tensors of one [out, in] matrix in ``fmt`` (``tensors``: name ->
    contiguous CPU tensor, as ``quant.tensor_specs`` lists them, e.g. views into a record) with
    random weights of spread ``std``, from the streams (seed, key + (tensor index,))."""
    if fmt.kind == "plain":
        _fill_normal(tensors["data"], 0.0, std, _bitgen(seed, key + (0,)))
        return
    _apply(_recipe(fmt, shape[1], seed), tensors, shape, fmt, std, seed, key)


def _dense_spread(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, standard deviation) of a dense weight (``key``: its ``dense_specs`` key)."""
    if key.endswith("_bias"):  # q, k, v, o projection biases (Qwen2, attention_bias)
        return 0.0, BIAS_SPREAD
    if len(shape) == 1:  # RMSNorm weights: the layers', the final one, q/k norms
        return 1.0, NORM_SPREAD
    if key == "embed_tokens":
        return 0.0, 1.0
    return 0.0, 1.0 / math.sqrt(shape[1])  # lm_head, attention, routers: [out, in]


def _model_config(model: str | Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(preset name or None, config.json dict) of a preset name or a config dict."""
    if isinstance(model, Mapping):
        return None, dict(model)
    key = str(model).strip().lower()
    if key not in BUILTIN_MODELS:
        raise ConfigError(f"{model!r}: no built-in model of that name (built in: {', '.join(BUILTIN_MODELS)})")
    return key, dict(BUILTIN_MODELS[key][1])


def synthesize(
    model: str | Mapping[str, Any],
    out_dir: str | Path,
    *,
    layers: int | None = None,
    expert_format: str | None = None,
    expert_bits: int | None = None,
    attn_bits: int | None = None,
    attn_format: str | None = None,
    target: str = "auto",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Write a synthetic pack of ``model`` (a ``BUILTIN_MODELS`` name, or a config.json dict)
    to ``out_dir``; returns ``out_dir``.

    ``layers``: its first N layers (default all; the pack's config says N). Experts are stored
    in ``expert_format`` or the format of ``expert_bits``, the attention projections in ``attn_format`` or that of
    ``attn_bits``, for the device ``target`` ("auto", "cpu", "cuda"; ``pack.pack_formats``),
    else unquantized in ``dtype`` (default the model's own, bf16). ``seed`` fixes every byte.
    An existing ``out_dir`` is an error unless ``force`` (a pack, or an empty directory, is then
    replaced once the new pack is complete); on any error nothing is left behind.
    """
    preset, raw = _model_config(model)
    source = f"built-in {preset}" if preset else "synthetic config"
    full = ModelConfig.from_dict(raw, source=source)
    total_layers = full.num_hidden_layers
    if layers is None:
        layers = total_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total_layers:
        raise SettingError(f"--layers {layers}: {preset or 'the model'} has {total_layers} layers; choose 1 to {total_layers}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SettingError(f"--seed {seed}: must be a non-negative integer")
    raw["num_hidden_layers"] = layers
    if isinstance(raw.get("mlp_only_layers"), list):  # Qwen's dense-MLP layers among the first N
        raw["mlp_only_layers"] = [v for v in raw["mlp_only_layers"] if not isinstance(v, int) or v < layers]
    config = ModelConfig.from_dict(raw, source=source)
    dtype = dtype or {n: d for d, n in DTYPE_NAMES.items()}.get(raw.get("torch_dtype"), torch.bfloat16)
    if dtype not in DTYPE_NAMES:
        raise SettingError(f"pack dtype {dtype} is not supported (choose {', '.join(DTYPE_NAMES.values())})")
    experts, attention = pack_formats(
        config, dtype, expert_format=expert_format, expert_bits=expert_bits, attn_format=attn_format,
        attn_bits=attn_bits, target=target,
    )
    pieces = _tokenizer_pieces()
    if config.vocab_size < pieces:
        raise SettingError(
            f"vocab_size {config.vocab_size}: the bundled tokenizer has {pieces} pieces; a synthetic model needs at least as many"
        )
    if config.vocab_size > MAX_SYNTH_VOCAB:
        raise SettingError(f"vocab_size {config.vocab_size}: a synthetic model takes at most {MAX_SYNTH_VOCAB}")
    out_dir = Path(out_dir)
    check_target(out_dir, force)
    with atomic_pack_dir(out_dir, force) as temp:
        entries, dense_checksums = _write(temp, raw, config, dtype, experts, attention, seed, progress)
        write_manifest(
            temp, raw, dtype, RecordLayout.for_config(config, experts), attention,
            _copy_tokenizer(temp, config.vocab_size),
            entries, dense_checksums=dense_checksums, synthetic={"preset": preset, "seed": seed, "layers": layers},
        )
    return out_dir


@functools.cache
def _tokenizer_pieces() -> int:
    from offload.tokenizer import Tokenizer

    return Tokenizer.from_dir(DEMO_MODEL_DIR).vocab_size


MAX_SYNTH_VOCAB = 1 << 20


def _copy_tokenizer(out: Path, vocab_size: int) -> list[str]:
    """The demo model's tokenizer files, its sentencepiece model grown to ``vocab_size`` pieces
    (``synthetic_pieces``), so that every id the random model can sample decodes."""
    names = [TOKENIZER_MODEL] + [n for n in OPTIONAL_TOKENIZER_FILES if (DEMO_MODEL_DIR / n).is_file()]
    for name in names:
        copy_synced(DEMO_MODEL_DIR / name, out / name)
    model = (DEMO_MODEL_DIR / TOKENIZER_MODEL).read_bytes()
    grown = model + synthetic_pieces(_tokenizer_pieces(), vocab_size)
    with open(out / TOKENIZER_MODEL, "wb") as f:
        f.write(grown)
        f.flush()
        os.fsync(f.fileno())
    return names


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def synthetic_pieces(first: int, end: int) -> bytes:
    """Serialized sentencepiece ``ModelProto.pieces`` entries for ids ``first .. end-1``: user-
    defined pieces named ``<synth N>`` (score 0), which decode to that text. Appended to a
    model file they extend its vocabulary (protobuf merges a repeated field's entries wherever
    they appear); written by hand, so no protobuf package is needed."""
    user_defined = 4  # ModelProto.SentencePiece.Type.USER_DEFINED
    out = bytearray()
    for i in range(first, end):
        name = f"<synth {i}>".encode()
        piece = b"\x0a" + _varint(len(name)) + name + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(user_defined)
        out += b"\x0a" + _varint(len(piece)) + piece  # field 1 (pieces), length-delimited
    return bytes(out)


def _write(
    out: Path,
    raw: dict[str, Any],
    config: ModelConfig,
    dtype: torch.dtype,
    experts: WeightFormat,
    attention: WeightFormat,
    seed: int,
    progress: ProgressFn | None,
) -> tuple[list[dict[str, int]], dict[str, Any]]:
    """config.json, dense.safetensors and experts.bin of the pack, into ``out``; returns the
    manifest's record entries and the dense file's checksums."""
    with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
        f.flush()
        os.fsync(f.fileno())

    layers, per_layer = config.num_moe_layers, config.num_local_experts  # records: the layers with experts
    specs = list(dense_specs(config))
    step = progress_steps(len(specs) + layers * per_layer, progress)

    writer = SafetensorsStreamWriter(out / DENSE_FILE, [t for s in specs for t in file_tensors(s, dtype, attention)])
    try:
        for index, spec in enumerate(specs):
            mean, std = _dense_spread(spec.key, spec.shape)
            if spec.key in ATTENTION_KEYS and quantized_attention(attention):
                stored = tensor_specs(spec.shape, attention)
                tensors = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in stored}
                fill_matrix(tensors, spec.shape, attention, std, seed, (DENSE_STREAM, index))
                for t in stored:
                    writer.write(tensors[t.name])
            else:
                tensor = torch.empty(spec.shape, dtype=dtype)
                _fill_normal(tensor, mean, std, _bitgen(seed, (DENSE_STREAM, index, 0)))
                writer.write(tensor)
            step(spec.name)
        writer.finish()
    finally:
        writer.close()
    dense_checksums = writer.checksums()

    # Two record buffers: one is made here while a writer thread checksums and writes the other
    # (zlib and pwrite release the GIL), in order, so the manifest's entries stay layer-major.
    layout = RecordLayout.for_config(config, experts)
    buffers = [torch.zeros(layout.stride, dtype=torch.uint8) for _ in range(2)]  # gaps, padding stay zero
    views = [layout.views(b) for b in buffers]  # w1, w3, w2 inside each buffer
    pending: list[Future | None] = [None, None]
    records = RecordWriter(out / EXPERTS_FILE, layout, per_layer)
    writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-synth-writer")
    try:
        for index in range(layers * per_layer):
            layer, expert = divmod(index, per_layer)
            i = index % 2
            if pending[i] is not None:
                pending[i].result()  # that buffer's write is done (and raised, if it failed)
            for m, (slot, view) in enumerate(zip(layout.matrices, views[i])):
                tensors = {"data": view} if layout.plain else view.tensors
                std = 1.0 / math.sqrt(slot.shape[1])
                fill_matrix(tensors, slot.shape, experts, std, seed, (EXPERT_STREAM, layer, expert, m))
            pending[i] = writer_thread.submit(records.write, layer, expert, buffers[i])
            step(f"layer {layer} expert {expert}")
        for future in pending:
            if future is not None:
                future.result()
        records.finish()
    finally:
        writer_thread.shutdown(wait=True)  # no write may outlive the file
        records.close()
    return records.entries, dense_checksums
