"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): biases on q, k and v; beside the routed
experts a shared expert (its own FFN width) whose output is scaled by a sigmoid gate and added
to theirs; top-k weights from the full softmax, renormalised only when ``norm_topk_prob``;
``mlp_only_layers`` and ``decoder_sparse_step`` make some layers dense."""

from __future__ import annotations

from offload.families.base import Family, LayerTensor, Traits, attention_extras, dense_layers, optional_bool, qwen_dense_mlp, qwen_window
from offload.families.qwen_names import QWEN_STYLE

SHARED = "model.layers.{layer}.mlp.shared_expert."


def _traits(raw, source, need) -> Traits:
    return Traits(
        qkv_bias=optional_bool(raw, "qkv_bias", True, source),
        norm_topk_prob=optional_bool(raw, "norm_topk_prob", False, source),
        gate_in_model_dtype=True,
        shared_expert_intermediate_size=need("shared_expert_intermediate_size"),
        **dense_layers(raw, source, need),
    )


def _shared_expert(config) -> dict[str, LayerTensor]:
    return dict(
        shared_w1=LayerTensor((SHARED + "gate_proj.weight",), lambda c: (c.shared_expert_intermediate_size, c.hidden_size)),
        shared_w3=LayerTensor((SHARED + "up_proj.weight",), lambda c: (c.shared_expert_intermediate_size, c.hidden_size)),
        shared_w2=LayerTensor((SHARED + "down_proj.weight",), lambda c: (c.hidden_size, c.shared_expert_intermediate_size)),
        shared_gate=LayerTensor(("model.layers.{layer}.mlp.shared_expert_gate.weight",), lambda c: (1, c.hidden_size)),
    )


QWEN2_MOE = Family(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    expert_width_keys=("moe_intermediate_size",),
    **QWEN_STYLE,
    read_traits=_traits,
    attention_tensors=attention_extras,
    moe_tensors=_shared_expert,
    dense_mlp_tensors=qwen_dense_mlp,
    read_window=lambda raw, source: qwen_window(raw, source, per_layer_from="max_window_layers"),
)
