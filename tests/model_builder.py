"""Tiny Mixtral checkpoints for tests, written exactly as users have them on disk.

``write_tiny_mixtral`` builds transformers' ``MixtralForCausalLM`` with a fixed seed and saves it
either in the hub layout (``save_pretrained``: sharded safetensors plus
``model.safetensors.index.json``, expert tensors named
``model.layers.N.block_sparse_moe.experts.E.w1.weight``) or in the fused layout that newer
transformers holds in memory (``mlp.experts.gate_up_proj``), next to a sentencepiece tokenizer
trained on local text. transformers is the test oracle; the engine never imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.tokenizer_builder import write_tokenizer


@dataclass(frozen=True)
class TinyShape:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config_kwargs(self) -> dict[str, Any]:
        base = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        base.update(self.overrides)
        return base


# head_dim 32 differs from hidden/heads = 16; a 24-token window is shorter than the tests' sequences.
WINDOWED = TinyShape("windowed", {"head_dim": 32, "sliding_window": 24})
# more than 8 experts, top-3, tied embeddings, one KV head for four query heads.
WIDE = TinyShape(
    "wide",
    {"num_local_experts": 12, "num_experts_per_tok": 3, "num_key_value_heads": 1,
     "tie_word_embeddings": True, "intermediate_size": 80},
)
SHAPES = (WINDOWED, WIDE)


def build_reference(shape: TinyShape, seed: int = 0):
    """The transformers model for ``shape`` in fp32, eval mode, with weights drawn from ``seed``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**shape.config_kwargs()))
    with torch.no_grad():  # a wider init than HF's default: decisive routers and varied greedy text
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def write_tiny_mixtral(
    out_dir: Path, shape: TinyShape, *, seed: int = 0, layout: str = "hub", shard_size: str = "150KB"
) -> Path:
    """Save the reference model for ``shape`` to ``out_dir`` with a tokenizer; returns out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    model = build_reference(shape, seed)
    if layout == "hub":
        model.save_pretrained(out_dir, max_shard_size=shard_size)
    elif layout == "fused":
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(out_dir)
    else:
        raise ValueError(layout)
    write_tokenizer(out_dir, vocab_size=shape.config_kwargs()["vocab_size"])
    return out_dir


def rewrite_config(model_dir: Path, **changes: Any) -> None:
    """Edit config.json in place (for bad-input tests)."""
    path = Path(model_dir) / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
