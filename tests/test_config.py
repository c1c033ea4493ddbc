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


@pytest.mark.parametrize(
    "change, culprit",
    [
        ({"rope_theta": float("nan")}, "rope_theta must be a positive finite number, got nan"),
        ({"rope_theta": float("inf")}, "rope_theta must be a positive finite number, got inf"),
        ({"rope_theta": -1e6}, "rope_theta must be a positive finite number"),
        ({"rope_theta": 10**400}, "rope_theta must be a positive finite number"),
        ({"rope_theta": "1e6"}, "rope_theta must be a positive finite number, got '1e6'"),
        ({"rope_theta": True}, "rope_theta must be a positive finite number, got True"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, "rope_theta"),
        ({"rope_parameters": "default"}, "rope_parameters/rope_scaling must be an object"),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be in \(0, 1\), got nan"),
        ({"rms_norm_eps": float("-inf")}, "rms_norm_eps must be in"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be in"),
        ({"rms_norm_eps": 1.5}, "rms_norm_eps must be in"),
        ({"rms_norm_eps": None}, "rms_norm_eps must be in"),
        ({"vocab_size": True}, "vocab_size must be an integer from 1 to 2147483647, got True"),
        ({"vocab_size": 32000.0}, "vocab_size must be an integer"),
        ({"hidden_size": 0}, "hidden_size must be an integer"),
        ({"intermediate_size": -14336}, "intermediate_size must be an integer"),
        ({"num_hidden_layers": 2**40}, "num_hidden_layers must be an integer from 1 to 2147483647"),
        ({"max_position_embeddings": [32768]}, "max_position_embeddings must be an integer"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer"),
        ({"num_key_value_heads": True}, "num_key_value_heads must be an integer"),
        ({"num_local_experts": False}, "num_local_experts must be an integer"),
        ({"num_experts_per_tok": 2.0}, "num_experts_per_tok must be an integer"),
        ({"head_dim": 127}, "head_dim must be an even integer"),
        ({"head_dim": True}, "head_dim must be an even integer"),
        ({"head_dim": 2**31 - 2}, "head_dim 2147483646 x num_attention_heads 32 exceeds"),
        ({"sliding_window": True}, "sliding_window must be null or an integer"),
        ({"sliding_window": 4096.5}, "sliding_window must be null or an integer"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
        ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false"),
        ({"torch_dtype": 16}, "torch_dtype must be a dtype name"),
        ({"architectures": "MixtralForCausalLM"}, "architectures must be a list"),
        ({"hidden_act": ["silu"]}, "hidden_act"),
    ],
)
def test_values_out_of_range_or_of_the_wrong_type_name_the_field(change, culprit):
    with pytest.raises(ConfigError, match=rf"^built-in: {culprit}"):
        ModelConfig.from_dict(dict(MIXTRAL_8X7B, **change), source="built-in")


def test_deeply_nested_or_huge_config_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="config.json: unreadable: nested too deeply"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")  # past int's digit limit
    with pytest.raises(ConfigError, match="config.json: unreadable"):
        ModelConfig.from_dir(tmp_path)


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        ModelConfig.from_dir(tmp_path / "absent")
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: unreadable"):
        ModelConfig.from_dir(tmp_path)
