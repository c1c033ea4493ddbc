"""ModelConfig: the shape of an MoE model, read from a Hugging Face ``config.json``.

What it is: a frozen record of the numbers the engine needs (sizes, heads, experts, RoPE,
sliding window) in one spelling for every family, plus the family's traits
(``offload.families``: q/k norms, biases, a shared expert, top-k normalisation), validated on
load. ``intermediate_size`` is always one routed expert's FFN width and ``num_local_experts``
the routed experts per layer, whatever keys the family's config spells them with. What it is
not: a place for runtime choices (device, dtype, budgets), which belong to the engine and the
plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from offload.errors import ConfigError, UnsupportedModelError, shown
from offload.families import SUPPORTED_ARCHITECTURES, Family, Traits, family_for, family_named

SUPPORTED_ACTIVATIONS = ("silu",)
MAX_SIZE = 2**31 - 1  # the largest size (vocabulary, width, layers, experts, positions) accepted


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (a bool, a non-number, NaN, Inf, an int too big)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _shown(value: object, limit: int = 60) -> str:
    """``offload.errors.shown`` at this module's limit."""
    return shown(value, limit)


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
    family: str = "mixtral"  # the HF model_type of its family (offload.families)
    # the family's traits: every field of offload.families.base.Traits, by its name (the
    # defaults are Mixtral's)
    qk_norm: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    norm_topk_prob: bool = True
    gate_in_model_dtype: bool = False
    shared_expert_intermediate_size: int | None = None
    dense_layers: tuple[int, ...] = ()  # decoder layers with a dense MLP, no experts (Qwen)
    dense_intermediate_size: int | None = None  # their FFN width

    @property
    def kv_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def expert_parameters(self) -> int:
        """Parameters of one expert (w1, w3: [I, D]; w2: [D, I])."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def shared_expert_parameters(self) -> int:
        """Parameters of one layer's shared expert and its gate (0 when the family has none)."""
        width = self.shared_expert_intermediate_size
        return 0 if width is None else 3 * self.hidden_size * width + self.hidden_size

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The decoder layers with experts, ascending. Everything about experts (the cache, the
        pack's records, traces, plans) counts these only: expert layer i is decoder layer
        ``moe_layers[i]``."""
        return tuple(layer for layer in range(self.num_hidden_layers) if layer not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        """How many decoder layers have experts (all of them but Qwen's mlp_only_layers)."""
        return self.num_hidden_layers - len(self.dense_layers)

    @property
    def dense_mlp_parameters(self) -> int:
        """Parameters of one dense-MLP layer's FFN (0 when there is none)."""
        width = self.dense_intermediate_size
        return 0 if width is None else 3 * self.hidden_size * width

    @property
    def family_spec(self) -> Family:
        return family_named(self.family)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate an HF config dictionary; ``source`` names it in error messages.

        Every field the engine uses is checked for type and range: sizes are ints (not bools)
        from 1 to ``MAX_SIZE``; ``rms_norm_eps`` and ``rope_theta`` are finite numbers (eps in
        (0, 1), theta > 0); head_dim even; num_key_value_heads divides num_attention_heads;
        num_experts_per_tok <= num_local_experts; sliding_window null or a positive int;
        tie_word_embeddings a bool; torch_dtype a string or null. Anything else is a
        ``ConfigError`` naming ``source`` and the field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {_shown(raw)}")
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if not isinstance(architectures, list):
            raise ConfigError(f"{source}: architectures must be a list of names, got {_shown(architectures)}")
        # An old config may carry only model_type; a present architectures list must name a family.
        family = family_for(architectures, model_type)
        if family is None:
            named = ", ".join(_shown(a) for a in architectures) or f"model_type={_shown(model_type)}"
            raise UnsupportedModelError(
                f"{source}: architecture {named} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def need_int(key: str, value: Any = None, minimum: int = 1) -> int:
            value = raw.get(key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
                raise ConfigError(
                    f"{source}: {key} must be an integer from {minimum} to {MAX_SIZE}, got {_shown(value)}"
                )
            return value

        def need_float(key: str, value: Any, upper: float | None = None) -> float:
            number = _finite(value)
            if number is None or number <= 0 or (upper is not None and number >= upper):
                bound = f"in (0, {upper:g})" if upper is not None else "a positive finite number"
                raise ConfigError(f"{source}: {key} must be {bound}, got {_shown(value)}")
            return number

        hidden_act = raw.get("hidden_act", "silu")
        if not isinstance(hidden_act, str) or hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {_shown(hidden_act)} is not supported (only silu)")

        heads = need_int("num_attention_heads")
        hidden = need_int("hidden_size")
        kv_raw = raw.get("num_key_value_heads")
        kv_heads = heads if kv_raw is None else need_int("num_key_value_heads", kv_raw)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads}"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads")
            head_dim = hidden // heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be an even integer >= 2, got {_shown(head_dim)}")
        if heads * head_dim > MAX_SIZE:
            raise ConfigError(
                f"{source}: head_dim {head_dim} x num_attention_heads {heads} exceeds {MAX_SIZE}"
            )

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object, got {_shown(rope)}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {_shown(rope_type)} is not supported (only default)")
        rope_theta = need_float("rope_theta", rope.get("rope_theta", raw.get("rope_theta", 1e6)))

        experts_key = next((k for k in family.experts_keys if raw.get(k) is not None), family.experts_keys[0])
        width_key = next((k for k in family.expert_width_keys if raw.get(k) is not None), family.expert_width_keys[0])
        experts = need_int(experts_key)
        top_k = need_int("num_experts_per_tok")
        if top_k > experts:
            raise ConfigError(
                f"{source}: num_experts_per_tok {top_k} exceeds {experts_key} {experts}"
            )
        traits: Traits = family.read_traits(raw, source, need_int)
        window = family.read_window(raw, source)
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_SIZE:
                raise ConfigError(
                    f"{source}: sliding_window must be null or an integer from 1 to {MAX_SIZE}, got {_shown(window)}"
                )
        tied = raw.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {_shown(tied)}")
        torch_dtype = raw.get("torch_dtype") or raw.get("dtype")
        if torch_dtype is not None and not isinstance(torch_dtype, str):
            raise ConfigError(f"{source}: torch_dtype must be a dtype name, got {_shown(torch_dtype)}")

        return cls(
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int(width_key),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            rms_norm_eps=need_float("rms_norm_eps", raw.get("rms_norm_eps", 1e-5), upper=1.0),
            rope_theta=rope_theta,
            max_position_embeddings=need_int("max_position_embeddings"),
            sliding_window=window,
            tie_word_embeddings=tied,
            torch_dtype=torch_dtype,
            family=family.name,
            **{f.name: getattr(traits, f.name) for f in fields(traits)},  # the same names on both
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
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise ConfigError(f"{path}: unreadable: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: unreadable: nested too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))
