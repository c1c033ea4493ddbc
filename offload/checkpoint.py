"""Lazy reader of Hugging Face safetensors checkpoints (single file or sharded with an index).

What it is: the one place that knows tensor names. A data table maps the engine's logical
weights to checkpoint names in both layouts Mixtral is found in on disk (the hub layout, one
tensor per expert matrix, and the fused layout of newer transformers, all experts of a layer in
one 3-D tensor). On open it parses every shard header (a few KiB each, no weights), and checks
that every tensor the model needs is present, lies inside its file, and has the right shape and
a floating dtype; a failure raises a typed error naming the file and the tensor. Each weight is
a contiguous byte range in one file, so reading one expert reads only that expert's bytes.

What it is not: a converter or a cache. It returns CPU tensors in the checkpoint's own dtype;
placing and casting them is the engine's job. It never unpickles anything: ``*.bin``/``*.pt``
checkpoints are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from offload.config import ModelConfig
from offload.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingShardError,
    MissingTensorError,
    TensorShapeError,
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
LAYER_TABLE: dict[str, tuple[tuple[str, ...], ShapeOf]] = {
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
    "router": (
        ("model.layers.{layer}.block_sparse_moe.gate.weight", "model.layers.{layer}.mlp.gate.weight"),
        lambda c: (c.num_local_experts, c.hidden_size),
    ),
}
# Experts, hub layout: one tensor per matrix. w1 (gate) and w3 (up) are [I, D], w2 (down) is [D, I].
HUB_EXPERT_TABLE: dict[str, tuple[str, ShapeOf]] = {
    "w1": ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
           lambda c: (c.intermediate_size, c.hidden_size)),
    "w3": ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
           lambda c: (c.intermediate_size, c.hidden_size)),
    "w2": ("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
           lambda c: (c.hidden_size, c.intermediate_size)),
}
# Experts, fused layout: gate_up_proj [E, 2I, D] holds w1 rows then w3 rows; down_proj [E, D, I].
FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"
EXPERT_MATRICES = ("w1", "w3", "w2")


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


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check that every tensor lies within the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CorruptCheckpointError(
                    f"{path}: header length {header_len} points past the end of the file "
                    f"({size} bytes); the file is truncated or not safetensors"
                )
            raw_header = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptCheckpointError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")

    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' has a malformed or unsupported header entry: {info!r}"
            ) from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CorruptCheckpointError(f"{path}: tensor '{name}' has negative shape or offsets")
        if end - begin != _numel(shape) * _itemsize(dtype):
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' spans {end - begin} bytes but shape {list(shape)} "
                f"of {info['dtype']} needs {_numel(shape) * _itemsize(dtype)}"
            )
        if data_start + end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' data [{data_start + begin}, {data_start + end}) is not "
                f"within the file bounds ({size} bytes); the file is truncated or corrupt"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    return entries


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files of a checkpoint and, when sharded, the index's tensor -> file map."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CorruptCheckpointError(f"{index_path}: not a valid safetensors index") from None
        files: list[Path] = []
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                example = next(t for t, s in weight_map.items() if s == shard)
                raise MissingShardError(
                    f"{path}: shard named by {INDEX_FILE} is missing (it holds '{example}')"
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
            for key, (names, shape_of) in LAYER_TABLE.items()
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

    def dense(self, key: str, layer: int | None = None) -> torch.Tensor:
        """A dense weight by logical name (see DENSE_TABLE and LAYER_TABLE)."""
        if layer is None:
            if key == "lm_head" and key not in self._dense:
                key = "embed_tokens"  # tied embeddings
            entry = self._dense[key]
        else:
            entry = self._layers[layer][key]
        return self._read(ByteRange(entry, entry.start, entry.shape))


class Checkpoint(WeightFiles):
    """A validated, lazily read safetensors checkpoint of a Mixtral-family model."""

    def __init__(self, model_dir: str | Path, config: ModelConfig | None = None):
        super().__init__()
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a directory")
        self.config = config or ModelConfig.from_dir(self.model_dir)
        files, weight_map = _shard_files(self.model_dir)
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            self.entries.update(read_header(path))
        for name, shard in weight_map.items():
            entry = self.entries.get(name)
            if entry is None or entry.file.name != shard:
                raise MissingTensorError(
                    f"{self.model_dir / shard}: tensor '{name}' listed in {INDEX_FILE} is not in that shard"
                )
        self._validate()

    # ---- validation -------------------------------------------------------------------------

    def _validate(self) -> None:
        c = self.config
        self._dense, self._layers = dense_entries(self.entries, c, self.model_dir)
        self._experts: list[list[dict[str, ByteRange]]] = [
            self._layer_experts(layer) for layer in range(c.num_hidden_layers)
        ]

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
            for key, (name, shape_of) in HUB_EXPERT_TABLE.items():
                entry = find_tensor(self.entries, (name,), shape_of(c), self.model_dir, layer=layer, expert=e)
                matrices[key] = ByteRange(entry, entry.start, entry.shape)
            experts.append(matrices)
        return experts

    # ---- reading ----------------------------------------------------------------------------

    @property
    def layout(self) -> str:
        """'fused' when layer 0's experts are stored as 3-D tensors, else 'hub'."""
        return "fused" if FUSED_GATE_UP.format(layer=0) in self.entries else "hub"

    def expert_ranges(self, layer: int, expert: int) -> dict[str, ByteRange]:
        """Where expert ``expert`` of ``layer`` is on disk: w1 [I, D], w3 [I, D], w2 [D, I]."""
        return self._experts[layer][expert]

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read one expert's (w1, w3, w2), and nothing else."""
        ranges = self.expert_ranges(layer, expert)
        return tuple(self._read(ranges[m]) for m in EXPERT_MATRICES)  # type: ignore[return-value]
