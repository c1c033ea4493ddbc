"""Loading a model's weights onto a device: formats, dense weights, resident experts.

What it is: the steps of ``Engine.load`` that read weights: which dtype and weight formats a
load uses (``weight_formats``: a pack fixes its experts' and quantized attention's formats, and
flags that disagree are refused), the dense weights (attention projections quantized on request,
or taken as a pack stores them), every expert on the device for the all-resident reference, and
how much RAM a default host tier may take. Quantization runs on the compute device, one tensor
at a time: the checkpoint's tensor is moved there and quantized there.

Weights are checked finite as they load: every dense tensor once placed
(``checkpoint.all_finite``: on a CPU its exponent bits in numpy, ~9 GB/s on one core of this
project's CPU, about 0.35 s for Mixtral-8x7B's 3.2 GB of bf16 dense weights; on a GPU one
``aminmax`` on the device; a tensor to be quantized is checked before, a pack's quantized
tensors as stored), refused naming its file and tensor: as damage (the reader's corrupt error) when the
stored value is NaN or Inf, as a ``SettingError`` with the largest magnitude when it only
overflowed the compute dtype (float16 holds at most 65504). Experts are checked by their
readers on first read (``Checkpoint.expert``, ``Pack.read_record``); resident experts cast to
float16 from another dtype are checked for overflow here. What it is not: the expert cache
(offload.experts) or generation (generation.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import psutil
import torch

from offload.checkpoint import Checkpoint, check_cast, check_finite, layer_table
from offload.config import ModelConfig
from offload.errors import SettingError
from offload.experts.record import RecordLayout
from offload.model import DenseWeights, ExpertWeights, LayerWeights, Matrix
from offload.pack import Pack
from offload.plan import attention_shapes, dense_bytes, dense_parameters_by_class, embeddings_on_host
from offload.quant import QuantizedMatrix, WeightFormat, format_for_bits, from_tensors, quantize

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_DTYPE = "bfloat16"
DEFAULT_CONTEXT = 4096

# progress(done, total, what): reported while loading weights
ProgressFn = Callable[[int, int, str], None]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise SettingError(f"dtype {name} is not supported (choose {', '.join(DTYPES)})")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise SettingError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


class ResidentExperts:
    """Expert provider that holds every expert on the device (the all-resident reference)."""

    def __init__(self, experts: list[list[ExpertWeights]], max_experts_per_call: int):
        self.experts = experts  # [layer][expert]
        self.max_experts_per_call = max_experts_per_call

    def get(self, layer: int, experts: Sequence[int], tokens: int = 1) -> list[ExpertWeights]:
        return [self.experts[layer][e] for e in experts]


def _bits_agree(bits: int, fmt: WeightFormat) -> bool:
    """Whether ``--expert-bits`` / ``--attn-bits`` ``bits`` describes a stored format: 16 any
    unquantized one, 8 int8, 4 every 4-bit format (nf4, fp4, double-quantized, CPU layout)."""
    if bits == 16:
        return fmt.kind == "plain"
    return fmt.kind != "plain" and fmt.bits == bits


def _refuse_cpu_layout_on_cuda(pack: Pack, device: torch.device) -> None:
    """A pack whose 4-bit weights are in bitsandbytes' fused CPU kernel's layout cannot run on
    CUDA (no CUDA kernel reads it): one line saying which format, why, and the command that
    writes a CUDA pack. Decided from the device's type alone, before anything touches CUDA."""
    if device.type != "cuda":
        return
    experts, attention = pack.layout.fmt, pack.attn_format
    held = [f"{fmt.name} {what}" for what, fmt in (("experts", experts), ("attention", attention))
            if fmt.kind == "4bit-cpu"]
    if not held:
        return
    flags = []  # the same widths, in the portable layout CUDA reads
    if experts.kind == "4bit-cpu":
        flags.append("--expert-bits 4" if experts.quant_type == "nf4" else f"--expert-format {experts.quant_type}")
    elif experts.kind != "plain":
        flags.append(f"--expert-format {experts.name}")
    if attention.kind != "plain":
        flags.append(f"--attn-bits {attention.bits}")
    flags.append("--for cuda")
    synthetic = pack.synthetic or {}
    if synthetic.get("preset"):
        command = (f"`offload synth {synthetic['preset']} OUT_DIR --layers {synthetic.get('layers')} "
                   f"--seed {synthetic.get('seed')} {' '.join(flags)}`")
    else:
        command = f"`offload convert HF_DIR OUT_DIR {' '.join(flags)}`"
    raise SettingError(
        f"--device {device}: {pack.path} holds {' and '.join(held)} in the layout of bitsandbytes' fused "
        f"CPU kernel, which CUDA cannot run; write a CUDA pack with {command}"
    )


