"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): RMSNorm over each head of q and k (before RoPE),
128 experts top-8 whose weights are renormalised when ``norm_topk_prob``, cast to the model
dtype before scaling; ``attention_bias`` puts a bias on q, k, v and o; ``mlp_only_layers`` and
``decoder_sparse_step`` make some layers dense. No shared expert."""

from __future__ import annotations

from offload.families.base import Family, Traits, attention_extras, dense_layers, optional_bool, qwen_dense_mlp, qwen_window
from offload.families.qwen_names import QWEN_STYLE


def _traits(raw, source, need) -> Traits:
    bias = optional_bool(raw, "attention_bias", False, source)
    return Traits(
        qk_norm="head",
        qkv_bias=bias,
        o_bias=bias,
        norm_topk_prob=optional_bool(raw, "norm_topk_prob", False, source),
        gate_in_model_dtype=True,
        **dense_layers(raw, source, need),
    )


QWEN3_MOE = Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    expert_width_keys=("moe_intermediate_size",),
    **QWEN_STYLE,
    read_traits=_traits,
    attention_tensors=attention_extras,
    dense_mlp_tensors=qwen_dense_mlp,
    read_window=qwen_window,
)
