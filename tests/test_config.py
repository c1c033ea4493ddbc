"""ModelConfig from config.json: the Mixtral fields, and clear refusals."""

from __future__ import annotations

import json

import pytest

from offload.config import ModelConfig
from offload.errors import ConfigError, UnsupportedModelError

# config.json of mistralai/Mixtral-8x7B-v0.1 as published (transformers 4.x era).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_reads_the_published_mixtral_config():
    c = ModelConfig.from_dict(MIXTRAL_8X7B)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.kv_groups) == (32, 8, 128, 4)
    assert (c.num_local_experts, c.num_experts_per_tok) == (8, 2)
    assert c.rope_theta == 1e6 and c.sliding_window is None and c.torch_dtype == "bfloat16"
    # 3 matrices of 14336 x 4096 per expert: 176M parameters (ARCHITECTURE.md)
    assert c.expert_parameters == 3 * 14336 * 4096 == 176_160_768


def test_reads_transformers5_rope_parameters_and_head_dim(tmp_path):
    raw = dict(MIXTRAL_8X7B, head_dim=64, sliding_window=4096)
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = ModelConfig.from_dir(tmp_path)
    assert (c.head_dim, c.rope_theta, c.sliding_window) == (64, 5e5, 4096)


def test_refuses_other_architectures_by_name():
    raw = dict(MIXTRAL_8X7B, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    "change, culprit",
    [
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type"),
    ],
)
def test_bad_fields_name_the_field(change, culprit):
    with pytest.raises(ConfigError, match=culprit):
        ModelConfig.from_dict(dict(MIXTRAL_8X7B, **change))


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        ModelConfig.from_dir(tmp_path / "absent")
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: unreadable"):
        ModelConfig.from_dir(tmp_path)
