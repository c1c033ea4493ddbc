"""The offload pack: the on-disk format every expert tier reads, its converter and its reader.

What it is: a directory holding ``manifest.json`` (format, version, the model's config.json,
the weight formats, the record layout and, per expert, its offset, length and crc32),
``dense.safetensors`` (every non-expert weight, under the hub names) and ``experts.bin`` (one
record per expert, laid out by ``RecordLayout``: w1, w3, w2 contiguous, each record on a 4 KiB
boundary, padding zero), next to copies of config.json and the tokenizer files the checkpoint
has (tokenizer.model and/or tokenizer.json, tokenizer_config.json, generation_config.json,
special_tokens_map.json, chat_template.jinja; the manifest's ``"tokenizer_files"`` lists them), so
that ``ModelConfig.from_dir`` and ``Tokenizer.from_dir`` work on a pack as on a checkpoint.

Format versions. 1: dense weights in one dtype (``weight_format`` {"dense", "experts"}).
2: ``weight_format`` also names the attention format ("attention"): the dense dtype, or a
quantized format (``offload.quant``), and then dense.safetensors holds each q, k, v, o
projection as that format's tensors, named ``<hub name>.<tensor>`` after ``quant.tensor_specs``
(``model.layers.0.self_attn.q_proj.weight.absmax``, ``...weight.data``), so that loading
quantizes nothing. 3 (written now): checksums of everything else too: ``"dense_crc32"``
{"header": crc32 of dense.safetensors' first 8 + header-length bytes, "tensors": {name: crc32
of that tensor's bytes}} for every tensor of the file, and ``"manifest_crc32"``, the crc32 of
the manifest's own content (``manifest_checksum``: every other key, as canonical JSON). A pack
written by ``offload synth`` carries ``"synthetic"``: {"preset", "seed", "layers"}. ``Pack``
reads all three; versions 1 and 2 open as before, with ``without_checksums`` naming what they
carry no checksum for (their dense file and manifest), so nothing they hold is lost.

What ``Pack`` checks. On open (the manifest and headers, no weights): the manifest as JSON
(any malformed value, deep nesting included, is a ``PackError``), its checksum (version 3), its
config (``ModelConfig.from_dict``) and that the pack's config.json holds the same, the weight
formats, the record layout, every record entry (integers, aligned, inside experts.bin), the
dense header (``offload.checkpoint.read_header``) against its checksum and the manifest's list
of tensors, and every dense tensor's shape and dtype. On the first read of each dense tensor
(version 3): its crc32 (zlib, 3-4 GB/s on one core of this project's CPU: 0.8-1.1 s for
Mixtral-8x7B's 3.2 GB of bf16 dense weights). On the first read of each expert record: its
crc32 (as before: ~0.1 s for a 352 MB bf16 Mixtral expert, ~25 ms for a 99 MB nf4 one) and
that its floats are finite (their exponent bits tested in numpy, ~9 GB/s on one core: 40 ms for
the bf16 expert's values; for quantized formats only the scales, absmax and quant maps: 11 MB
for the nf4 expert, about 1 ms).
Later reads check nothing. ``offload.loader`` checks every dense tensor finite as it is placed.

``convert`` streams a Hugging Face checkpoint (read through ``Checkpoint``) into a pack, one
tensor or one expert in memory at a time, quantizing experts and attention projections on
request, on the device the pack is for when that device is here (``quantize_device``), and is
atomic, under the rule of ``offload.files`` for everything the tool writes: it writes into a
hidden sibling directory under a lock, writes the manifest last and renames the directory into
place (or, with ``force``, swaps the old pack's own files for the new ones, keeping the
directory's other files), so an interrupted run leaves nothing that looks like a pack. 4-bit bits
give the portable nf4 on every device (``pack_formats``): the bytes a GPU kernel reads are the
ones offload's CPU kernel computes from; the "-cpu" layouts are written only when named, and
refused for a CUDA pack. ``Pack`` validates a pack on open and
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

import numpy as np
import torch

from offload.checkpoint import (
    DENSE_TABLE,
    layer_table,
    SAFETENSORS_DTYPES,
    WEIGHT_DTYPES,
    Checkpoint,
    TensorEntry,
    WeightFiles,
    check_cast,
    check_finite,
    describe_nonfinite,
    find_tensor,
    finite_bytes,
    read_header,
    read_into,
)
from offload.config import ModelConfig
from offload.device import resolve_device
from offload.errors import (
    CorruptPackError,
    PackError,
    SettingError,
    shown,
)
from offload.experts.record import MATRIX_ALIGNMENT, RECORD_ALIGNMENT, RecordLayout, align_up
from offload.files import atomic_dir, check_dir
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
from offload.tokenizer import Tokenizer


def quant_alias(name: object) -> str | None:
    """A manifest's expert format name, with torch dtype names mapped to format names."""
    return ALIASES.get(name, name) if isinstance(name, str) else None

