"""ModelConfig: the shape of a Mixtral-family model, read from a Hugging Face ``config.json``.

What it is: a frozen record of the numbers the engine needs (sizes, heads, experts, RoPE,
sliding window), validated on load. What it is not: a place for runtime choices (device,
dtype, budgets), which belong to the engine and the plan.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from offload.errors import ConfigError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # one expert's FFN width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, when it says

    @property
    def kv_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def expert_parameters(self) -> int:
        """Parameters of one expert (w1, w3: [I, D]; w2: [D, I])."""
        return 3 * self.hidden_size * self.intermediate_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate an HF config dictionary; ``source`` names it in error messages."""
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        # An old config may carry only model_type; a present architectures list must name Mixtral.
        supported = (
            any(a in SUPPORTED_ARCHITECTURES for a in architectures)
            if architectures
            else model_type == "mixtral"
        )
        if not supported:
            named = ", ".join(map(str, architectures)) or f"model_type={model_type!r}"
            raise UnsupportedModelError(
                f"{source}: architecture {named} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def need_int(key: str, minimum: int = 1) -> int:
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
            return value

        def need_float(key: str, default: float | None = None) -> float:
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
            return float(value)

        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {hidden_act!r} is not supported (only silu)")

        heads = need_int("num_attention_heads")
        hidden = need_int("hidden_size")
        kv_heads = raw.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ConfigError(
                f"{source}: num_key_value_heads {kv_heads!r} must divide num_attention_heads {heads}"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads")
            head_dim = hidden // heads
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be an even integer, got {head_dim!r}")

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default)")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
            raise ConfigError(f"{source}: rope_theta must be a positive number, got {rope_theta!r}")

        experts = need_int("num_local_experts")
        top_k = need_int("num_experts_per_tok")
        if top_k > experts:
            raise ConfigError(
                f"{source}: num_experts_per_tok {top_k} exceeds num_local_experts {experts}"
            )
        window = raw.get("sliding_window")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ConfigError(f"{source}: sliding_window must be null or a positive integer, got {window!r}")

        return cls(
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            rms_norm_eps=need_float("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_position_embeddings=need_int("max_position_embeddings"),
            sliding_window=window,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``model_dir/config.json``."""
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise ConfigError(f"{model_dir}: no such file or directory")
        if not model_dir.is_dir():
            raise ConfigError(f"{model_dir}: not a directory (expected a model directory)")
        path = model_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is {model_dir} a model directory?)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))
