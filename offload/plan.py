"""Memory plan: how many experts fit on the device and in RAM, from byte budgets.

What it is: arithmetic over a model's shapes (dense weights, KV cache, expert records) and the
user's budgets (``--vram``, ``--ram``, ``--experts-per-layer``), with a clear refusal when a
budget cannot hold the minimum (dense weights + KV cache + top-k experts per layer); the dense
bytes by class (embeddings, lm_head, attention, norms, routers); and ``plan_model``, the whole
plan that ``offload info`` prints, for a checkpoint's config or a built-in published shape
(``BUILTIN_MODELS``: Mixtral-8x7B, Mixtral-8x22B), so a plan needs no download. What it is
not, yet: the machine probe and TOML profiles, which come with the CLI's profiles.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from offload import quant
from offload.config import ModelConfig
from offload.errors import BudgetError, ConfigError, SettingError
from offload.experts.record import RecordLayout

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_bytes(text: str | int, setting: str = "budget") -> int:
    """'6GiB', '512 MiB', '16GB', '1.5G' (G = GiB), '0' -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        unit = match and _UNITS.get(match.group(2).lower())
        if not match or unit is None:
            raise SettingError(f"{setting} {text!r}: expected a size like 6GiB, 512MiB, 16GB or 0")
        value = int(float(match.group(1)) * unit)
    if value < 0:
        raise SettingError(f"{setting} must not be negative, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dense_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Every weight that is not an expert: embeddings, lm_head, norms, attention, routers."""
    c = config
    D, V = c.hidden_size, c.vocab_size
    attention = D * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = 2 * D + attention + c.num_local_experts * D
    params = V * D * (1 if c.tie_word_embeddings else 2) + D + c.num_hidden_layers * per_layer
    return params * _itemsize(dtype)


def kv_cache_bytes(config: ModelConfig, context: int, dtype: torch.dtype) -> int:
    c = config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * context * c.head_dim * _itemsize(dtype)


@dataclass(frozen=True)
class MemoryPlan:
    dense_bytes: int
    kv_cache_bytes: int
    expert_bytes: int  # one expert record
    experts_total: int
    slots_per_layer: int  # device slots for each layer
    host_experts: int  # records held in RAM
    num_layers: int

    @property
    def device_expert_bytes(self) -> int:
        return self.slots_per_layer * self.num_layers * self.expert_bytes

    @property
    def device_bytes(self) -> int:
        return self.dense_bytes + self.kv_cache_bytes + self.device_expert_bytes

    @property
    def host_bytes(self) -> int:
        return self.host_experts * self.expert_bytes

    @property
    def disk_tier(self) -> bool:
        """Whether some misses will read the source on disk."""
        return self.slots_per_layer * self.num_layers < self.experts_total and self.host_experts < self.experts_total

    def to_dict(self) -> dict:
        return dict(
            asdict(self),
            device_expert_bytes=self.device_expert_bytes,
            device_bytes=self.device_bytes,
            host_bytes=self.host_bytes,
            disk_tier=self.disk_tier,
        )

    def describe(self) -> str:
        total = self.experts_total // self.num_layers
        return (
            f"{self.slots_per_layer}/{total} experts per layer on the device "
            f"({format_bytes(self.device_expert_bytes)}), {self.host_experts}/{self.experts_total} in RAM "
            f"({format_bytes(self.host_bytes)}){', rest read from disk' if self.disk_tier else ''}"
        )


def plan_memory(
    config: ModelConfig,
    expert_bytes: int,
    dtype: torch.dtype,
    context: int,
    *,
    vram: int | None = None,
    ram: int | None = None,
    experts_per_layer: int | None = None,
    ram_available: int | None = None,
    dense: int | None = None,
) -> MemoryPlan:
    """Slots per layer from ``experts_per_layer`` or the ``vram`` budget; RAM records from ``ram``.

    With neither device setting, every expert gets a slot. With no ``ram``, RAM holds every
    expert, or as many as fit in ``ram_available`` bytes when that is given. ``dense`` replaces
    ``dense_bytes(config, dtype)`` when the dense weights are not all in ``dtype`` (quantized
    attention: ``dense_bytes_by_class``).
    """
    c = config
    L, E, K = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok
    dense = dense_bytes(c, dtype) if dense is None else dense
    kv = kv_cache_bytes(c, context, dtype)
    fixed = dense + kv
    minimum = fixed + L * K * expert_bytes
    if experts_per_layer is not None:
        if not K <= experts_per_layer <= E:
            raise BudgetError(f"--experts-per-layer {experts_per_layer}: must be in [{K}, {E}] (top-k to all experts)")
        slots = experts_per_layer
    elif vram is not None:
        if vram < minimum:
            raise BudgetError(
                f"--vram {format_bytes(vram)} is below the minimum {format_bytes(minimum)}: dense weights "
                f"{format_bytes(dense)} + KV cache {format_bytes(kv)} at context {context} + top-{K} experts "
                f"for each of {L} layers ({format_bytes(L * K * expert_bytes)})"
            )
        slots = min(E, (vram - fixed) // (L * expert_bytes))
    else:
        slots = E
    total = L * E
    if slots == E:
        host = 0  # everything lives on the device; nothing to stage in RAM
    elif ram is None:
        host = total if ram_available is None else max(0, min(total, ram_available // expert_bytes))
    else:
        host = min(total, ram // expert_bytes)
    return MemoryPlan(dense, kv, expert_bytes, total, slots, host, L)


# ---- the model plan that `offload info` prints ----------------------------------------------

# Published config.json values (the fields ModelConfig reads), so a plan needs no download.
# Mixtral-8x7B: mistralai/Mixtral-8x7B-v0.1 config.json (its numbers are also in
# /work/shared/ARCHITECTURE.md "Sizes worth knowing"). Mixtral-8x22B: mistralai/Mixtral-8x22B-v0.1
# and Mixtral-8x22B-Instruct-v0.1 config.json as recalled, not re-read here: vocab_size 32768 (the
# v3 tokenizer with control tokens; the first torrent conversion, mistral-community/Mixtral-8x22B-v0.1,
# says 32000; the difference is 2 x 768 x 6144 weights, 18.9 MB in bf16).
BUILTIN_MODELS: dict[str, tuple[str, dict]] = {
    "mixtral-8x7b": ("Mixtral-8x7B", {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
    "mixtral-8x22b": ("Mixtral-8x22B", {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
        "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536,
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
}



def builtin_model(name: str) -> tuple[str, ModelConfig]:
    """(display name, config) of a built-in model by its name, any case ("mixtral-8x7b")."""
    key = name.strip().lower()
    if key not in BUILTIN_MODELS:
        raise ConfigError(f"{name!r}: no built-in model of that name (built in: {', '.join(BUILTIN_MODELS)})")
    display, raw = BUILTIN_MODELS[key]
    return display, ModelConfig.from_dict(raw, source=f"built-in {key}")


def attention_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """q, k, v, o projection shapes [out, in] of one layer."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    D = c.hidden_size
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q)}


DENSE_CLASSES = ("embeddings", "lm_head", "attention", "norms", "routers")


def dense_bytes_by_class(
    config: ModelConfig, dtype: torch.dtype, attn_format: quant.WeightFormat | str | None = None
) -> dict[str, int]:
    """Bytes of every non-expert weight by class (``DENSE_CLASSES``). The attention projections
    are in ``attn_format`` (default: plain ``dtype``), each matrix with its quantization state,
    packed tight; the rest stays in ``dtype``. lm_head is 0 when it is the embedding table (tied).
    In plain ``dtype`` the sum equals ``dense_bytes(config, dtype)``."""
    c = config
    size = _itemsize(dtype)
    fmt = quant.get_format(attn_format if attn_format is not None else str(dtype).removeprefix("torch."))
    per_layer_attention = sum(quant.matrix_bytes(shape, fmt) for shape in attention_shapes(c).values())
    embeddings = c.vocab_size * c.hidden_size * size
    return {
        "embeddings": embeddings,
        "lm_head": 0 if c.tie_word_embeddings else embeddings,
        "attention": c.num_hidden_layers * per_layer_attention,
        "norms": (2 * c.num_hidden_layers + 1) * c.hidden_size * size,
        "routers": c.num_hidden_layers * c.num_local_experts * c.hidden_size * size,
    }


@dataclass(frozen=True)
class ModelPlan:
    """Everything ``offload info`` shows: sizes by class, one expert record, and the memory
    plan for a card (``vram``), or, with no card given, the plan at the minimum card."""

    name: str
    config: ModelConfig
    dtype: torch.dtype
    context: int
    expert_format: quant.WeightFormat
    attn_format: quant.WeightFormat
    dense_by_class: dict[str, int]
    expert_bytes: int  # one expert record (RecordLayout.nbytes)
    min_vram: int  # dense + KV cache + top-k experts per layer
    all_resident_vram: int  # dense + KV cache + every expert
    memory: MemoryPlan  # at ``vram``, or at ``min_vram`` when no vram was given
    vram: int | None
    ram: int | None

    @property
    def dense_bytes(self) -> int:
        return sum(self.dense_by_class.values())

    @property
    def experts_total_bytes(self) -> int:
        return self.memory.experts_total * self.expert_bytes

    @property
    def device_experts(self) -> int:
        return self.memory.slots_per_layer * self.memory.num_layers

    @property
    def disk_experts(self) -> int:
        """Experts with no place in RAM (nor a device slot of their own): read from disk on a miss."""
        return self.memory.experts_total - self.memory.host_experts if self.memory.disk_tier else 0

    def to_dict(self) -> dict:
        m = self.memory
        return {
            "model": self.name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "context": self.context,
            "expert_format": self.expert_format.name,
            "expert_bits_per_weight": self.expert_format.bits_per_weight(
                (self.config.intermediate_size, self.config.hidden_size)
            ),
            "attn_format": self.attn_format.name,
            "dense_bytes": self.dense_bytes,
            "dense_bytes_by_class": dict(self.dense_by_class),
            "expert_bytes": self.expert_bytes,
            "experts_total": m.experts_total,
            "experts_total_bytes": self.experts_total_bytes,
            "kv_cache_bytes": m.kv_cache_bytes,
            "min_vram_bytes": self.min_vram,
            "all_resident_vram_bytes": self.all_resident_vram,
            "vram_bytes": self.vram,
            "ram_bytes": self.ram,
            "slots_per_layer": m.slots_per_layer,
            "device_experts": self.device_experts,
            "device_expert_bytes": m.device_expert_bytes,
            "device_bytes": m.device_bytes,
            "host_experts": m.host_experts,
            "host_bytes": m.host_bytes,
            "disk_experts": self.disk_experts,
            "config": self.config.to_dict(),
        }


def plan_model(
    name: str,
    config: ModelConfig,
    dtype: torch.dtype,
    context: int,
    expert_format: quant.WeightFormat | str,
    attn_format: quant.WeightFormat | str,
    *,
    vram: int | None = None,
    ram: int | None = None,
) -> ModelPlan:
    """The plan for ``config`` on a card of ``vram`` bytes with ``ram`` bytes for experts (no
    ``ram``: RAM holds every expert). Raises BudgetError, naming the minimum, when ``vram`` is
    below it; with no ``vram`` the plan is the one at the minimum card (top-k slots per layer)."""
    if not 1 <= context <= config.max_position_embeddings:
        raise SettingError(f"--context {context}: must be in [1, {config.max_position_embeddings}]")
    expert_format, attn_format = quant.get_format(expert_format), quant.get_format(attn_format)
    by_class = dense_bytes_by_class(config, dtype, attn_format)
    record = RecordLayout.for_config(config, expert_format).nbytes

    def plan(**budget) -> MemoryPlan:
        return plan_memory(config, record, dtype, context, ram=ram, dense=sum(by_class.values()), **budget)

    minimum = plan(experts_per_layer=config.num_experts_per_tok)
    everything = plan(experts_per_layer=config.num_local_experts)
    memory = minimum if vram is None else plan(vram=vram)
    return ModelPlan(
        name, config, dtype, context, expert_format, attn_format, by_class, record,
        minimum.device_bytes, everything.device_bytes, memory, vram, ram,
    )
