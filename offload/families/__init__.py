"""Model families: what differs between the MoE architectures the engine runs, one module each.

What it is: a ``Family`` per Hugging Face architecture (``mixtral``, ``qwen2_moe``,
``qwen3_moe``, ``olmoe``): the config keys it spells its sizes with, the traits its decoder
math switches on (q/k norms, projection biases, a shared expert, how top-k weights are
normalised), and the names its checkpoint gives the tensors. ``offload.config`` reads a
config through its family, ``offload.checkpoint`` finds tensors through it, and
``offload.model`` computes from the traits it leaves on ``ModelConfig``.

What it is not: model math (that stays in ``offload.model``, shared by every family) or a
loader. The expert record, cache, policies, prefetch, quantization, traces, plans, profiles,
bench, chat and serve see only ``ModelConfig`` and work for every family unchanged.
"""

from __future__ import annotations

from offload.families.base import Family, LayerTensor, Traits
from offload.families.mixtral import MIXTRAL
from offload.families.olmoe import OLMOE
from offload.families.qwen2_moe import QWEN2_MOE
from offload.families.qwen3_moe import QWEN3_MOE

FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE)
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for f in FAMILIES for a in f.architectures)


def family_named(name: str) -> Family:
    """The family whose ``name`` (its HF model_type) is ``name``; KeyError otherwise."""
    return BY_NAME[name]


def family_for(architectures: list, model_type: object) -> Family | None:
    """The family a config.json names: by its ``architectures`` list when present (the first
    supported entry), else by ``model_type``; None when no family matches."""
    if architectures:
        for arch in architectures:
            for family in FAMILIES:
                if isinstance(arch, str) and arch in family.architectures:
                    return family
        return None
    return next((f for f in FAMILIES if f.name == model_type), None)


__all__ = [
    "BY_NAME", "FAMILIES", "Family", "LayerTensor", "SUPPORTED_ARCHITECTURES", "Traits",
    "family_for", "family_named",
]