def weight_formats(
    source: Checkpoint | Pack,
    device: torch.device,
    dtype: torch.dtype | None,
    expert_format: WeightFormat | None,
    expert_bits: int | None,
    attn_bits: int | None,
) -> tuple[torch.dtype, RecordLayout, WeightFormat | None]:
    """(compute dtype, expert record layout, attention format or None) for a load.

    A pack fixes its experts' format, and for unquantized packs the compute dtype too; an
    ``expert_format`` or ``expert_bits`` that disagrees is refused, naming the pack and the
    flag. A pack with quantized attention fixes that too (returned, to be taken as stored), and
    an ``attn_bits`` that disagrees is refused; a pack with 16-bit attention is quantized on
    load like a checkpoint when ``attn_bits`` asks. A pack in a CPU-only layout is refused on
    CUDA. A checkpoint takes ``expert_format`` or ``expert_bits``, else unquantized in the
    compute dtype.
    """
    config = source.config
    shapes = tuple(attention_shapes(config).values())
    if isinstance(source, Pack):
        _refuse_cpu_layout_on_cuda(source, device)
        layout = source.layout
        if expert_format is not None and expert_format != layout.fmt:
            raise SettingError(
                f"--expert-format {expert_format.name}: {source.path} holds {layout.fmt.name} experts; "
                f"convert the checkpoint again with --expert-format {expert_format.name}"
            )
        if expert_bits is not None and not _bits_agree(expert_bits, layout.fmt):
            format_for_bits(expert_bits, torch.bfloat16, device.type, setting="--expert-bits")  # refuses bad bits
            raise SettingError(
                f"--expert-bits {expert_bits}: {source.path} holds {layout.fmt.name} experts; run without "
                f"--expert-bits or convert the checkpoint again with --expert-bits {expert_bits}"
            )
        dtype = dtype or (layout.dtype if layout.plain else parse_dtype(DEFAULT_DTYPE))
        if layout.plain and dtype != layout.dtype:
            raise SettingError(
                f"--dtype {str(dtype).removeprefix('torch.')}: {source.path} holds "
                f"{str(layout.dtype).removeprefix('torch.')} experts; run with that dtype "
                f"or convert the checkpoint again with --dtype"
            )
        stored = source.attn_format
        if stored.kind != "plain":
            if attn_bits is not None and not _bits_agree(attn_bits, stored):
                format_for_bits(attn_bits, dtype, device.type, setting="--attn-bits")  # refuses bad bits
                raise SettingError(
                    f"--attn-bits {attn_bits}: {source.path} holds {stored.name} attention; run without "
                    f"--attn-bits or convert the checkpoint again with --attn-bits {attn_bits}"
                )
            return dtype, layout, stored
    else:
        dtype = dtype or parse_dtype(DEFAULT_DTYPE)
        if expert_bits is not None:
            I, D = config.intermediate_size, config.hidden_size
            expert_format = format_for_bits(expert_bits, dtype, device.type, ((I, D), (D, I)), "--expert-bits")
        layout = RecordLayout.for_config(config, expert_format or dtype)
    attn_format = None
    if attn_bits is not None and attn_bits != 16:
        attn_format = format_for_bits(attn_bits, dtype, device.type, shapes, "--attn-bits")
    return dtype, layout, attn_format