PACK_FORMAT = "offload-pack"
PACK_VERSION = 3  # what convert and synth write
READABLE_VERSIONS = (1, 2, 3)
CHECKSUMMED_VERSION = 3  # the first version with dense and manifest checksums
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
CONFIG_FILE = "config.json"
TOKENIZER_MODEL = "tokenizer.model"  # sentencepiece (Mixtral)
TOKENIZER_JSON = "tokenizer.json"  # Hugging Face tokenizers (Qwen, OLMoE; Mixtral ships it too)
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_JSON)  # a checkpoint has one or both; a pack copies each
# What Tokenizer.from_dir and offload.chat_template read besides them (chat_template.jinja: the
# template transformers 5 saves on its own, which takes priority over tokenizer_config.json's).
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                            "chat_template.jinja")

# progress(done, total, what): called once per tensor or expert written
ProgressFn = Callable[[int, int, str], None]

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the layer_table keys a format may quantize
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
        for key, (names, shape_of) in layer_table(config, layer).items():
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
    the portable nf4 on every device; neither given
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
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == PACK_FORMAT


def manifest_checksum(manifest: dict[str, Any]) -> int:
    """The crc32 of a manifest's content: every key but ``manifest_crc32``, as canonical JSON
    (sorted keys, no spaces, ASCII), so it does not depend on how the file was laid out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return zlib.crc32(text.encode("ascii"))


_ABSENT = object()  # a key missing from one side of a comparison


def _shown(value: object, limit: int = 80) -> str:
    """``offload.errors.shown`` at this module's limit."""
    return shown(value, limit)


def _is_crc(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value < 2**32


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
        prefix = len(raw).to_bytes(8, "little") + raw
        self.file.write(prefix)
        self.header_crc = zlib.crc32(prefix)
        self.crcs: dict[str, int] = {}  # name -> crc32 of the tensor's bytes as written
        self.written = 0
        self._synced_to = 0  # bytes handed to start_writeback so far

    def write(self, tensor: torch.Tensor) -> None:
        """Write the next tensor of the header's list (cast to its declared dtype)."""
        name, dtype, shape = self.specs[self.written]
        if tuple(tensor.shape) != tuple(shape):
            raise PackError(f"{self.path}: tensor '{name}' has shape {list(tensor.shape)}, declared {list(shape)}")
        data = tensor.to(device="cpu", dtype=dtype)
        buffer = raw_bytes(data.reshape(-1) if data.dim() == 0 else data)
        self.crcs[name] = zlib.crc32(buffer)
        self.file.write(buffer)
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

    def checksums(self) -> dict[str, Any]:
        """The manifest's ``dense_crc32``: {"header": crc32, "tensors": {name: crc32}}."""
        return {"header": self.header_crc, "tensors": dict(self.crcs)}

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
    *,
    dense_checksums: dict[str, Any],
    **extra: Any,
) -> None:
    """Write ``manifest.json`` (last: its presence marks a whole pack) and fsync the directory.
    ``dense_checksums``: ``SafetensorsStreamWriter.checksums()`` of the dense file; the manifest
    ends with its own checksum (``manifest_checksum``)."""
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
        "dense_crc32": dense_checksums,
        "experts": entries,
    }
    manifest["manifest_crc32"] = manifest_checksum(manifest)
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


