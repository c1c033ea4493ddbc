"""What Qwen2-MoE, Qwen3-MoE and OLMoE spell alike: ``num_experts`` (transformers 5 may save it
as ``num_local_experts``), ``mlp.gate`` and ``mlp.experts.E.gate_proj/up_proj/down_proj``."""

ROUTER_NAMES = ("model.layers.{layer}.mlp.gate.weight",)
EXPERT_NAMES = {
    "w1": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    "w3": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "w2": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
}

# the Family fields these three share
QWEN_STYLE = dict(experts_keys=("num_experts", "num_local_experts"), router_names=ROUTER_NAMES, expert_names=EXPERT_NAMES)
