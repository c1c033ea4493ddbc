"""Mixtral (8x7B, 8x22B): the reference family. Softmax router renormalised over the top k in
fp32, SwiGLU experts named ``block_sparse_moe.experts.E.w1/w3/w2``, no attention biases or q/k
norms. Every trait is ``Traits``' default."""

from __future__ import annotations

from offload.families.base import Family, Traits

MIXTRAL = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    experts_keys=("num_local_experts",),
    expert_width_keys=("intermediate_size",),
    router_names=("model.layers.{layer}.block_sparse_moe.gate.weight", "model.layers.{layer}.mlp.gate.weight"),
    expert_names={
        "w1": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "w3": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        "w2": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    },
    read_traits=lambda raw, source, need: Traits(),
)
