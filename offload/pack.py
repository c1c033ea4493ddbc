"""The offload pack: the on-disk format every expert tier reads, its converter and its reader.

What it is: a directory holding ``manifest.json`` (format, version, the model's config.json,
the weight formats, the record layout and, per expert, its offset, length and crc32),
``dense.safetensors`` (every non-expert weight, under the hub names) and ``experts.bin`` (one
record per expert, laid out by ``RecordLayout``: w1, w3, w2 contiguous, each record on a 4 KiB
boundary, padding zero), next to copies of config.json and the tokenizer files, so that
``ModelConfig.from_dir`` and ``Tokenizer.from_dir`` work on a pack as on a checkpoint.

Format versions. 1: dense weights in one dtype (``weight_format`` {"dense", "experts"}).
2 (written now): ``weight_format`` also names the attention format ("attention"): the dense
dtype, or a quantized format (``offload.quant``), and then dense.safetensors holds each q, k, v,
o projection as that format's tensors, named ``<hub name>.<tensor>`` after ``quant.tensor_specs``
(``model.layers.0.self_attn.q_proj.weight.absmax``, ``...weight.data``), so that loading
quantizes nothing. A pack written by ``offload synth`` carries ``"synthetic"``: {"preset",
"seed", "layers"}. ``Pack`` reads both versions.

``convert`` streams a Hugging Face checkpoint (read through ``Checkpoint``) into a pack, one
tensor or one expert in memory at a time, quantizing experts and attention projections on
request, on the device the pack is for when that device is here (``quantize_device``), and is
atomic: it writes into a hidden sibling directory, writes the manifest last and renames the
directory into place, so an interrupted run leaves nothing that looks like a pack. The 4-bit
layout follows the device the pack is for (``pack_formats``: portable nf4 for CUDA, the fused
CPU kernel's nf4-cpu for a CPU where that kernel works). ``Pack`` validates a pack on open and
reads one expert record with one read, checking its crc32 the first time that expert is read.

What it is not: a cache or a tier (those decide when to read), nor a quantizer (offload.quant
is). It never prints and never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from offload.checkpoint import (
    DENSE_TABLE,
    LAYER_TABLE,
    SAFETENSORS_DTYPES,
    WEIGHT_DTYPES,
    ByteRange,
    Checkpoint,
    TensorEntry,
    WeightFiles,
    find_tensor,
    read_header,
    read_into,
)
from offload.config import ModelConfig
from offload.device import resolve_device
from offload.errors import (
    CorruptPackError,
    PackError,
    SettingError,
)
from offload.experts.record import RECORD_ALIGNMENT, RecordLayout
from offload.experts.tiers import CheckpointRecords
from offload.model import ExpertWeights, Matrix
from offload.plan import attention_shapes
from offload.quant import (
    ALIASES,
    FORMATS,
    WeightFormat,
    format_for_bits,
    from_tensors,
    get_format,
    quantize,
    tensor_specs,
)


def quant_alias(name: object) -> str | None:
    """A manifest's expert format name, with torch dtype names mapped to format names."""
    return ALIASES.get(name, name) if isinstance(name, str) else None

PACK_FORMAT = "offload-pack"
PACK_VERSION = 2  # what convert and synth write
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
CONFIG_FILE = "config.json"
TOKENIZER_MODEL = "tokenizer.model"
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")

# progress(done, total, what): called once per tensor or expert written
ProgressFn = Callable[[int, int, str], None]

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the LAYER_TABLE keys a format may quantize
TARGETS = ("auto", "cpu", "cuda")  # --for: the device a pack is written for

DTYPE_NAMES: dict[torch.dtype, str] = {d: str(d).removeprefix("torch.") for d in WEIGHT_DTYPES}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {d: n for n, d in SAFETENSORS_DTYPES.items()}


def _dtype_named(name: object) -> torch.dtype | None:
    return next((d for d, n in DTYPE_NAMES.items() if n == name), None)


class DenseSpec(NamedTuple):
    """One dense weight of a pack: its hub name, logical key, layer (None: model-wide), shape."""

    name: str
    key: str
    layer: int | None
    shape: tuple[int, ...]


