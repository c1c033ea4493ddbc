"""Lazy reader of Hugging Face safetensors checkpoints (single file or sharded with an index).

What it is: the one place that looks tensors up by name. Data tables (the shared one here and
each family's own in ``offload.families``) map the engine's logical weights to checkpoint
names in both layouts MoE checkpoints are found in on disk (the hub layout, one
tensor per expert matrix, and the fused layout of newer transformers, all experts of a layer in
one 3-D tensor). On open it parses every shard header (a few KiB each, no weights), and checks
that every tensor the model needs is present, lies inside its file, and has the right shape and
a floating dtype; a failure raises a typed error naming the file and the tensor. Each weight is
a contiguous byte range in one file, so reading one expert reads only that expert's bytes.

What is checked, on open (headers only, no weights): the header length against the file's size
before anything is allocated; the header as JSON (any malformed value, deep nesting included,
is a ``CorruptCheckpointError``); every entry's dtype, shape and offsets as integers, its bytes
inside the file and not overlapping another tensor's; the index as a map of tensor names to
shard file names; a tensor in two shards that no index settles; a layer or expert in the files
that the config does not count (``ConfigMismatchError``). On the first read of each expert:
every value finite (``all_finite``: the exponent bits tested in numpy, ~9 GB/s for bf16 on one
core of this project's CPU: 40 ms for a 352 MB bf16 Mixtral-8x7B expert; later reads are not
checked). Dense weights
are checked finite where they are loaded (``offload.loader``) or converted (``offload.pack``),
with ``check_finite`` and ``check_cast`` from here.

What it is not: a converter or a cache. It returns CPU tensors in the checkpoint's own dtype;
placing and casting them is the engine's job. It never unpickles anything: ``*.bin``/``*.pt``
checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from offload.config import ModelConfig
from offload.errors import (
    CheckpointError,
    ConfigMismatchError,
    CorruptCheckpointError,
    MissingShardError,
    MissingTensorError,
    SettingError,
    TensorShapeError,
    shown,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ShapeOf = Callable[[ModelConfig], tuple[int, ...]]


# The tensor-name table. Dense weights: logical name -> (checkpoint names to try, shape).
# "{layer}" is filled in for per-layer weights.
DENSE_TABLE: dict[str, tuple[tuple[str, ...], ShapeOf]] = {
    "embed_tokens": (("model.embed_tokens.weight",), lambda c: (c.vocab_size, c.hidden_size)),
    "norm": (("model.norm.weight",), lambda c: (c.hidden_size,)),
    "lm_head": (("lm_head.weight",), lambda c: (c.vocab_size, c.hidden_size)),
}
# Per-layer weights every family has, by logical key; the router's names are the family's, and
# a family's own tensors (q/k norms, biases, a shared expert) come from ``layer_table``.
COMMON_LAYER_TABLE: dict[str, tuple[tuple[str, ...], ShapeOf]] = {
    "input_layernorm": (("model.layers.{layer}.input_layernorm.weight",), lambda c: (c.hidden_size,)),
    "post_attention_layernorm": (
        ("model.layers.{layer}.post_attention_layernorm.weight",),
        lambda c: (c.hidden_size,),
    ),
    "q_proj": (
        ("model.layers.{layer}.self_attn.q_proj.weight",),
        lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
    ),
    "k_proj": (
        ("model.layers.{layer}.self_attn.k_proj.weight",),
        lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
    ),
    "v_proj": (
        ("model.layers.{layer}.self_attn.v_proj.weight",),
        lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
    ),
    "o_proj": (
        ("model.layers.{layer}.self_attn.o_proj.weight",),
        lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
    ),
}


def layer_table(config: ModelConfig, layer: int = 0) -> dict[str, tuple[tuple[str, ...], ShapeOf]]:
    """Every dense weight of decoder layer ``layer`` in ``config``'s family: logical key ->
    (names, shape). A layer with experts has the router (and Qwen2's shared expert); a dense
    layer (Qwen's mlp_only_layers) has its MLP instead."""
    family = config.family_spec
    table = dict(COMMON_LAYER_TABLE)
    table.update(family.attention_tensors(config))
    if layer in config.dense_layers:
        table.update(family.dense_mlp_tensors(config))
    else:
        table["router"] = (family.router_names, lambda c: (c.num_local_experts, c.hidden_size))
        table.update(family.moe_tensors(config))
    return {key: (tensor[0], tensor[1]) for key, tensor in table.items()}


def hub_expert_table(config: ModelConfig) -> dict[str, tuple[str, ShapeOf]]:
    """Experts, hub layout: one tensor per matrix, named as the family names them. w1 (gate)
    and w3 (up) are [I, D], w2 (down) is [D, I]."""
    names = config.family_spec.expert_names
    return {
        "w1": (names["w1"], lambda c: (c.intermediate_size, c.hidden_size)),
        "w3": (names["w3"], lambda c: (c.intermediate_size, c.hidden_size)),
        "w2": (names["w2"], lambda c: (c.hidden_size, c.intermediate_size)),
    }


# Experts, fused layout: gate_up_proj [E, 2I, D] holds w1 rows then w3 rows; down_proj [E, D, I].
FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"
EXPERT_MATRICES = ("w1", "w3", "w2")
# A per-layer tensor's layer and, in the hub layout, its expert.
LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.(?:(?:block_sparse_moe|mlp)\.experts\.(\d+)\.)?")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: absolute [start, end) in ``file``."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class ByteRange(NamedTuple):
    """A contiguous piece of one tensor: one expert matrix, possibly inside a fused tensor."""

    entry: TensorEntry
    start: int  # absolute file offset
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.entry.dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# A float is NaN or Inf exactly when every bit of its exponent is set: (word type, exponent mask).
_EXPONENT_BITS: dict[torch.dtype, tuple[type, int]] = {
    torch.float16: (np.uint16, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float32: (np.uint32, 0x7F800000),
    torch.float64: (np.uint64, 0x7FF0000000000000),
}
_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                  torch.float64: torch.int64}
_FINITE_CHUNK = 1 << 18  # words masked at a time: a 1 MiB scratch at most


def finite_bytes(raw: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the floats of ``dtype`` whose bytes are ``raw`` (a 1-D uint8 array) are all
    finite. Tests the exponent bits in numpy, a chunk at a time: no torch op (so none in a
    decode step's count), the GIL released, ~9 GB/s (bf16) to ~15 GB/s (fp32) on one core."""
    word, mask = _EXPONENT_BITS[dtype]
    words = raw.view(word)
    mask = word(mask)
    scratch = np.empty(min(_FINITE_CHUNK, words.size), dtype=word)
    for start in range(0, words.size, _FINITE_CHUNK):
        piece = words[start : start + _FINITE_CHUNK]
        masked = scratch[: piece.size]
        np.bitwise_and(piece, mask, out=masked)
        if masked.max() == mask:  # masked words are at most the mask: equal means all bits set
            return False
    return True


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (True for a tensor of no floats): the exponent
    test of ``finite_bytes`` for a contiguous CPU tensor, else one ``aminmax`` pass (NaN
    propagates through min and max, Inf shows in one of them)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _EXPONENT_BITS:
        raw = tensor.view(_SAME_SIZE_INT[tensor.dtype]).numpy().reshape(-1).view(np.uint8)
        return finite_bytes(raw, tensor.dtype)
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(torch.stack((low, high))).all())


def describe_nonfinite(tensor: torch.Tensor) -> str:
    """What is not finite in ``tensor``, e.g. "2 non-finite values (1 NaN, 1 Inf), the first at
    [3, 17]" (counted only once something is known to be wrong)."""
    bad = ~torch.isfinite(tensor)
    count, nans = int(bad.sum()), int(torch.isnan(tensor).sum())
    first = bad.nonzero()[0].tolist() if tensor.dim() and count else []
    plural = "s" if count != 1 else ""
    return f"{count} non-finite value{plural} ({nans} NaN, {count - nans} Inf), the first at {first}"


def nonfinite(tensor: torch.Tensor) -> str | None:
    """None when every value of ``tensor`` is finite (or it holds no floats); else what is
    wrong (``describe_nonfinite``)."""
    return None if all_finite(tensor) else describe_nonfinite(tensor)


def check_finite(where: str, tensor: torch.Tensor, error: type[Exception] = CorruptCheckpointError) -> None:
    """Raise ``error`` naming ``where`` ("FILE: tensor 'NAME'") when ``tensor`` holds a NaN or Inf."""
    problem = nonfinite(tensor)
    if problem is not None:
        raise error(f"{where} holds {problem}; the file is damaged")


def check_cast(
    where: str, source: torch.Tensor, cast: torch.Tensor, error: type[Exception] = CorruptCheckpointError
) -> None:
    """``cast`` is ``source`` converted to another dtype (or ``source`` itself): refuse it when
    it is not finite, as damage (``error``) when ``source`` is not finite either, else as an
    overflow of the narrower dtype (``SettingError`` with the largest magnitude)."""
    if nonfinite(cast) is None:
        return
    check_finite(where, source, error)
    largest = float(source.detach().abs().max())
    name = str(cast.dtype).removeprefix("torch.")
    raise SettingError(
        f"{where} has values up to {largest:.6g} in magnitude, beyond {name}'s largest "
        f"{torch.finfo(cast.dtype).max:g}: they would become Inf; use --dtype bfloat16 or float32"
    )


def _int_list(value: object, length: int | None = None) -> list[int] | None:
    """``value`` as a list of non-negative ints (bools refused), or None."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        return None
    return value


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check that every tensor lies within the file, with
    integer offsets and shape, and that no two tensors' bytes overlap."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if 8 + header_len > size:  # checked before the header is read (allocated)
                raise CorruptCheckpointError(
                    f"{path}: header length {header_len} points past the end of the file "
                    f"({size} bytes); the file is truncated or not safetensors"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CorruptCheckpointError(
                    f"{path}: header length {header_len} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes"
                )
            raw_header = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{path}: header is not valid JSON") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")

    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        shape = _int_list(info.get("shape")) if isinstance(info, dict) else None
        offsets = _int_list(info.get("data_offsets"), 2) if isinstance(info, dict) else None
        if dtype is None or shape is None or offsets is None:
            raise CorruptCheckpointError(
                f"{path}: tensor {_quoted(name)} has a malformed or unsupported header entry: {_shown(info)} "
                f"(expected dtype one of {', '.join(SAFETENSORS_DTYPES)}, shape and data_offsets "
                f"lists of non-negative integers)"
            )
        begin, end = offsets
        if begin > end:
            raise CorruptCheckpointError(f"{path}: tensor {_quoted(name)} has data_offsets [{begin}, {end}] out of order")
        shape = tuple(shape)
        if end - begin != _numel(shape) * _itemsize(dtype):
            raise CorruptCheckpointError(
                f"{path}: tensor {_quoted(name)} spans {end - begin} bytes but shape {_shown(list(shape))} "
                f"of {dtype_name} needs {_numel(shape) * _itemsize(dtype)}"
            )
        if data_start + end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor {_quoted(name)} data [{data_start + begin}, {data_start + end}) is not "
                f"within the file bounds ({size} bytes); the file is truncated or corrupt"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    _refuse_overlaps(path, entries)
    return entries


def _refuse_overlaps(path: Path, entries: dict[str, TensorEntry]) -> None:
    """No two tensors with bytes may share any (a damaged or crafted header)."""
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (_, prev_end, prev), (start, end, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise CorruptCheckpointError(
                f"{path}: tensor {_quoted(name)} data [{start}, {end}) overlaps tensor {_quoted(prev)}, "
                f"which ends at {prev_end}; the header is damaged"
            )


def _shown(value: object, limit: int = 80) -> str:
    """``offload.errors.shown`` at this module's limit."""
    return shown(value, limit)


def _quoted(name: str) -> str:
    return "'" + (name if len(name) <= 200 else name[:197] + "...") + "'"


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files of a checkpoint and, when sharded, the index's tensor -> file map."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise CorruptCheckpointError(f"{index_path}: not a valid safetensors index (unreadable JSON)") from None
        except RecursionError:
            raise CorruptCheckpointError(f"{index_path}: not a valid safetensors index (nested too deeply)") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(
                f"{index_path}: not a valid safetensors index (\"weight_map\" must map tensor names to shard files)"
            )
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "\0" in shard or Path(shard).name != shard:
                raise CorruptCheckpointError(
                    f"{index_path}: tensor {_quoted(tensor)} maps to {_shown(shard)}, not a shard file name "
                    f"in {model_dir}"
                )
        files: list[Path] = []
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                example = next(t for t, s in weight_map.items() if s == shard)
                raise MissingShardError(
                    f"{path}: shard named by {INDEX_FILE} is missing (it holds {_quoted(example)})"
                )
            files.append(path)
        return files, weight_map
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single], {}
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found, {}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.pth")):
        raise CheckpointError(
            f"{model_dir}: only pickle checkpoints (*.bin/*.pt) found; offload reads safetensors only"
        )
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def find_tensor(
    entries: dict[str, TensorEntry],
    names: tuple[str, ...],
    shape: tuple[int, ...],
    where: Path,
    dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES,
    **fmt: int,
) -> TensorEntry:
    """The first of ``names`` (formatted with ``fmt``) present, checked for shape and dtype."""
    candidates = [n.format(**fmt) for n in names]
    name = next((n for n in candidates if n in entries), None)
    if name is None:
        raise MissingTensorError(f"{where}: tensor '{candidates[0]}' is in no file")
    entry = entries[name]
    if entry.dtype not in dtypes:
        expected = "a float weight" if dtypes == WEIGHT_DTYPES else " or ".join(map(str, dtypes))
        raise TensorShapeError(f"{entry.file}: tensor '{name}' has dtype {entry.dtype}, expected {expected}")
    if entry.shape != shape:
        raise TensorShapeError(
            f"{entry.file}: tensor '{name}' has shape {list(entry.shape)}, expected {list(shape)} from the config"
        )
    return entry


def dense_entries(
    entries: dict[str, TensorEntry],
    config: ModelConfig,
    where: Path,
    dtypes: tuple[torch.dtype, ...] = WEIGHT_DTYPES,
) -> tuple[dict[str, TensorEntry], list[dict[str, TensorEntry]]]:
    """Every dense weight the model needs, by logical name: (model-wide, per layer)."""
    c = config
    dense = {}
    for key, (names, shape_of) in DENSE_TABLE.items():
        if key == "lm_head" and c.tie_word_embeddings and not any(n in entries for n in names):
            continue
        dense[key] = find_tensor(entries, names, shape_of(c), where, dtypes)
    layers = [
        {
            key: find_tensor(entries, names, shape_of(c), where, dtypes, layer=layer)
            for key, (names, shape_of) in layer_table(c, layer).items()
        }
        for layer in range(c.num_hidden_layers)
    ]
    return dense, layers


def read_into(fd: int, buffer, offset: int) -> int:
    """Fill ``buffer`` (a writable buffer) from ``offset`` of ``fd``; returns the bytes read,
    fewer only when the file ends early."""
    done, want = 0, len(buffer)
    while done < want:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


class OpenFiles:
    """The file descriptors a reader holds, opened on first use and closed together."""

    open_error: type[Exception] = CheckpointError

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise self.open_error(f"{path}: cannot open: {exc.strerror or exc}") from None
            self._fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class WeightFiles(OpenFiles):
    """Dense weights by logical name, read from files whose headers were checked.

    Subclasses set ``_dense`` (model-wide) and ``_layers`` (per layer) from ``dense_entries``.
    """

    corrupt_error: type[Exception] = CorruptCheckpointError

    def __init__(self) -> None:
        super().__init__()
        self.bytes_read = 0  # weight bytes read, for tests and statistics
        self._dense: dict[str, TensorEntry] = {}
        self._layers: list[dict[str, TensorEntry]] = []

    def _read(self, where: ByteRange) -> torch.Tensor:
        out = torch.empty(where.shape, dtype=where.entry.dtype)
        buffer = out.view(torch.uint8).reshape(-1).numpy()
        path = where.entry.file
        fd = self.fd(path)
        if read_into(fd, buffer, where.start) != where.nbytes:
            raise self.corrupt_error(
                f"{path}: tensor '{where.entry.name}' ends early (file changed while reading?)"
            )
        self.bytes_read += where.nbytes
        return out

    def _entry(self, key: str, layer: int | None) -> TensorEntry:
        if layer is None:
            if key == "lm_head" and key not in self._dense:
                key = "embed_tokens"  # tied embeddings
            return self._dense[key]
        return self._layers[layer][key]

    def _read_entry(self, entry: TensorEntry) -> torch.Tensor:
        """One whole tensor of a file, passed through ``_verify_tensor``."""
        tensor = self._read(ByteRange(entry, entry.start, entry.shape or (1,))).reshape(entry.shape)  # 0-d as [1]
        self._verify_tensor(entry, tensor)
        return tensor

    def _verify_tensor(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        """A hook for readers that checksum what they read (the pack); nothing here."""

    def dense(self, key: str, layer: int | None = None) -> torch.Tensor:
        """A dense weight by logical name (see DENSE_TABLE and ``layer_table``)."""
        return self._read_entry(self._entry(key, layer))

    def where(self, key: str, layer: int | None = None) -> str:
        """"FILE: tensor 'NAME'" of a dense weight, for messages about it."""
        entry = self._entry(key, layer)
        return f"{entry.file}: tensor {_quoted(entry.name)}"


class Checkpoint(WeightFiles):
    """A validated, lazily read safetensors checkpoint of a model of any supported family."""

    def __init__(self, model_dir: str | Path, config: ModelConfig | None = None):
        super().__init__()
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a directory")
        self.config = config or ModelConfig.from_dir(self.model_dir)
        files, weight_map = _shard_files(self.model_dir)
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            for name, entry in read_header(path).items():
                other = self.entries.get(name)
                if other is not None and name not in weight_map:
                    raise CorruptCheckpointError(
                        f"{path}: tensor {_quoted(name)} is also in {other.file.name}, and no "
                        f"{INDEX_FILE} says which shard holds it"
                    )
                if other is None or weight_map.get(name) == path.name:  # the index settles a duplicate
                    self.entries[name] = entry
        for name, shard in weight_map.items():
            entry = self.entries.get(name)
            if entry is None or entry.file.name != shard:
                raise MissingTensorError(
                    f"{self.model_dir / shard}: tensor {_quoted(name)} listed in {INDEX_FILE} is not in that shard"
                )
        self._checked: set[tuple[int, int]] = set()  # experts whose values were checked finite
        self._validate()

    # ---- validation -------------------------------------------------------------------------

    def _validate(self) -> None:
        c = self.config
        self._refuse_uncounted()
        self._dense, self._layers = dense_entries(self.entries, c, self.model_dir)
        # indexed by expert layer (0 .. num_moe_layers - 1), named by decoder layer
        self._experts: list[list[dict[str, ByteRange]]] = [self._layer_experts(layer) for layer in c.moe_layers]

    def _refuse_uncounted(self) -> None:
        """A layer (or, in the hub layout, an expert) on disk that config.json does not count, or
        experts in a layer it says is dense: the config describes another model, or a truncated
        copy of it."""
        c = self.config
        for name in sorted(self.entries):
            found = LAYER_INDEX.match(name)
            if found is None:
                continue
            layer, expert = int(found.group(1)), found.group(2)
            if layer >= c.num_hidden_layers:
                raise ConfigMismatchError(
                    f"{self.entries[name].file}: tensor {_quoted(name)} is of layer {layer}, but "
                    f"{self.model_dir / 'config.json'} says num_hidden_layers {c.num_hidden_layers}"
                )
            if expert is not None and layer in c.dense_layers:
                raise ConfigMismatchError(
                    f"{self.entries[name].file}: tensor {_quoted(name)} is an expert of layer {layer}, which "
                    f"{self.model_dir / 'config.json'} makes dense (mlp_only_layers / decoder_sparse_step)"
                )
            if expert is not None and int(expert) >= c.num_local_experts:
                raise ConfigMismatchError(
                    f"{self.entries[name].file}: tensor {_quoted(name)} is of expert {expert}, but "
                    f"{self.model_dir / 'config.json'} says num_local_experts {c.num_local_experts}"
                )

    def _layer_experts(self, layer: int) -> list[dict[str, ByteRange]]:
        c = self.config
        D, I, E = c.hidden_size, c.intermediate_size, c.num_local_experts
        gate_up_name = FUSED_GATE_UP.format(layer=layer)
        if gate_up_name in self.entries:
            gate_up = find_tensor(self.entries, (gate_up_name,), (E, 2 * I, D), self.model_dir)
            down = find_tensor(self.entries, (FUSED_DOWN,), (E, D, I), self.model_dir, layer=layer)
            gate_up_size, down_size = _itemsize(gate_up.dtype), _itemsize(down.dtype)
            return [
                {
                    "w1": ByteRange(gate_up, gate_up.start + e * 2 * I * D * gate_up_size, (I, D)),
                    "w3": ByteRange(gate_up, gate_up.start + (e * 2 + 1) * I * D * gate_up_size, (I, D)),
                    "w2": ByteRange(down, down.start + e * D * I * down_size, (D, I)),
                }
                for e in range(E)
            ]
        experts = []
        for e in range(E):
            matrices = {}
            for key, (name, shape_of) in hub_expert_table(c).items():
                entry = find_tensor(self.entries, (name,), shape_of(c), self.model_dir, layer=layer, expert=e)
                matrices[key] = ByteRange(entry, entry.start, entry.shape)
            experts.append(matrices)
        return experts

    # ---- reading ----------------------------------------------------------------------------

    @property
    def layout(self) -> str:
        """'fused' when the first expert layer's experts are stored as 3-D tensors, else 'hub'."""
        return "fused" if FUSED_GATE_UP.format(layer=self.config.moe_layers[0]) in self.entries else "hub"

    def expert_ranges(self, layer: int, expert: int) -> dict[str, ByteRange]:
        """Where expert ``expert`` of expert layer ``layer`` (``config.moe_layers[layer]`` of
        the decoder) is on disk: w1 [I, D], w3 [I, D], w2 [D, I]."""
        return self._experts[layer][expert]

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read one expert's (w1, w3, w2), and nothing else; the first read of each expert checks
        that every value is finite (``CorruptCheckpointError`` naming the file and tensor)."""
        ranges = self.expert_ranges(layer, expert)
        weights = tuple(self._read(ranges[m]) for m in EXPERT_MATRICES)
        if (layer, expert) not in self._checked:
            for matrix, weight in zip(EXPERT_MATRICES, weights):
                entry = ranges[matrix].entry
                part = f" (expert {expert}, {matrix})" if entry.shape != ranges[matrix].shape else ""
                check_finite(f"{entry.file}: tensor {_quoted(entry.name)}{part}", weight, CorruptCheckpointError)
            self._checked.add((layer, expert))
        return weights  # type: ignore[return-value]