def spare_ram(device: torch.device, config: ModelConfig, dtype: torch.dtype) -> int:
    """RAM the host tier may take when no --ram is given: 80% of what is free now, less the
    dense weights when they live in RAM too (CPU device), or, on a card, the input embeddings
    that stay in RAM (``offload.plan.embeddings_on_host``)."""
    free = int(psutil.virtual_memory().available * 0.8)
    if device.type == "cpu":
        free -= dense_bytes(config, dtype)
    elif embeddings_on_host(config, device):
        free -= dense_parameters_by_class(config)["embeddings"] * dtype.itemsize
    return max(0, free)


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def load_dense(
    source: Checkpoint | Pack,
    device: torch.device,
    dtype: torch.dtype,
    attn_format: WeightFormat | None,
    progress: ProgressFn | None,
) -> DenseWeights:
    """Every non-expert weight on the device, in the compute dtype; the attention projections
    quantized to ``attn_format`` when one is given, on the device (the stored tensor is moved
    there first), or, from a pack that stores them quantized, moved there as they are. The input
    embeddings stay in host RAM where ``embeddings_on_host`` says (a card, lm_head untied)."""
    c = source.config
    embed_device = torch.device("cpu") if embeddings_on_host(c, device) else device
    total = 2 + c.num_hidden_layers + (0 if c.tie_word_embeddings else 1)

    error = source.corrupt_error  # CorruptCheckpointError or CorruptPackError

    def place(t: torch.Tensor, key: str, layer: int | None = None, where: torch.device = device) -> torch.Tensor:
        placed = t.to(device=where, dtype=dtype)
        check_cast(source.where(key, layer), t, placed, error)  # NaN/Inf stored, or beyond the dtype's range
        return placed

    def place_attention(t: Matrix, key: str, layer: int) -> Matrix:
        if isinstance(t, QuantizedMatrix):  # a pack's quantized attention: its tensors, moved
            for name, tensor in t.tensors.items():  # scales, absmax, quant maps (codes are bytes)
                check_finite(f"{source.where(key, layer)} ({name})", tensor, error)
            return from_tensors(t.tensors, t.shape, t.fmt, device)
        if attn_format is None:
            return place(t, key, layer)
        check_finite(source.where(key, layer), t, error)  # before quantizing: absmax may hide a NaN
        return quantize(t.to(device), attn_format)  # the stored tensor, quantized on the device

    def tick(done: int, what: str) -> None:
        if progress is not None:
            progress(done, total, what)

    embed = place(source.dense("embed_tokens"), "embed_tokens", where=embed_device)
    norm = place(source.dense("norm"), "norm")
    lm_head = embed if c.tie_word_embeddings else place(source.dense("lm_head"), "lm_head")
    tick(total - c.num_hidden_layers, "embeddings")
    layers: list[LayerWeights] = []
    for layer in range(c.num_hidden_layers):  # the shared weights and the family's own (norms, biases, MLPs)
        layers.append(LayerWeights(**{
            key: (place_attention if key in ATTENTION_PROJECTIONS else place)(source.dense(key, layer), key, layer)
            for key in layer_table(c, layer)
        }))
        tick(total - c.num_hidden_layers + layer + 1, f"layer {layer} dense weights")
    return DenseWeights(embed_tokens=embed, norm=norm, lm_head=lm_head, layers=layers)


def _expert_where(source: Checkpoint | Pack, layer: int, expert: int, matrix: str) -> str:
    """"FILE: tensor 'NAME'" of one expert matrix, for messages about it."""
    if isinstance(source, Pack):
        return f"{source.path / 'experts.bin'}: expert {expert} of layer {layer}, {matrix}"
    where = source.expert_ranges(layer, expert)[matrix]
    part = f" (expert {expert}, {matrix})" if where.entry.shape != where.shape else ""
    return f"{where.entry.file}: tensor '{where.entry.name}'{part}"


def load_resident_experts(
    source: Checkpoint | Pack,
    layout: RecordLayout,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None,
) -> ResidentExperts:
    """Every expert on the device, in the layout's format: the all-resident reference. Quantized
    experts are made exactly as the cache's records are (same input, same quantizer, on the
    device: ``CheckpointRecords`` given the same device), one matrix at a time."""
    c = source.config

    def place(w: Matrix, layer: int, expert: int, matrix: str) -> Matrix:
        if isinstance(w, QuantizedMatrix):  # from a quantized pack: its tensors, moved
            return from_tensors(w.tensors, w.shape, w.fmt, device)
        if layout.plain:
            placed = w.to(device=device, dtype=dtype)
            if placed.dtype == torch.float16 and w.dtype != torch.float16:  # a narrower range: may overflow
                check_cast(_expert_where(source, layer, expert, matrix), w, placed, source.corrupt_error)
            return placed
        return quantize(w.to(device), layout.fmt)  # the checkpoint's own tensor, quantized on the device

    total = c.num_moe_layers * c.num_local_experts
    experts: list[list[ExpertWeights]] = []
    for layer in range(c.num_moe_layers):  # expert layers (``config.moe_layers``)
        row = []
        for e in range(c.num_local_experts):
            weights = source.expert(layer, e)  # checked finite by its reader on this first read
            row.append(ExpertWeights(*(place(w, layer, e, m) for w, m in zip(weights, ("w1", "w3", "w2")))))
            if progress is not None:
                progress(layer * c.num_local_experts + e + 1, total, f"layer {layer} expert {e}")
        experts.append(row)
    return ResidentExperts(experts, max_experts_per_call=c.num_experts_per_tok)
