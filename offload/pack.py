"""The offload pack: the on-disk format every expert tier reads, its converter and its reader.

What it is: a directory holding ``manifest.json`` (format, version, the model's config.json,
the weight dtypes, the record layout and, per expert, its offset, length and crc32),
``dense.safetensors`` (every non-expert weight, under the hub names) and ``experts.bin`` (one
record per expert, laid out by ``RecordLayout``: w1, w3, w2 contiguous, each record on a 4 KiB
boundary, padding zero), next to copies of config.json and the tokenizer files, so that
``ModelConfig.from_dir`` and ``Tokenizer.from_dir`` work on a pack as on a checkpoint.

``convert`` streams a Hugging Face checkpoint (read through ``Checkpoint``) into a pack, one
tensor or one expert in memory at a time, and is atomic: it writes into a hidden sibling
directory, writes the manifest last and renames the directory into place, so an interrupted run
leaves nothing that looks like a pack. ``Pack`` validates a pack on open and reads one expert
record with one read, checking its crc32 the first time that expert is read.

What it is not: a cache or a tier (those decide when to read), and not quantization: a format
version after 1 adds quantized records. It never prints and never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from offload.checkpoint import (
    DENSE_TABLE,
    WeightFiles,
    LAYER_TABLE,
    SAFETENSORS_DTYPES,
    WEIGHT_DTYPES,
    Checkpoint,
    TensorEntry,
    dense_entries,
    read_header,
    read_into,
)
from offload.config import ModelConfig
from offload.errors import (
    CorruptPackError,
    PackError,
    SettingError,
)
from offload.experts.record import RECORD_ALIGNMENT, RecordLayout
from offload.model import ExpertWeights
from offload.quant import ALIASES, FORMATS, WeightFormat, get_format


def quant_alias(name: object) -> str | None:
    """A manifest's expert format name, with torch dtype names mapped to format names."""
    return ALIASES.get(name, name) if isinstance(name, str) else None

PACK_FORMAT = "offload-pack"
PACK_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
CONFIG_FILE = "config.json"
TOKENIZER_MODEL = "tokenizer.model"
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")

# progress(done, total, what): called once per tensor or expert written
ProgressFn = Callable[[int, int, str], None]

DTYPE_NAMES: dict[torch.dtype, str] = {d: str(d).removeprefix("torch.") for d in WEIGHT_DTYPES}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {d: n for n, d in SAFETENSORS_DTYPES.items()}


def _dtype_named(name: object) -> torch.dtype | None:
    return next((d for d, n in DTYPE_NAMES.items() if n == name), None)


