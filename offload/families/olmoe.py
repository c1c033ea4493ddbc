"""OLMoE (OLMoE-1B-7B): RMSNorm over the whole q and k projections (before the split into heads
and RoPE), optional ``clip_qkv``, 64 experts top-8 with the full softmax's weights (renormalised
only when ``norm_topk_prob``), cast to the model dtype; ``attention_bias`` on q, k, v and o.
The expert width is ``intermediate_size``."""

from __future__ import annotations

from offload.errors import ConfigError, shown
from offload.families.base import Family, Traits, attention_extras, optional_bool
from offload.families.qwen_names import QWEN_STYLE


def _clip(raw, source) -> float | None:
    value = raw.get("clip_qkv")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < float("inf"):
        raise ConfigError(f"{source}: clip_qkv must be null or a positive number, got {shown(value, 60)}")
    return float(value)


def _traits(raw, source, need) -> Traits:
    bias = optional_bool(raw, "attention_bias", False, source)
    return Traits(
        qk_norm="projection",
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=_clip(raw, source),
        norm_topk_prob=optional_bool(raw, "norm_topk_prob", False, source),
        gate_in_model_dtype=True,
    )


OLMOE = Family(
    name="olmoe",
    architectures=("OlmoeForCausalLM",),
    expert_width_keys=("intermediate_size",),
    **QWEN_STYLE,
    read_traits=_traits,
    attention_tensors=attention_extras,
)
