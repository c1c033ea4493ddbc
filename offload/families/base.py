"""The ``Family`` record and the traits a family leaves on ``ModelConfig``.

What it is: plain data (names, keys, shape rules) and the one function a family supplies,
``read_traits``, which turns the family-specific part of a config.json into ``Traits``.
What it is not: math or I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    from offload.config import ModelConfig


@dataclass(frozen=True)
class Traits:
    """What a family's decoder does beyond Mixtral's; the defaults are Mixtral's."""

    qk_norm: str | None = None  # None, "head" (RMSNorm over each head's Dh: Qwen3) or
    #                             "projection" (over the whole q / k projection: OLMoE)
    qkv_bias: bool = False  # q, k and v projections carry a bias (Qwen2)
    o_bias: bool = False  # o_proj carries a bias (attention_bias in Qwen3 / OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to [-c, c] after projection (OLMoE)
    norm_topk_prob: bool = True  # top-k weights renormalised to sum to 1 (else the full softmax's)
    gate_in_model_dtype: bool = False  # top-k weights cast to the model dtype before scaling
    shared_expert_intermediate_size: int | None = None  # a shared expert's FFN width (Qwen2)
    dense_layers: tuple[int, ...] = ()  # decoder layers with a dense MLP instead of experts
    dense_intermediate_size: int | None = None  # their FFN width (Qwen's intermediate_size)


class LayerTensor(NamedTuple):
    """One per-layer dense tensor: checkpoint names to try ("{layer}" filled in) and its shape."""

    names: tuple[str, ...]
    shape_of: Callable[["ModelConfig"], tuple[int, ...]]


# need(key, value=None, minimum=1) -> int: the config reader's check of a size, handed to
# read_traits so every family's errors read alike.
IntCheck = Callable[..., int]


@dataclass(frozen=True)
class Family:
    name: str  # the HF model_type
    architectures: tuple[str, ...]
    experts_keys: tuple[str, ...]  # config keys for the routed experts per layer, first found wins
    expert_width_keys: tuple[str, ...]  # config keys for one routed expert's FFN width
    router_names: tuple[str, ...]
    expert_names: dict[str, str]  # w1 (gate), w3 (up), w2 (down) -> hub-layout name template
    read_traits: Callable[[dict[str, Any], str, IntCheck], Traits]
    # the family's attention tensors beyond the shared table (q/k norms, biases), by the traits
    # present: key -> LayerTensor, on every layer
    attention_tensors: Callable[["ModelConfig"], dict[str, LayerTensor]] = field(
        default=lambda config: {}
    )
    # a layer with experts: what the family has beside the router (Qwen2's shared expert)
    moe_tensors: Callable[["ModelConfig"], dict[str, LayerTensor]] = field(
        default=lambda config: {}
    )
    # a dense-MLP layer's FFN (Qwen's mlp_only_layers): key -> LayerTensor
    dense_mlp_tensors: Callable[["ModelConfig"], dict[str, LayerTensor]] = field(
        default=lambda config: {}
    )
    # the raw sliding_window the decoder honours (validated by the config reader); Qwen's applies
    # only with use_sliding_window
    read_window: Callable[[dict[str, Any], str], Any] = field(
        default=lambda raw, source: raw.get("sliding_window")
    )


def attention_extras(config: "ModelConfig") -> dict[str, LayerTensor]:
    """Norms and biases of attention as the traits say: the same tensor names in every family
    that has them (q_norm / k_norm, and q/k/v/o_proj.bias)."""
    c = config
    q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    prefix = "model.layers.{layer}.self_attn."
    extras: dict[str, LayerTensor] = {}
    if c.qk_norm == "head":
        extras["q_norm"] = LayerTensor((prefix + "q_norm.weight",), lambda c: (c.head_dim,))
        extras["k_norm"] = LayerTensor((prefix + "k_norm.weight",), lambda c: (c.head_dim,))
    elif c.qk_norm == "projection":
        extras["q_norm"] = LayerTensor((prefix + "q_norm.weight",), lambda c: (q_rows,))
        extras["k_norm"] = LayerTensor((prefix + "k_norm.weight",), lambda c: (kv_rows,))
    if c.qkv_bias:
        extras["q_bias"] = LayerTensor((prefix + "q_proj.bias",), lambda c: (q_rows,))
        extras["k_bias"] = LayerTensor((prefix + "k_proj.bias",), lambda c: (kv_rows,))
        extras["v_bias"] = LayerTensor((prefix + "v_proj.bias",), lambda c: (kv_rows,))
    if c.o_bias:
        extras["o_bias"] = LayerTensor((prefix + "o_proj.bias",), lambda c: (c.hidden_size,))
    return extras


def optional_bool(raw: dict[str, Any], key: str, default: bool, source: str) -> bool:
    from offload.errors import ConfigError, shown

    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {shown(value, 60)}")
    return value


def dense_layers(raw: dict[str, Any], source: str, need: IntCheck) -> dict[str, Any]:
    """Qwen's ``mlp_only_layers`` and ``decoder_sparse_step``: the layers whose MLP is dense (as
    transformers builds them: a layer is sparse unless listed or ``(layer + 1) % step``), and
    their width ``intermediate_size``, as ``Traits`` fields."""
    from offload.errors import ConfigError, shown

    layers = need("num_hidden_layers")
    step = raw.get("decoder_sparse_step", 1)
    step = 1 if step is None else need("decoder_sparse_step", step)
    only = raw.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < layers for v in only
    ):
        raise ConfigError(
            f"{source}: mlp_only_layers must be a list of layer numbers below {layers}, got {shown(only, 60)}"
        )
    dense = tuple(layer for layer in range(layers) if layer in only or (layer + 1) % step != 0)
    if len(dense) == layers:
        raise ConfigError(f"{source}: mlp_only_layers / decoder_sparse_step leave no layer with experts")
    return {"dense_layers": dense, "dense_intermediate_size": need("intermediate_size") if dense else None}


def qwen_window(raw: dict[str, Any], source: str, per_layer_from: str | None = None) -> Any:
    """Qwen's ``use_sliding_window``: ``sliding_window`` applies only when it is true (the
    published configs carry a window with it false). ``per_layer_from`` names the key (Qwen2's
    ``max_window_layers``) that makes the window apply to some layers only, which is refused."""
    from offload.errors import UnsupportedModelError

    if not optional_bool(raw, "use_sliding_window", False, source):
        return None
    if per_layer_from is not None:
        raise UnsupportedModelError(
            f"{source}: use_sliding_window true (a window on the layers from {per_layer_from} on) "
            "is not supported"
        )
    return raw.get("sliding_window")


def qwen_dense_mlp(config: "ModelConfig") -> dict[str, LayerTensor]:
    """A dense layer's SwiGLU MLP as Qwen names it: mlp.gate_proj / up_proj [Id, D], down_proj [D, Id]."""
    mlp = "model.layers.{layer}.mlp."
    return {
        "mlp_w1": LayerTensor((mlp + "gate_proj.weight",), lambda c: (c.dense_intermediate_size, c.hidden_size)),
        "mlp_w3": LayerTensor((mlp + "up_proj.weight",), lambda c: (c.dense_intermediate_size, c.hidden_size)),
        "mlp_w2": LayerTensor((mlp + "down_proj.weight",), lambda c: (c.hidden_size, c.dense_intermediate_size)),
    }