def dense_specs(config: ModelConfig) -> Iterator[DenseSpec]:
    """Every dense weight a pack holds, in file order."""
    for key, (names, shape_of) in DENSE_TABLE.items():
        if key == "lm_head" and config.tie_word_embeddings:
            continue
        yield DenseSpec(names[0], key, None, shape_of(config))
    for layer in range(config.num_hidden_layers):
        for key, (names, shape_of) in LAYER_TABLE.items():
            yield DenseSpec(names[0].format(layer=layer), key, layer, shape_of(config))


def quantized_attention(attn_format: WeightFormat) -> bool:
    return attn_format.kind != "plain"


def file_tensors(
    spec: DenseSpec, dtype: torch.dtype, attn_format: WeightFormat
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The (name, dtype, shape) tensors of dense.safetensors that hold ``spec``: the weight
    itself in ``dtype``, or, for an attention projection in a quantized format, that format's
    tensors named ``<hub name>.<tensor>``."""
    if spec.key in ATTENTION_KEYS and quantized_attention(attn_format):
        return [(f"{spec.name}.{t.name}", t.dtype, t.shape) for t in tensor_specs(spec.shape, attn_format)]
    return [(spec.name, dtype, spec.shape)]


def pack_target(target: str) -> str:
    """The device type a pack is written for: "cpu", "cuda", or "auto" (CUDA when this machine
    has it, else this CPU). Writing a CUDA pack needs no GPU."""
    key = str(target).strip().lower()
    if key not in TARGETS:
        raise SettingError(f"--for {target!r}: choose one of {', '.join(TARGETS)}")
    return resolve_device("auto").type if key == "auto" else key


def quantize_device(target: str) -> torch.device:
    """Where a converter quantizes: on the GPU when the pack is for CUDA and one is here (so the
    pack holds what loading the checkpoint there makes), else on the CPU."""
    if pack_target(target) == "cuda":
        return resolve_device("auto")  # CPU on a machine without CUDA
    return torch.device("cpu")


def pack_formats(
    config: ModelConfig,
    dtype: torch.dtype,
    *,
    expert_format: str | WeightFormat | None = None,
    expert_bits: int | None = None,
    attn_format: str | WeightFormat | None = None,
    attn_bits: int | None = None,
    target: str = "auto",
) -> tuple[WeightFormat, WeightFormat]:
    """(expert format, attention format) of a pack with dense weights in ``dtype``, written for
    ``target`` (``pack_target``). Bits map as for a load (``quant.format_for_bits``): 4-bit is
    the portable nf4 for CUDA and nf4-cpu for a CPU whose fused kernel works; neither given
    means unquantized in ``dtype``. A CPU-layout format is refused for a CUDA pack."""
    device_type = pack_target(target)
    if expert_format is not None and expert_bits is not None:
        raise SettingError("give --expert-format or --expert-bits, not both")
    if attn_format is not None and attn_bits is not None:
        raise SettingError("give an attention format or --attn-bits, not both")
    plain = get_format(DTYPE_NAMES[dtype])
    I, D = config.intermediate_size, config.hidden_size
    if expert_format is not None:
        experts, expert_flag = get_format(expert_format), f"--expert-format {get_format(expert_format).name}"
    elif expert_bits is not None:
        experts = format_for_bits(expert_bits, dtype, device_type, ((I, D), (D, I)), "--expert-bits")
        expert_flag = f"--expert-bits {expert_bits}"
    else:
        experts, expert_flag = plain, ""
    if attn_format is not None:
        attention, attn_flag = get_format(attn_format), f"attention format {get_format(attn_format).name}"
    elif attn_bits is not None:
        shapes = tuple(attention_shapes(config).values())
        attention = format_for_bits(attn_bits, dtype, device_type, shapes, "--attn-bits")
        attn_flag = f"--attn-bits {attn_bits}"
    else:
        attention, attn_flag = plain, ""
    if attention.kind == "plain" and attention != plain:
        raise SettingError(
            f"{attn_flag}: unquantized attention is stored in the pack's dtype ({DTYPE_NAMES[dtype]})"
        )
    for fmt, flag in ((experts, expert_flag), (attention, attn_flag)):
        if fmt.kind == "4bit-cpu" and device_type == "cuda":
            raise SettingError(
                f"{flag}: {fmt.name} is the layout of bitsandbytes' fused CPU kernel, which CUDA does not "
                f"run; a pack --for cuda takes {fmt.quant_type} (or --expert-bits 4 / --attn-bits 4)"
            )
    return experts, attention


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


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (numpy has no bfloat16, uint8 does)."""
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now instead of when the final fsync
    asks (``POSIX_FADV_DONTNEED`` starts writeback of dirty pages without waiting, and drops
    pages already clean), so that writing to disk overlaps producing the next bytes."""
    if hasattr(os, "posix_fadvise") and length > 0:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


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
        self._synced_to = 0  # bytes handed to start_writeback so far

    def write(self, tensor: torch.Tensor) -> None:
        """Write the next tensor of the header's list (cast to its declared dtype)."""
        name, dtype, shape = self.specs[self.written]
        if tuple(tensor.shape) != tuple(shape):
            raise PackError(f"{self.path}: tensor '{name}' has shape {list(tensor.shape)}, declared {list(shape)}")
        data = tensor.to(device="cpu", dtype=dtype)
        self.file.write(raw_bytes(data.reshape(-1) if data.dim() == 0 else data))
        self.written += 1
        if data.numel() * data.element_size() >= 1 << 24:  # big tensors: let the disk start on them
            self.file.flush()
            end = self.file.tell()
            start_writeback(self.file.fileno(), self._synced_to, end - self._synced_to)
            self._synced_to = end

    def finish(self) -> None:
        """Flush and fsync; every declared tensor must have been written."""
        if self.written != len(self.specs):
            raise PackError(f"{self.path}: {self.written} of {len(self.specs)} tensors written")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class RecordWriter:
    """Writes ``experts.bin`` one record at a time, each at its 4 KiB-aligned offset, and keeps
    the manifest entries (offset, length, crc32). ``write`` takes a whole stride (padding zero)."""

    def __init__(self, path: Path, layout: RecordLayout, experts_per_layer: int):
        self.path = path
        self.layout = layout
        self.experts_per_layer = experts_per_layer
        self.entries: list[dict[str, int]] = []
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._previous = 0  # offset of the record before the last: its pages are clean by now

    def write(self, layer: int, expert: int, record: torch.Tensor) -> None:
        """Write ``record`` (uint8 [stride], CPU) as expert ``expert`` of ``layer``."""
        layout = self.layout
        offset = (layer * self.experts_per_layer + expert) * layout.stride
        data = raw_bytes(record[: layout.stride])
        crc = zlib.crc32(data[: layout.nbytes])
        _write_all(self.fd, data, offset)
        self.entries.append({"layer": layer, "expert": expert, "offset": offset, "length": layout.nbytes,
                             "crc32": crc})
        start_writeback(self.fd, self._previous, offset + layout.stride - self._previous)
        self._previous = offset

    def finish(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(
    out: Path,
    config: dict[str, Any],
    dtype: torch.dtype,
    layout: RecordLayout,
    attn_format: WeightFormat,
    tokenizer_files: list[str],
    entries: list[dict[str, int]],
    **extra: Any,
) -> None:
    """Write ``manifest.json`` (last: its presence marks a whole pack) and fsync the directory."""
    manifest = {
        "format": PACK_FORMAT,
        "format_version": PACK_VERSION,
        "config": config,
        "weight_format": {"dense": DTYPE_NAMES[dtype], "experts": layout.fmt.name, "attention": attn_format.name},
        "record": layout.to_dict(),
        "experts_file": EXPERTS_FILE,
        "dense_file": DENSE_FILE,
        "tokenizer_files": tokenizer_files,
        **extra,
        "experts": entries,
    }
    with open(out / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(out)


def _source_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The checkpoint's own dtype: config.json's torch_dtype, else that of the embedding table."""
    named = _dtype_named(checkpoint.config.torch_dtype)
    if named is not None:
        return named
    names = DENSE_TABLE["embed_tokens"][0]
    return next(checkpoint.entries[n].dtype for n in names if n in checkpoint.entries)


def check_target(out_dir: Path, force: bool, src_dir: Path | None = None) -> None:
    """Refuse an ``out_dir`` that exists (unless ``force``, and then only a pack or an empty
    directory), or that is or contains ``src_dir``."""
    if src_dir is not None and (
        out_dir.resolve() == src_dir.resolve() or out_dir.resolve() in src_dir.resolve().parents
    ):
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


@contextmanager
def atomic_pack_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling directory to write a pack into, renamed to ``out_dir`` when the body
    finishes (an old pack there goes only after that); on any error nothing is left behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)  # a leftover of an earlier run with this pid
    try:
        temp.mkdir()
        yield temp
        _move_into_place(temp, out_dir)
    except OSError as exc:
        raise PackError(f"{out_dir}: cannot write the pack: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def convert(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    expert_format: str | None = None,
    expert_bits: int | None = None,
    attn_bits: int | None = None,
    attn_format: str | None = None,
    target: str = "auto",
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Write the pack of the checkpoint in ``src_dir`` to ``out_dir``; returns ``out_dir``.

    ``dtype`` None keeps the checkpoint's dtype, else dense weights and experts are cast to it
    (float32, bfloat16 or float16). ``expert_format`` (an ``offload.quant`` format name such as
    "int8" or "nf4") or ``expert_bits`` (4, 8, 16) stores the experts quantized instead;
    ``attn_bits`` (or ``attn_format``) the q, k, v, o projections; other dense weights keep
    ``dtype``. Bits map to formats for the device the pack is for, ``target`` ("auto", "cpu",
    "cuda"; ``pack_formats``), and quantization runs there when it is this machine's GPU
    (``quantize_device``), else on the CPU, on the checkpoint's own tensors, one at a time, as
    a load of the checkpoint does. An existing ``out_dir`` is an error unless ``force``, and
    then it is replaced only once the new pack is complete. On any error nothing is left behind.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise SettingError(f"pack dtype {dtype} is not supported (choose {', '.join(DTYPE_NAMES.values())})")
    if expert_format is not None:
        get_format(expert_format)  # an unknown name is refused before the checkpoint is read
    check_target(out_dir, force, src_dir)
    with Checkpoint(src_dir) as checkpoint:
        if not (src_dir / TOKENIZER_MODEL).is_file():
            raise PackError(f"{src_dir / TOKENIZER_MODEL}: missing; a pack carries the model's tokenizer")
        dense_dtype = dtype or _source_dtype(checkpoint)
        experts, attention = pack_formats(
            checkpoint.config, dense_dtype, expert_format=expert_format, expert_bits=expert_bits,
            attn_format=attn_format, attn_bits=attn_bits, target=target,
        )
        device = quantize_device(target)
        with atomic_pack_dir(out_dir) as temp:
            _write_pack(checkpoint, temp, dense_dtype, experts, attention, device, progress)
    return out_dir


def progress_steps(total: int, progress: ProgressFn | None) -> Callable[[str], None]:
    """A ``step(what)`` that reports one more of ``total`` pieces written to ``progress``."""
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    return step


def _write_pack(
    checkpoint: Checkpoint,
    out: Path,
    dtype: torch.dtype,
    fmt: WeightFormat,
    attn_format: WeightFormat,
    device: torch.device,
    progress: ProgressFn | None,
) -> None:
    config = checkpoint.config
    layers, experts_per_layer = config.num_hidden_layers, config.num_local_experts
    specs = list(dense_specs(config))
    step = progress_steps(len(specs) + layers * experts_per_layer, progress)

    writer = SafetensorsStreamWriter(
        out / DENSE_FILE, [t for spec in specs for t in file_tensors(spec, dtype, attn_format)]
    )
    try:
        for spec in specs:
            weight = checkpoint.dense(spec.key, spec.layer)
            if spec.key in ATTENTION_KEYS and quantized_attention(attn_format):
                quantized = quantize(weight.to(device), attn_format)  # the checkpoint's own tensor, as a load does
                for t in tensor_specs(spec.shape, attn_format):  # in the order the header declares
                    writer.write(quantized.tensors[t.name])
            else:
                writer.write(weight)
            step(spec.name)
        writer.finish()
    finally:
        writer.close()

    layout = RecordLayout.for_config(config, fmt)
    source = CheckpointRecords(checkpoint, layout, device)
    record = torch.zeros(layout.stride, dtype=torch.uint8)  # gaps and padding stay zero
    records = RecordWriter(out / EXPERTS_FILE, layout, experts_per_layer)
    try:
        for layer in range(layers):
            for expert in range(experts_per_layer):
                source.read_record(layer, expert, record)
                records.write(layer, expert, record)
                step(f"layer {layer} expert {expert}")
        records.finish()
    finally:
        records.close()

    src = checkpoint.model_dir
    tokenizer_files = [TOKENIZER_MODEL] + [n for n in OPTIONAL_TOKENIZER_FILES if (src / n).is_file()]
    for name in (CONFIG_FILE, *tokenizer_files):
        copy_synced(src / name, out / name)
    config_raw = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    write_manifest(out, config_raw, dtype, layout, attn_format, tokenizer_files, records.entries)


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
        self.version = version
        self.manifest = manifest
        self._manifest_path = manifest_path

        raw_config = manifest.get("config")
        if not isinstance(raw_config, dict):
            raise PackError(f"{manifest_path}: \"config\" must be the model's config.json object")
        self.config = ModelConfig.from_dict(raw_config, source=f"{manifest_path} (config)")
        weight_format = manifest.get("weight_format") or {}
        if not isinstance(weight_format, dict):
            raise PackError(f"{manifest_path}: unsupported weight_format {weight_format!r}")
        dense_dtype = _dtype_named(weight_format.get("dense"))
        experts_format = FORMATS.get(quant_alias(weight_format.get("experts")))
        if dense_dtype is None or experts_format is None:
            raise PackError(f"{manifest_path}: unsupported weight_format {weight_format!r}")
        self.dense_dtype = dense_dtype
        plain = get_format(DTYPE_NAMES[dense_dtype])
        if version == 1:  # version 1 has no quantized attention
            attention = plain
        else:
            attention = FORMATS.get(quant_alias(weight_format.get("attention")))
            if attention is None or (attention.kind == "plain" and attention != plain):
                raise PackError(
                    f"{manifest_path}: weight_format attention {weight_format.get('attention')!r} must be the "
                    f"dense dtype ({plain.name}) or a quantized format ({', '.join(n for n, f in FORMATS.items() if f.kind != 'plain')})"
                )
        self.attn_format: WeightFormat = attention  # the dense dtype's plain format when not quantized
        synthetic = manifest.get("synthetic")
        self.synthetic: dict | None = synthetic if isinstance(synthetic, dict) else None
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
        """Every dense weight's entry, checked for shape and dtype; a quantized attention
        projection's tensors go to ``_attention`` [layer][key][tensor name]."""
        entries = read_header(path)  # CorruptCheckpointError when the file is damaged
        c, dtypes = self.config, (self.dense_dtype,)
        dense = {}
        for key, (names, shape_of) in DENSE_TABLE.items():
            if key == "lm_head" and c.tie_word_embeddings and not any(n in entries for n in names):
                continue
            dense[key] = find_tensor(entries, names, shape_of(c), path, dtypes)
        quantized = quantized_attention(self.attn_format)
        layers, self._attention = [], []
        for layer in range(c.num_hidden_layers):
            plain, attention = {}, {}
            for key, (names, shape_of) in LAYER_TABLE.items():
                if key in ATTENTION_KEYS and quantized:
                    name = names[0].format(layer=layer)
                    attention[key] = {
                        t.name: find_tensor(entries, (f"{name}.{t.name}",), t.shape, path, (t.dtype,))
                        for t in tensor_specs(shape_of(c), self.attn_format)
                    }
                else:
                    plain[key] = find_tensor(entries, names, shape_of(c), path, dtypes, layer=layer)
            layers.append(plain)
            self._attention.append(attention)
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

    def dense(self, key: str, layer: int | None = None) -> Matrix:
        """A dense weight by logical name, on the CPU: a tensor in the pack's dense dtype, or,
        for an attention projection of a pack with quantized attention, a ``QuantizedMatrix``
        of the stored tensors, as they are."""
        if layer is None or key not in self._attention[layer]:
            return super().dense(key, layer)
        tensors = {}
        for name, entry in self._attention[layer][key].items():
            read = self._read(ByteRange(entry, entry.start, entry.shape or (1,)))  # a 0-d tensor as [1]
            tensors[name] = read.reshape(entry.shape)
        shape = LAYER_TABLE[key][1](self.config)
        return from_tensors(tensors, shape, self.attn_format)

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