def _dense_specs(config: ModelConfig) -> Iterator[tuple[str, str, int | None, tuple[int, ...]]]:
    """(hub name, logical key, layer, shape) of every dense weight a pack holds, in file order."""
    for key, (names, shape_of) in DENSE_TABLE.items():
        if key == "lm_head" and config.tie_word_embeddings:
            continue
        yield names[0], key, None, shape_of(config)
    for layer in range(config.num_hidden_layers):
        for key, (names, shape_of) in LAYER_TABLE.items():
            yield names[0].format(layer=layer), key, layer, shape_of(config)


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` is a directory with an offload pack manifest (not a full validation)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == PACK_FORMAT


# ---- writing ----------------------------------------------------------------------------------


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (numpy has no bfloat16, uint8 does)."""
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


class SafetensorsStreamWriter:
    """Writes a safetensors file one tensor at a time: the header first, from names, dtypes and
    shapes, then each tensor's bytes in the declared order, so only one tensor is ever held."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        if sys.byteorder != "little":
            raise PackError("safetensors is little-endian; this machine is not")
        self.path = path
        self.specs = specs
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.written = 0

    def write(self, tensor: torch.Tensor) -> None:
        """Write the next tensor of the header's list (cast to its declared dtype)."""
        name, dtype, shape = self.specs[self.written]
        if tuple(tensor.shape) != tuple(shape):
            raise PackError(f"{self.path}: tensor '{name}' has shape {list(tensor.shape)}, declared {list(shape)}")
        self.file.write(_raw_bytes(tensor.to(dtype)))
        self.written += 1

    def finish(self) -> None:
        """Flush and fsync; every declared tensor must have been written."""
        if self.written != len(self.specs):
            raise PackError(f"{self.path}: {self.written} of {len(self.specs)} tensors written")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _source_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The checkpoint's own dtype: config.json's torch_dtype, else that of the embedding table."""
    named = _dtype_named(checkpoint.config.torch_dtype)
    if named is not None:
        return named
    names = DENSE_TABLE["embed_tokens"][0]
    return next(checkpoint.entries[n].dtype for n in names if n in checkpoint.entries)


def _check_target(src_dir: Path, out_dir: Path, force: bool) -> None:
    if out_dir.resolve() == src_dir.resolve() or out_dir.resolve() in src_dir.resolve().parents:
        raise PackError(f"{out_dir}: the pack would replace its own source {src_dir}; choose another directory")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise PackError(f"{out_dir}: already exists; use --force to replace it")
    # --force replaces a pack (or an empty directory), never an arbitrary directory.
    if not out_dir.is_dir() or out_dir.is_symlink() or not (is_pack(out_dir) or not any(out_dir.iterdir())):
        raise PackError(
            f"{out_dir}: exists and is not an offload pack; --force only replaces a pack, remove it yourself"
        )


def convert(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    expert_format: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Write the pack of the checkpoint in ``src_dir`` to ``out_dir``; returns ``out_dir``.

    ``dtype`` None keeps the checkpoint's dtype, else dense weights and experts are cast to it
    (float32, bfloat16 or float16). ``expert_format`` (an ``offload.quant`` format name such as
    "int8" or "nf4") stores the experts quantized instead; dense weights keep ``dtype``. An existing ``out_dir`` is an error unless ``force``, and
    then it is replaced only once the new pack is complete. On any error nothing is left behind.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise SettingError(f"pack dtype {dtype} is not supported (choose {', '.join(DTYPE_NAMES.values())})")
    fmt = get_format(expert_format) if expert_format is not None else None
    _check_target(src_dir, out_dir, force)
    with Checkpoint(src_dir) as checkpoint:
        if not (src_dir / TOKENIZER_MODEL).is_file():
            raise PackError(f"{src_dir / TOKENIZER_MODEL}: missing; a pack carries the model's tokenizer")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        temp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)  # a leftover of an earlier run with this pid
        try:
            temp.mkdir()
            dense_dtype = dtype or _source_dtype(checkpoint)
            _write_pack(checkpoint, temp, dense_dtype, fmt or get_format(DTYPE_NAMES[dense_dtype]), progress)
            _move_into_place(temp, out_dir)
        except OSError as exc:
            raise PackError(f"{out_dir}: cannot write the pack: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def _write_pack(
    checkpoint: Checkpoint, out: Path, dtype: torch.dtype, fmt: WeightFormat, progress: ProgressFn | None
) -> None:
    config = checkpoint.config
    layers, experts_per_layer = config.num_hidden_layers, config.num_local_experts
    specs = list(_dense_specs(config))
    total, done = len(specs) + layers * experts_per_layer, 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    writer = SafetensorsStreamWriter(out / DENSE_FILE, [(name, dtype, shape) for name, _, _, shape in specs])
    try:
        for name, key, layer, _ in specs:
            writer.write(checkpoint.dense(key, layer))
            step(name)
        writer.finish()
    finally:
        writer.close()

    layout = RecordLayout.for_config(config, fmt)
    record = torch.zeros(layout.stride, dtype=torch.uint8)  # gaps and padding stay zero
    entries = []
    fd = os.open(out / EXPERTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for layer in range(layers):
            for expert in range(experts_per_layer):
                layout.pack(ExpertWeights(*checkpoint.expert(layer, expert)), record[: layout.nbytes])
                offset = (layer * experts_per_layer + expert) * layout.stride
                _write_all(fd, _raw_bytes(record), offset)
                entries.append({"layer": layer, "expert": expert, "offset": offset, "length": layout.nbytes,
                                "crc32": zlib.crc32(_raw_bytes(record[: layout.nbytes]))})
                step(f"layer {layer} expert {expert}")
        os.fsync(fd)
    finally:
        os.close(fd)

    src = checkpoint.model_dir
    tokenizer_files = [TOKENIZER_MODEL] + [n for n in OPTIONAL_TOKENIZER_FILES if (src / n).is_file()]
    for name in (CONFIG_FILE, *tokenizer_files):
        _copy_synced(src / name, out / name)

    manifest = {
        "format": PACK_FORMAT,
        "format_version": PACK_VERSION,
        "config": json.loads((src / CONFIG_FILE).read_text(encoding="utf-8")),
        "weight_format": {"dense": DTYPE_NAMES[dtype], "experts": fmt.name},
        "record": layout.to_dict(),
        "experts_file": EXPERTS_FILE,
        "dense_file": DENSE_FILE,
        "tokenizer_files": tokenizer_files,
        "experts": entries,
    }
    with open(out / MANIFEST, "w", encoding="utf-8") as f:  # last: its presence marks a whole pack
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(out)


def _move_into_place(temp: Path, out_dir: Path) -> None:
    """Rename the finished ``temp`` to ``out_dir``; an old ``out_dir`` goes only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    try:
        os.rename(temp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)  # put the old pack back
        raise
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- reading ----------------------------------------------------------------------------------


class Pack(WeightFiles):
    """A validated offload pack: dense weights by logical name and expert records by one read."""

    open_error = PackError
    corrupt_error = CorruptPackError

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._verified: set[tuple[int, int]] = set()
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise PackError(f"{self.path}: no such pack directory")
        if not manifest_path.is_file():
            raise PackError(f"{manifest_path}: missing; {self.path} is not an offload pack (see `offload convert`)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackError(f"{manifest_path}: not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
            raise PackError(f"{manifest_path}: not an offload pack manifest (no \"format\": \"{PACK_FORMAT}\")")
        version = manifest.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PackError(f"{manifest_path}: format_version must be a positive integer, got {version!r}")
        if version > PACK_VERSION:
            raise PackError(
                f"{manifest_path}: pack format version {version} is newer than this offload reads "
                f"({PACK_VERSION}); upgrade offload"
            )
        self.manifest = manifest
        self._manifest_path = manifest_path

        raw_config = manifest.get("config")
        if not isinstance(raw_config, dict):
            raise PackError(f"{manifest_path}: \"config\" must be the model's config.json object")
        self.config = ModelConfig.from_dict(raw_config, source=f"{manifest_path} (config)")
        weight_format = manifest.get("weight_format") or {}
        dense_dtype = _dtype_named(weight_format.get("dense"))
        experts_format = FORMATS.get(quant_alias(weight_format.get("experts")))
        if dense_dtype is None or experts_format is None:
            raise PackError(f"{manifest_path}: unsupported weight_format {weight_format!r}")
        self.dense_dtype = dense_dtype
        self.layout = RecordLayout.for_config(self.config, experts_format)
        if manifest.get("record") != self.layout.to_dict():
            raise PackError(
                f"{manifest_path}: record layout {manifest.get('record')!r} is not the one this offload "
                f"computes for the model ({self.layout.to_dict()!r})"
            )
        self._records = self._check_records(manifest.get("experts"))
        self._dense, self._layers = self._open_dense(self._member("dense_file"))
        self._open_experts(self._member("experts_file"))

    # ---- validation -------------------------------------------------------------------------

    def _member(self, key: str) -> Path:
        name = self.manifest.get(key)
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise PackError(f"{self._manifest_path}: \"{key}\" must be a file name in the pack, got {name!r}")
        path = self.path / name
        if not path.is_file():
            raise PackError(f"{path}: missing from the pack (named by {MANIFEST} as {key})")
        return path

    def _check_records(self, entries: object) -> list[tuple[int, int, int]]:
        """(offset, length, crc32) per expert, layer-major."""
        c = self.config
        count = c.num_hidden_layers * c.num_local_experts
        if not isinstance(entries, list) or len(entries) != count:
            got = len(entries) if isinstance(entries, list) else entries
            raise PackError(f"{self._manifest_path}: \"experts\" must list {count} records, got {got!r}")
        records = []
        for index, entry in enumerate(entries):
            layer, expert = divmod(index, c.num_local_experts)
            try:
                where = (entry["layer"], entry["expert"])
                offset, length, crc = int(entry["offset"]), int(entry["length"]), int(entry["crc32"])
            except (KeyError, TypeError, ValueError):
                raise PackError(f"{self._manifest_path}: experts[{index}] is malformed: {entry!r}") from None
            if where != (layer, expert):
                raise PackError(
                    f"{self._manifest_path}: experts[{index}] is layer {where[0]} expert {where[1]}, "
                    f"expected layer {layer} expert {expert} (records are layer-major)"
                )
            if length != self.layout.nbytes or offset < 0 or offset % RECORD_ALIGNMENT:
                raise PackError(
                    f"{self._manifest_path}: expert {expert} of layer {layer} has offset {offset} and length "
                    f"{length}; expected a multiple of {RECORD_ALIGNMENT} and {self.layout.nbytes}"
                )
            records.append((offset, length, crc))
        return records

    def _open_dense(self, path: Path) -> tuple[dict[str, TensorEntry], list[dict[str, TensorEntry]]]:
        entries = read_header(path)  # CorruptCheckpointError when the file is damaged
        dense, layers = dense_entries(entries, self.config, path, dtypes=(self.dense_dtype,))
        self.fd(path)  # open now: a pack that opened is readable
        return dense, layers

    def _open_experts(self, path: Path) -> None:
        self._experts_path = path
        size = path.stat().st_size
        for index, (offset, length, _) in enumerate(self._records):
            if offset + length > size:
                layer, expert = divmod(index, self.config.num_local_experts)
                raise CorruptPackError(
                    f"{path}: truncated: {size} bytes, but expert {expert} of layer {layer} "
                    f"needs bytes [{offset}, {offset + length})"
                )
        self._experts_fd = self.fd(path)

    # ---- reading ----------------------------------------------------------------------------

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor:
        """Read the record of expert ``expert`` of ``layer`` into ``out`` (uint8, CPU, contiguous,
        at least ``layout.nbytes``; a pinned buffer is fine) with one read; returns out[:nbytes].

        The first read of each expert checks its crc32 against the manifest.
        """
        c = self.config
        if not (0 <= layer < c.num_hidden_layers and 0 <= expert < c.num_local_experts):
            raise IndexError(f"no expert {expert} of layer {layer} in {self.path}")
        nbytes = self.layout.nbytes
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < nbytes:
            raise ValueError(f"out must be a contiguous CPU uint8 tensor of at least {nbytes} bytes")
        offset, length, crc = self._records[layer * c.num_local_experts + expert]
        record = out.reshape(-1)[:nbytes]
        buffer = memoryview(record.numpy())
        got = read_into(self._experts_fd, buffer, offset)
        self.bytes_read += got
        if got != length:
            raise CorruptPackError(
                f"{self._experts_path}: expert {expert} of layer {layer} (offset {offset}) ends early "
                f"(file changed while reading?)"
            )
        if (layer, expert) not in self._verified:
            if zlib.crc32(buffer) != crc:
                raise CorruptPackError(
                    f"{self._experts_path}: expert {expert} of layer {layer} (offset {offset}) fails its checksum"
                )
            self._verified.add((layer, expert))
        return record

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's (w1, w3, w2) in the record's format, on the CPU (views of one new buffer)."""
        record = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        return self.layout.views(self.read_record(layer, expert, record))

    def verify_all(self, progress: ProgressFn | None = None) -> None:
        """Check every record's crc32 (reading each once); raises CorruptPackError at the first bad one."""
        c = self.config
        scratch = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        total = c.num_hidden_layers * c.num_local_experts
        for index in range(total):
            layer, expert = divmod(index, c.num_local_experts)
            self._verified.discard((layer, expert))
            self.read_record(layer, expert, scratch)
            if progress is not None:
                progress(index + 1, total, f"layer {layer} expert {expert}")
