"""Tiny random checkpoints of the non-Mixtral families, written by transformers' own classes.

Each ``FamilyShape`` names a transformers config and model class and the numbers that make its
family's traits show: head_dim unlike hidden/heads (Qwen3, Qwen2), a shared expert (Qwen2),
top-k above 2, q/k norms per head (Qwen3) or over the projection (OLMoE), biases, clip_qkv.
``write_family`` saves one with ``save_pretrained`` (sharded hub layout: per-expert tensors
``mlp.experts.E.gate_proj``...) next to a byte-level BPE ``tokenizer.json`` with no bos, as
these families ship (400 tokens and 3 specials for 512 embedding rows: like Qwen's, the model
has rows past its tokenizer, and a random model samples them). transformers is the test
oracle; the engine never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.tokenizer_builder import write_json_tokenizer

JSON_TOKENS = 400  # byte-level BPE tokens of the checkpoints' tokenizer.json (then 3 specials)
COMMON = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
    eos_token_id=JSON_TOKENS + 2, pad_token_id=JSON_TOKENS,
)


@dataclass(frozen=True)
class FamilyShape:
    name: str
    config_class: str
    model_class: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config_kwargs(self) -> dict[str, Any]:
        return {**COMMON, **self.overrides}

    def classes(self):
        import transformers

        return getattr(transformers, self.config_class), getattr(transformers, self.model_class)


QWEN3 = FamilyShape("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
    "head_dim": 32, "moe_intermediate_size": 48, "intermediate_size": 96, "num_experts": 16,
    "num_experts_per_tok": 4, "norm_topk_prob": True, "rope_theta": 1e6, "attention_bias": True,
})
QWEN3_UNNORMALISED = FamilyShape("qwen3_moe_unnormalised", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
    "head_dim": 24, "moe_intermediate_size": 40, "intermediate_size": 96, "num_experts": 12,
    "num_experts_per_tok": 3, "norm_topk_prob": False, "num_key_value_heads": 1,
})
QWEN2 = FamilyShape("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
    "head_dim": 24, "moe_intermediate_size": 40, "intermediate_size": 96,
    "shared_expert_intermediate_size": 80, "num_experts": 12, "num_experts_per_tok": 3,
    "norm_topk_prob": False, "rope_theta": 1e6,
})
OLMOE = FamilyShape("olmoe", "OlmoeConfig", "OlmoeForCausalLM", {
    "intermediate_size": 48, "num_experts": 16, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "clip_qkv": 4.0, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
})
# dense-MLP layers: Qwen3's mlp_only_layers (the middle layer), Qwen2's decoder_sparse_step
# (experts only in layers 1 and 3 of 4: the first layer is dense)
QWEN3_DENSE = FamilyShape("qwen3_moe_dense_layer", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
    "head_dim": 32, "moe_intermediate_size": 48, "intermediate_size": 72, "num_experts": 8,
    "num_experts_per_tok": 3, "norm_topk_prob": True, "mlp_only_layers": [1],
})
QWEN2_SPARSE_STEP = FamilyShape("qwen2_moe_sparse_step", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
    "moe_intermediate_size": 40, "intermediate_size": 72, "shared_expert_intermediate_size": 56,
    "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "num_hidden_layers": 4,
})
FAMILY_SHAPES = (QWEN3, QWEN3_UNNORMALISED, QWEN2, OLMOE, QWEN3_DENSE, QWEN2_SPARSE_STEP)


def build_family_reference(shape: FamilyShape, seed: int = 0):
    """The transformers model for ``shape`` in fp32, eval mode, weights drawn from ``seed`` (a
    wider init than HF's default: decisive routers and varied greedy text; norms and biases
    drawn too, so a norm or bias the engine skipped would show)."""
    config_class, model_class = shape.classes()
    torch.manual_seed(seed)
    model = model_class(config_class(**shape.config_kwargs()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norms
                p.uniform_(0.6, 1.4)
    return model.eval()


def write_family(out_dir: Path, shape: FamilyShape, *, seed: int = 0, shard_size: str = "200KB") -> Path:
    """Save the reference model for ``shape`` to ``out_dir`` with a tokenizer; returns out_dir."""
    out_dir = Path(out_dir)
    model = build_family_reference(shape, seed)
    write_json_tokenizer(out_dir, vocab_size=JSON_TOKENS)
    generation = (out_dir / "generation_config.json").read_text()
    model.save_pretrained(out_dir, max_shard_size=shard_size)  # writes its own generation_config.json
    (out_dir / "generation_config.json").write_text(generation)
    return out_dir


def load_family_reference(path: Path, shape: FamilyShape, dtype=torch.float32):
    """transformers' own load of a written checkpoint."""
    _, model_class = shape.classes()
    return model_class.from_pretrained(path, dtype=dtype).eval()