def pack_files(path: Path) -> set[str] | None:
    """The files of the pack in ``path`` that its writer wrote, and that ``--force`` may replace:
    manifest.json, config.json and what the manifest names (dense and experts files, tokenizer
    files), plain names only; None when ``path`` holds no pack manifest (``offload.files.Owned``)."""
    manifest_path = path / MANIFEST
    try:
        if not manifest_path.is_file() or manifest_path.is_symlink():
            return None
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        return None
    named = [manifest.get("dense_file"), manifest.get("experts_file")]
    tokenizer = manifest.get("tokenizer_files")
    named += tokenizer if isinstance(tokenizer, list) else []
    plain = {n for n in named if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n and "/" not in n}
    return {MANIFEST, CONFIG_FILE} | plain


def check_target(out_dir: Path, force: bool, src_dir: Path | None = None) -> None:
    """Refuse an ``out_dir`` that is or contains ``src_dir``, or that exists, unless ``force``
    and it is a pack or an empty directory (``offload.files.check_dir``: never a link, a file, or
    a directory holding anything else)."""
    if src_dir is not None and (
        out_dir.resolve() == src_dir.resolve() or out_dir.resolve() in src_dir.resolve().parents
    ):
        raise PackError(f"{out_dir}: the pack would replace its own source {src_dir}; choose another directory")
    check_dir(out_dir, force, "pack", pack_files)


