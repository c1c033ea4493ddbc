"""Memory plan: how many experts fit on the device and in RAM, from byte budgets.

What it is: arithmetic over a model's shapes (dense weights, KV cache, expert records) and the
user's budgets (``--vram``, ``--ram``, ``--experts-per-layer``), with a clear refusal when a
budget cannot hold the minimum (dense weights + KV cache + top-k experts per layer). What it is
not, yet: the machine probe and TOML profiles, which come with the CLI's profiles.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from offload.config import ModelConfig
from offload.errors import BudgetError, SettingError

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
) -> MemoryPlan:
    """Slots per layer from ``experts_per_layer`` or the ``vram`` budget; RAM records from ``ram``.

    With neither device setting, every expert gets a slot. With no ``ram``, RAM holds every
    expert, or as many as fit in ``ram_available`` bytes when that is given.
    """
    c = config
    L, E, K = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok
    dense, kv = dense_bytes(c, dtype), kv_cache_bytes(c, context, dtype)
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