@contextmanager
def atomic_pack_dir(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """A hidden sibling directory, ``.OUT.partial-PID``, to write a pack into, under the lock on
    ``out_dir``, installed when the body finishes (``offload.files.atomic_dir``): renamed into
    place, or, with ``force``, its files swapped for the old pack's own files (``pack_files``),
    the manifest out first and in last, the directory's other files kept. On any error nothing
    is left behind and ``out_dir`` is as it was."""
    with atomic_dir(out_dir, force=force, what="pack", owned=pack_files, marker=MANIFEST) as temp:
        yield temp


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
    then only its pack's own files are replaced (``pack_files``; other files stay), once the new
    pack is complete. On any error nothing is left behind. The checkpoint must have
    tokenizer.model or tokenizer.json, and its tokenizer must load (``Tokenizer.from_dir``),
    before anything is written.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise SettingError(f"pack dtype {dtype} is not supported (choose {', '.join(DTYPE_NAMES.values())})")
    if expert_format is not None:
        get_format(expert_format)  # an unknown name is refused before the checkpoint is read
    check_target(out_dir, force, src_dir)
    with Checkpoint(src_dir) as checkpoint:
        if not any((src_dir / name).is_file() for name in TOKENIZER_FILES):
            raise PackError(f"{src_dir}: neither {TOKENIZER_MODEL} nor {TOKENIZER_JSON}; a pack carries "
                            "the model's tokenizer")
        Tokenizer.from_dir(src_dir)  # one that does not load is refused now, not in every load of the pack
        dense_dtype = dtype or _source_dtype(checkpoint)
        experts, attention = pack_formats(
            checkpoint.config, dense_dtype, expert_format=expert_format, expert_bits=expert_bits,
            attn_format=attn_format, attn_bits=attn_bits, target=target,
        )
        device = quantize_device(target)
        with atomic_pack_dir(out_dir, force) as temp:
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
    layers, experts_per_layer = config.num_moe_layers, config.num_local_experts  # expert layers
    specs = list(dense_specs(config))
    step = progress_steps(len(specs) + layers * experts_per_layer, progress)

    writer = SafetensorsStreamWriter(
        out / DENSE_FILE, [t for spec in specs for t in file_tensors(spec, dtype, attn_format)]
    )
    try:
        for spec in specs:
            weight = checkpoint.dense(spec.key, spec.layer)
            where = checkpoint.where(spec.key, spec.layer)
            if spec.key in ATTENTION_KEYS and quantized_attention(attn_format):
                check_finite(where, weight)  # a NaN in the checkpoint is refused, not quantized
                quantized = quantize(weight.to(device), attn_format)  # the checkpoint's own tensor, as a load does
                for t in tensor_specs(spec.shape, attn_format):  # in the order the header declares
                    writer.write(quantized.tensors[t.name])
            else:
                cast = weight.to(dtype)
                check_cast(where, weight, cast)  # NaN/Inf in the checkpoint, or beyond float16's range
                writer.write(cast)
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
                # Checkpoint.expert checked the values finite, and a cast to float16 stays finite
                source.read_record(layer, expert, record)
                records.write(layer, expert, record)
                step(f"layer {layer} expert {expert}")
        records.finish()
    finally:
        records.close()

    src = checkpoint.model_dir
    tokenizer_files = [n for n in (*TOKENIZER_FILES, *OPTIONAL_TOKENIZER_FILES) if (src / n).is_file()]
    for name in (CONFIG_FILE, *tokenizer_files):
        copy_synced(src / name, out / name)
    config_raw = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    write_manifest(out, config_raw, dtype, layout, attn_format, tokenizer_files, records.entries,
                   dense_checksums=writer.checksums())


# ---- reading ----------------------------------------------------------------------------------


def float_spans(layout: RecordLayout) -> list[tuple[str, str, int, int, torch.dtype]]:
    """(matrix, tensor, start, end, dtype) of every floating tensor in a record of ``layout``, as
    ``RecordLayout.views`` places them (``quant.views``: ``tensor_specs`` order, each tensor on
    a ``MATRIX_ALIGNMENT`` boundary from its matrix's offset)."""
    spans = []
    for slot in layout.matrices:
        offset = 0
        for spec in tensor_specs(slot.shape, layout.fmt):
            offset = align_up(offset, MATRIX_ALIGNMENT)
            if spec.dtype.is_floating_point:
                start = slot.offset + offset
                spans.append((slot.name, spec.name, start, start + spec.nbytes, spec.dtype))
            offset += spec.nbytes
    return spans


class Pack(WeightFiles):
    """A validated offload pack: dense weights by logical name and expert records by one read."""

    open_error = PackError
    corrupt_error = CorruptPackError

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._verified: set[tuple[int, int]] = set()
        self._verified_dense: set[str] = set()
        self._dense_crcs: dict[str, int] | None = None  # version 3: name -> crc32
        self._attention: list[dict[str, dict[str, TensorEntry]]] = []
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise PackError(f"{self.path}: no such pack directory")
        if not manifest_path.is_file():
            raise PackError(f"{manifest_path}: missing; {self.path} is not an offload pack (see `offload convert`)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise PackError(f"{manifest_path}: not valid JSON: {exc}") from None
        except RecursionError:
            raise PackError(f"{manifest_path}: not valid JSON: nested too deeply") from None
        if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
            raise PackError(f"{manifest_path}: not an offload pack manifest (no \"format\": \"{PACK_FORMAT}\")")
        version = manifest.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PackError(f"{manifest_path}: format_version must be a positive integer, got {_shown(version)}")
        if version > PACK_VERSION:
            raise PackError(
                f"{manifest_path}: pack format version {version} is newer than this offload reads "
                f"({PACK_VERSION}); upgrade offload"
            )
        self.version = version
        self.manifest = manifest
        self._manifest_path = manifest_path
        # What this pack's format version has no checksum for (nothing for version 3).
        self.without_checksums: tuple[str, ...] = () if version >= CHECKSUMMED_VERSION else (DENSE_FILE, MANIFEST)
        if version >= CHECKSUMMED_VERSION:
            self._check_manifest_checksum()

        raw_config = manifest.get("config")
        if not isinstance(raw_config, dict):
            raise PackError(f"{manifest_path}: \"config\" must be the model's config.json object")
        self.config = ModelConfig.from_dict(raw_config, source=f"{manifest_path} (config)")
        self._check_config_file(raw_config)
        weight_format = manifest.get("weight_format") or {}
        if not isinstance(weight_format, dict):
            raise PackError(f"{manifest_path}: unsupported weight_format {_shown(weight_format)}")
        dense_dtype = _dtype_named(weight_format.get("dense"))
        experts_format = FORMATS.get(quant_alias(weight_format.get("experts")))
        if dense_dtype is None or experts_format is None:
            raise PackError(f"{manifest_path}: unsupported weight_format {_shown(weight_format)}")
        self.dense_dtype = dense_dtype
        plain = get_format(DTYPE_NAMES[dense_dtype])
        if version == 1:  # version 1 has no quantized attention
            attention = plain
        else:
            attention = FORMATS.get(quant_alias(weight_format.get("attention")))
            if attention is None or (attention.kind == "plain" and attention != plain):
                raise PackError(
                    f"{manifest_path}: weight_format attention {_shown(weight_format.get('attention'))} must be the "
                    f"dense dtype ({plain.name}) or a quantized format ({', '.join(n for n, f in FORMATS.items() if f.kind != 'plain')})"
                )
        self.attn_format: WeightFormat = attention  # the dense dtype's plain format when not quantized
        synthetic = manifest.get("synthetic")
        self.synthetic: dict | None = synthetic if isinstance(synthetic, dict) else None
        self.layout = RecordLayout.for_config(self.config, experts_format)
        self._float_spans = float_spans(self.layout)
        if manifest.get("record") != self.layout.to_dict():
            raise PackError(
                f"{manifest_path}: record layout {_shown(manifest.get('record'))} is not the one this offload "
                f"computes for the model ({self.layout.to_dict()!r})"
            )
        self._records = self._check_records(manifest.get("experts"))
        dense_path = self._member("dense_file")
        if version >= CHECKSUMMED_VERSION:
            self._dense_crcs = self._check_dense_checksums(dense_path, manifest.get("dense_crc32"))
        self._dense, self._layers = self._open_dense(dense_path)
        self._open_experts(self._member("experts_file"))

    # ---- validation -------------------------------------------------------------------------

    def _check_manifest_checksum(self) -> None:
        recorded = self.manifest.get("manifest_crc32")
        if not _is_crc(recorded):
            raise CorruptPackError(
                f"{self._manifest_path}: manifest_crc32 must be a crc32 (an integer from 0 to 2^32 - 1), "
                f"got {_shown(recorded)}; format version {self.version} manifests carry one"
            )
        try:
            actual = manifest_checksum(self.manifest)
        except (RecursionError, ValueError):
            raise CorruptPackError(f"{self._manifest_path}: content cannot be checksummed (nested too deeply)") from None
        if actual != recorded:
            raise CorruptPackError(
                f"{self._manifest_path}: fails its checksum (manifest_crc32 {recorded}, content {actual}); "
                f"the manifest was damaged or edited after it was written"
            )

    def _check_config_file(self, raw_config: dict[str, Any]) -> None:
        """The pack's config.json (what ``ModelConfig.from_dir`` reads) must hold the manifest's config."""
        path = self.path / CONFIG_FILE
        try:
            on_disk = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PackError(f"{path}: missing from the pack (it holds a copy of the manifest's config)") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptPackError(f"{path}: unreadable: {_shown(exc)}") from None
        if not isinstance(on_disk, dict):
            raise CorruptPackError(f"{path}: not a JSON object, unlike {MANIFEST}'s config")

        def canonical(value: object) -> str:  # so that NaN equals NaN, and key order does not matter
            return json.dumps(value, sort_keys=True, allow_nan=True)

        for key in sorted(set(on_disk) | set(raw_config)):
            mine, theirs = on_disk.get(key, _ABSENT), raw_config.get(key, _ABSENT)
            if mine is _ABSENT or theirs is _ABSENT:
                same = False
            else:
                try:
                    same = canonical(mine) == canonical(theirs)
                except (RecursionError, ValueError):
                    same = False
            if not same:
                mine_text = "absent" if mine is _ABSENT else _shown(mine)
                theirs_text = "absent" if theirs is _ABSENT else _shown(theirs)
                raise CorruptPackError(
                    f"{path}: {key} is {mine_text} but {MANIFEST}'s config says {theirs_text}; "
                    f"the pack's config.json disagrees with its manifest"
                )

    def _check_dense_checksums(self, path: Path, recorded: object) -> dict[str, int]:
        """Version 3's ``dense_crc32``: the header's checksum is checked now, and every tensor of
        the file must have one (each is checked when it is first read)."""
        where = f"{self._manifest_path}: dense_crc32"
        tensors = recorded.get("tensors") if isinstance(recorded, dict) else None
        header_crc = recorded.get("header") if isinstance(recorded, dict) else None
        if not _is_crc(header_crc) or not isinstance(tensors, dict) or not all(_is_crc(v) for v in tensors.values()):
            raise PackError(
                f"{where} must be {{\"header\": crc32, \"tensors\": {{name: crc32}}}}, got {_shown(recorded)}"
            )
        try:
            with open(path, "rb") as f:
                prefix = f.read(8)
                length = int.from_bytes(prefix, "little")
                if len(prefix) == 8 and 8 + length <= os.fstat(f.fileno()).st_size:
                    actual = zlib.crc32(f.read(length), zlib.crc32(prefix))
                    if actual != header_crc:
                        raise CorruptPackError(
                            f"{path}: header fails its checksum ({MANIFEST} records {header_crc}, the file "
                            f"gives {actual}); the file is damaged"
                        )
                # else: too short for its header, which read_header reports
        except OSError as exc:
            raise PackError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return dict(tensors)

    def _member(self, key: str) -> Path:
        name = self.manifest.get(key)
        if not isinstance(name, str) or not name or "\0" in name or Path(name).name != name or name in (".", ".."):
            raise PackError(f"{self._manifest_path}: \"{key}\" must be a file name in the pack, got {_shown(name)}")
        path = self.path / name
        if not path.is_file():
            raise PackError(f"{path}: missing from the pack (named by {MANIFEST} as {key})")
        return path

    def _check_records(self, entries: object) -> list[tuple[int, int, int]]:
        """(offset, length, crc32) per expert, layer-major."""
        c = self.config
        count = c.num_moe_layers * c.num_local_experts
        if not isinstance(entries, list) or len(entries) != count:
            got = len(entries) if isinstance(entries, list) else _shown(entries)
            raise PackError(f"{self._manifest_path}: \"experts\" must list {count} records, got {got}")
        records = []
        for index, entry in enumerate(entries):
            layer, expert = divmod(index, c.num_local_experts)
            fields = [entry.get(k) for k in ("layer", "expert", "offset", "length")] if isinstance(entry, dict) else [None]
            if any(isinstance(v, bool) or not isinstance(v, int) for v in fields) or not _is_crc(
                entry.get("crc32")
            ):
                raise PackError(
                    f"{self._manifest_path}: experts[{index}] is malformed (layer, expert, offset, length "
                    f"integers and a crc32 expected): {_shown(entry)}"
                )
            where = (entry["layer"], entry["expert"])
            offset, length, crc = entry["offset"], entry["length"], entry["crc32"]
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
        if self._dense_crcs is not None:
            for name in sorted(set(entries) ^ set(self._dense_crcs)):
                held = f"holds tensor '{name}', which {MANIFEST} has no checksum for" if name in entries else (
                    f"lacks tensor '{name}', which {MANIFEST} has a checksum for")
                raise CorruptPackError(f"{path}: {held}; the file and the manifest disagree")
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
            for key, (names, shape_of) in layer_table(c, layer).items():
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
        self._dense_path = path
        return dense, layers

    def _dense_entries(self) -> Iterator[TensorEntry]:
        yield from self._dense.values()
        for plain, attention in zip(self._layers, self._attention):
            yield from plain.values()
            for tensors in attention.values():
                yield from tensors.values()

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
        tensors = {name: self._read_entry(entry) for name, entry in self._attention[layer][key].items()}
        shape = layer_table(self.config, layer)[key][1](self.config)
        return from_tensors(tensors, shape, self.attn_format)

    def where(self, key: str, layer: int | None = None) -> str:
        if layer is not None and key in self._attention[layer]:
            return f"{self._dense_path}: tensor '{layer_table(self.config, layer)[key][0][0].format(layer=layer)}'"
        return super().where(key, layer)

    def _verify_tensor(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        """Version 3: a dense tensor's crc32, the first time it is read."""
        if self._dense_crcs is None or entry.name in self._verified_dense:
            return
        actual = zlib.crc32(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        if actual != self._dense_crcs[entry.name]:
            raise CorruptPackError(
                f"{entry.file}: tensor '{entry.name}' fails its checksum ({MANIFEST} records "
                f"{self._dense_crcs[entry.name]}, the file gives {actual}); the file is damaged"
            )
        self._verified_dense.add(entry.name)

    def _check_record_values(self, layer: int, expert: int, offset: int, record: torch.Tensor, raw: memoryview) -> None:
        """Every float of a record finite: a plain format's values; a quantized one's scales,
        absmax and quant maps (its codes are bytes, any of which is valid). Tested on the raw
        bytes in numpy (``finite_bytes``), so a first read inside a decode step adds no torch op."""
        words = np.frombuffer(raw, dtype=np.uint8)
        for matrix, name, start, end, dtype in self._float_spans:
            if not finite_bytes(words[start:end], dtype):
                view = dict(zip(("w1", "w3", "w2"), self.layout.views(record)))[matrix]
                tensor = view if self.layout.plain else view.tensors[name]
                raise CorruptPackError(
                    f"{self._experts_path}: expert {expert} of layer {layer} (offset {offset}): "
                    f"{matrix} {name} holds {describe_nonfinite(tensor)}; the pack is damaged"
                )

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor:
        """Read the record of expert ``expert`` of ``layer`` into ``out`` (uint8, CPU, contiguous,
        at least ``layout.nbytes``; a pinned buffer is fine) with one read; returns out[:nbytes].

        The first read of each expert checks its crc32 against the manifest and that its floats
        are finite (``_check_record_values``); later reads check nothing.
        """
        c = self.config
        if not (0 <= layer < c.num_moe_layers and 0 <= expert < c.num_local_experts):
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
            self._check_record_values(layer, expert, offset, record, buffer)
            self._verified.add((layer, expert))
        return record

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's (w1, w3, w2) in the record's format, on the CPU (views of one new buffer)."""
        record = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        return self.layout.views(self.read_record(layer, expert, record))

    def verify_all(self, progress: ProgressFn | None = None) -> None:
        """Check every dense tensor (version 3: its crc32) and every record (crc32, finite values),
        reading each once; raises CorruptPackError at the first bad one."""
        self._verified_dense.clear()
        if self._dense_crcs is not None:
            for entry in self._dense_entries():
                self._read_entry(entry)
        c = self.config
        scratch = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        total = c.num_moe_layers * c.num_local_experts
        for index in range(total):
            layer, expert = divmod(index, c.num_local_experts)
            self._verified.discard((layer, expert))
            self.read_record(layer, expert, scratch)
            if progress is not None:
                progress(index + 1, total, f"layer {layer} expert {expert}")
