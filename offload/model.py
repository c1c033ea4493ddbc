"""The MoE decoder, math only, for every family (``offload.families``).

What it is: RMSNorm, rotary embeddings, grouped-query attention over a preallocated KV cache
(sliding window honoured), the router (softmax in fp32, top-k, renormalised where the family
does) and the sparse MoE block, for one sequence (batch 1). What a family adds is switched on
by the traits its config carries: q/k RMSNorm per head (Qwen3) or over the whole projection
(OLMoE), projection biases (Qwen2), clip_qkv (OLMoE), a shared expert with a sigmoid gate
beside the routed ones (Qwen2), top-k weights in the model dtype. What it is not: a loader or a cache. It never knows where a
weight lives: dense weights are handed to it as tensors, and expert weights come from an
``ExpertProvider`` that the engine supplies (all resident, or the expert cache).

Two paths share these pieces: a forward of several tokens (a prompt: masked attention,
expert-major MoE grouping tokens by expert) and a decode step of one token, written for few
host operations: one fused q/k/v matmul when the projections are plain, one rotary pass over
queries and keys together, KV writes in place, no mask, no grouping, and exactly one
device-to-host read per layer (``offload.device.to_host``: the chosen experts, with the gate
look-ahead's picks when a prefetcher asks). Both compute the same math; their matmuls may
round differently (one token against many), as any two batch shapes do.

Shape legend: T = tokens in this call, S = key positions attended, D = hidden, H = query heads,
G = KV heads, Dh = head dim, E = experts, K = experts per token, I = expert FFN width, V = vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from offload.config import ModelConfig
from offload.device import to_host
from offload.quant import QuantizedMatrix, linear as quantized_linear


Matrix = Union[torch.Tensor, QuantizedMatrix]  # a plain weight, or one in a quantized format


class ExpertWeights(NamedTuple):
    """One expert's matrices: w1 (gate) [I, D], w3 (up) [I, D], w2 (down) [D, I], each a plain
    tensor in the compute dtype or a ``QuantizedMatrix``."""

    w1: Matrix
    w3: Matrix
    w2: Matrix


def matmul(x: torch.Tensor, w: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, In] @ w.T (+ bias [Out]) -> [N, Out], for a plain weight or a quantized one."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = quantized_linear(x, w)
    return y if bias is None else y + bias


class ExpertProvider(Protocol):
    """Where the MoE block gets expert weights from.

    ``get`` receives at most ``max_experts_per_call`` distinct experts of one layer (for a
    forward of ``tokens`` tokens) and returns their weights in the same order; they stay valid
    until the next call to ``get``.

    Optional: ``last_sides`` ("device" or "cpu" per expert of the last ``get``: "cpu" weights
    are on the host, to be computed there), ``add_cpu_seconds(layer, seconds)`` (told how long
    those took) and ``wants_host_input`` (True when a decode step should bring each layer's
    normalised input to the host with its routing, for experts computed there).
    """

    max_experts_per_call: int

    def get(self, layer: int, experts: Sequence[int], tokens: int = 1) -> Sequence[ExpertWeights]: ...


@dataclass
class LayerWeights:
    """One layer's dense weights; the attention projections may be quantized. The optional
    ones are a family's (None where its config has no such trait)."""

    input_layernorm: torch.Tensor  # [D]
    q_proj: Matrix  # [H*Dh, D]
    k_proj: Matrix  # [G*Dh, D]
    v_proj: Matrix  # [G*Dh, D]
    o_proj: Matrix  # [D, H*Dh]
    post_attention_layernorm: torch.Tensor  # [D]
    router: torch.Tensor | None = None  # [E, D]; None in a dense-MLP layer
    q_norm: torch.Tensor | None = None  # [Dh] (per head) or [H*Dh] (whole projection)
    k_norm: torch.Tensor | None = None  # [Dh] or [G*Dh]
    q_bias: torch.Tensor | None = None  # [H*Dh]
    k_bias: torch.Tensor | None = None  # [G*Dh]
    v_bias: torch.Tensor | None = None  # [G*Dh]
    o_bias: torch.Tensor | None = None  # [D]
    shared_w1: Matrix | None = None  # the shared expert: [Is, D]
    shared_w3: Matrix | None = None  # [Is, D]
    shared_w2: Matrix | None = None  # [D, Is]
    shared_gate: torch.Tensor | None = None  # [1, D]: sigmoid(x @ shared_gate.T) scales it
    mlp_w1: Matrix | None = None  # a dense-MLP layer's FFN (Qwen's mlp_only_layers): [Id, D]
    mlp_w3: Matrix | None = None  # [Id, D]
    mlp_w2: Matrix | None = None  # [D, Id]
    qkv: torch.Tensor | None = None  # [(H+2G)*Dh, D]: q, k, v stacked when all three are plain
    qkv_bias: torch.Tensor | None = None  # [(H+2G)*Dh]: their biases stacked, when they have them

    @property
    def shared(self) -> ExpertWeights | None:
        """The shared expert's weights, or None."""
        return None if self.shared_w1 is None else ExpertWeights(self.shared_w1, self.shared_w3, self.shared_w2)

    @property
    def mlp(self) -> ExpertWeights | None:
        """A dense-MLP layer's FFN weights, or None in a layer with experts."""
        return None if self.mlp_w1 is None else ExpertWeights(self.mlp_w1, self.mlp_w3, self.mlp_w2)


def fuse_qkv(weights: LayerWeights) -> None:
    """Stack plain q, k, v projections into one [(H+2G)*Dh, D] tensor (and their biases into
    one [(H+2G)*Dh]), so a decode step reads them with one matmul; q_proj, k_proj and v_proj
    become views of it (no second copy). Quantized projections are left as they are."""
    parts = (weights.q_proj, weights.k_proj, weights.v_proj)
    if weights.qkv is not None or not all(isinstance(p, torch.Tensor) for p in parts):
        return
    if len({(p.dtype, p.device) for p in parts}) != 1:
        return
    qkv = torch.cat(parts)  # [(H+2G)*Dh, D]
    q_rows, kv_rows = parts[0].shape[0], parts[1].shape[0]
    weights.q_proj, weights.k_proj, weights.v_proj = qkv.split((q_rows, kv_rows, kv_rows))
    weights.qkv = qkv
    if weights.q_bias is not None:
        bias = torch.cat((weights.q_bias, weights.k_bias, weights.v_bias))  # [(H+2G)*Dh]
        weights.q_bias, weights.k_bias, weights.v_bias = bias.split((q_rows, kv_rows, kv_rows))
        weights.qkv_bias = bias


@dataclass
class DenseWeights:
    embed_tokens: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    layers: list[LayerWeights]


# Called once per layer per forward with the chosen experts [T, K] and their weights [T, K].
RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class RoutingSource(Protocol):
    """Routing that replaces the routers' (a recorded trace replayed: ``offload.trace``).

    ``route(layer, start, tokens)`` gives, for the sequence positions ``start .. start+tokens-1``
    of ``layer``, the chosen experts [T, K] (int64) and their gate weights [T, K] (fp32), on the
    model's device; it raises ``OffloadError`` past what it holds."""

    def route(self, layer: int, start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 (x * rsqrt(mean(x^2) + eps), one fused op), scale in the input dtype,
    as the reference does."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RotaryTable:
    """cos/sin for every position up to ``max_positions``, computed once in fp32.

    The rotation is applied as ``x * cos + roll(x, Dh/2) * sin_signed``, where ``sin_signed``
    is sin with its first half negated: the same products and sums as the reference's
    ``x * cos + rotate_half(x) * sin`` (rotate_half = cat(-x2, x1)), so the same bits, in
    three elementwise ops and a roll."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype):
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [P, Dh/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, Dh]
        self.cos = angles.cos().to(device=device, dtype=dtype)
        sin = angles.sin()
        sin[:, : dim // 2] = -sin[:, : dim // 2]
        self.sin_signed = sin.to(device=device, dtype=dtype)  # [P, Dh], first half negated

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [..., T, Dh] whose first token is at position ``start``."""
        T = x.shape[-2]
        return rotate(x, self.cos[start : start + T], self.sin_signed[start : start + T])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., Dh] with cos / sin_signed broadcastable to it."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


class KVCache:
    """Keys and values of every layer, allocated once for ``max_len`` positions."""

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.num_hidden_layers, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, G, max_len, Dh]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled, shared by all layers
        # per layer, made once: [1, G, max_len, Dh] views for the decode step's in-place writes
        self.k_layers = [self.k[layer].unsqueeze(0) for layer in range(shape[0])]
        self.v_layers = [self.v[layer].unsqueeze(0) for layer in range(shape[0])]

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def attention(
    x: torch.Tensor,  # [T, D], already normalised
    weights: LayerWeights,
    config: ModelConfig,
    cache: KVCache,
    layer: int,
    start: int,
    rope: RotaryTable,
) -> torch.Tensor:
    T = x.shape[0]
    H, G, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v = project_qkv(x, weights, config)  # [T, H, Dh], [T, G, Dh], [T, G, Dh]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, Dh], [G, T, Dh], [G, T, Dh]
    q, k = rope.apply(q, start), rope.apply(k, start)
    end = start + T
    cache.k[layer, :, start:end] = k
    cache.v[layer, :, start:end] = v

    window = config.sliding_window
    first = 0 if window is None else max(0, start - window + 1)  # oldest key any query here sees
    keys = cache.k[layer, :, first:end]  # [G, S, Dh]
    values = cache.v[layer, :, first:end]  # [G, S, Dh]
    mask = None
    if T > 1:  # one query sees exactly [first, end); several need the causal (and window) mask
        q_pos = torch.arange(start, end, device=x.device)[:, None]  # [T, 1]
        k_pos = torch.arange(first, end, device=x.device)[None, :]  # [1, S]
        mask = k_pos <= q_pos  # [T, S]
        if window is not None:
            mask = mask & (k_pos > q_pos - window)
    out = F.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask, enable_gqa=G != H
    )[0]  # [H, T, Dh]
    out = out.transpose(0, 1).reshape(T, H * Dh)  # [T, H*Dh]
    return project_out(out, weights)  # [T, D]


def project_qkv(
    x: torch.Tensor, weights: LayerWeights, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H, Dh], k [T, G, Dh], v [T, G, Dh] of x [T, D] before RoPE: the projections, then
    what the family adds, in its order: biases, RMSNorm of q and k over the whole projection
    (OLMoE) or per head (Qwen3), clip_qkv (OLMoE, after the norm)."""
    T = x.shape[0]
    H, G, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = matmul(x, weights.q_proj, weights.q_bias)  # [T, H*Dh]
    k = matmul(x, weights.k_proj, weights.k_bias)  # [T, G*Dh]
    v = matmul(x, weights.v_proj, weights.v_bias)  # [T, G*Dh]
    return _qk_family(q, k, v, weights, config, T, H, G, Dh)


def _qk_family(q, k, v, weights: LayerWeights, config: ModelConfig, T: int, H: int, G: int, Dh: int):
    """The family's q/k norm and clip on projected q [T, H*Dh], k, v [T, G*Dh]; returns them
    as [T, H, Dh], [T, G, Dh], [T, G, Dh]."""
    eps = config.rms_norm_eps
    if config.qk_norm == "projection":
        q, k = rms_norm(q, weights.q_norm, eps), rms_norm(k, weights.k_norm, eps)
    q, k, v = q.view(T, H, Dh), k.view(T, G, Dh), v.view(T, G, Dh)
    if config.qk_norm == "head":
        q, k = rms_norm(q, weights.q_norm, eps), rms_norm(k, weights.k_norm, eps)
    if config.clip_qkv is not None:
        c = config.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    return q, k, v


def project_out(out: torch.Tensor, weights: LayerWeights) -> torch.Tensor:
    """The attention output [T, H*Dh] through o_proj (and its bias, where the family has one)."""
    return matmul(out, weights.o_proj, weights.o_bias)  # [T, D]


def attention_decode(
    x: torch.Tensor,  # [1, D], already normalised
    weights: LayerWeights,
    config: ModelConfig,
    cache: KVCache,
    layer: int,
    start: int,
    cos: torch.Tensor,  # [Dh] at position ``start``
    sin_signed: torch.Tensor,  # [Dh]
    position: torch.Tensor,  # [1] int64 on the device, holding ``start``
) -> torch.Tensor:
    """One token's attention: ``attention`` for T = 1 in fewer ops (q, k, v in one matmul when
    plain, rotated together, written to the cache in place, no mask)."""
    H, G, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if config.qk_norm is not None or config.clip_qkv is not None:
        if weights.qkv is not None:  # one matmul, then the family's norms on q and k apart
            q, k, v = F.linear(x, weights.qkv, weights.qkv_bias).split((H * Dh, G * Dh, G * Dh), dim=-1)
            q, k, v = _qk_family(q, k, v, weights, config, 1, H, G, Dh)  # [1, H, Dh], [1, G, Dh] x2
        else:
            q, k, v = project_qkv(x, weights, config)
        q = rotate(q.view(1, H, 1, Dh), cos, sin_signed)  # [1, H, 1, Dh]
        k = rotate(k.view(1, G, 1, Dh), cos, sin_signed)  # [1, G, 1, Dh]
    elif weights.qkv is not None:
        qk, v = F.linear(x, weights.qkv, weights.qkv_bias).split(((H + G) * Dh, G * Dh), dim=-1)  # [1, (H+G)*Dh], [1, G*Dh]
        qk = rotate(qk.view(1, H + G, 1, Dh), cos, sin_signed)  # [1, H+G, 1, Dh]
        q, k = qk.split((H, G), dim=1)  # [1, H, 1, Dh], [1, G, 1, Dh]
    else:
        q, k, v = project_qkv(x, weights, config)  # [1, H, Dh], [1, G, Dh], [1, G, Dh]
        q = rotate(q.view(1, H, 1, Dh), cos, sin_signed)  # [1, H, 1, Dh]
        k = rotate(k.view(1, G, 1, Dh), cos, sin_signed)  # [1, G, 1, Dh]
    keys, values = cache.k_layers[layer], cache.v_layers[layer]  # [1, G, max_len, Dh]
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v.view(1, G, 1, Dh))
    window = config.sliding_window
    first = 0 if window is None else max(0, start - window + 1)
    end = start + 1
    out = F.scaled_dot_product_attention(
        q, keys[:, :, first:end], values[:, :, first:end], enable_gqa=G != H
    )  # [1, H, 1, Dh]
    return project_out(out.view(1, H * Dh), weights)  # [1, D]


def route(
    x: torch.Tensor, router: torch.Tensor, top_k: int, normalise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights.

    x [T, D], router [E, D] -> (experts [T, K] int64, weights [T, K] fp32). With ``normalise``
    (Mixtral; Qwen3 with norm_topk_prob) the weights are the softmax over the top-k logits:
    the softmax over all experts renormalised over the top k, the same experts (softmax is
    monotonic) in fewer ops, in fp32 as the reference does. Without it (Qwen2, OLMoE) they are
    the full softmax's top-k probabilities.
    """
    logits = F.linear(x, router)  # [T, E]
    if normalise:
        top_logits, top_experts = torch.topk(logits, top_k, dim=-1)  # [T, K]
        return top_experts, torch.softmax(top_logits.float(), dim=-1)
    top_probs, top_experts = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)  # [T, K]
    return top_experts, top_probs


def shared_expert(x: torch.Tensor, weights: LayerWeights) -> torch.Tensor:
    """The shared expert of a Qwen2-MoE layer: sigmoid(x @ gate.T) * SwiGLU(x), x [T, D] -> [T, D]."""
    return torch.sigmoid(F.linear(x, weights.shared_gate)) * expert_ffn(x, weights.shared)


def expert_ffn(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """SwiGLU expert: x [N, D] -> [N, D]."""
    return matmul(F.silu(matmul(x, w.w1)) * matmul(x, w.w3), w.w2)


def moe(
    x: torch.Tensor,  # [T, D], already normalised
    experts: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K] fp32 (the model dtype where the family casts them)
    provider: ExpertProvider,
    layer: int,
) -> torch.Tensor:
    """Expert-major MoE: each needed expert runs once, on all of its tokens, in ascending id order.

    The routing is copied to the host once per layer (the expert provider must know which
    experts to bring in anyway); the grouping is computed there, so a GPU waits only once.
    """
    out = torch.zeros_like(x)  # [T, D]
    K = experts.shape[1]
    flat = experts.reshape(-1).cpu()  # [T*K], the one device -> host copy
    order = torch.argsort(flat, stable=True)  # [T*K] slots grouped by expert, tokens ascending
    needed, counts = torch.unique_consecutive(flat[order], return_counts=True)
    needed_ids = needed.tolist()
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    order_dev = order.to(x.device)
    token_of = order_dev // K  # [T*K] token of each sorted slot
    slot_weights = weights.reshape(-1)[order_dev]  # [T*K] fp32
    step = max(1, provider.max_experts_per_call)
    for first in range(0, len(needed_ids), step):
        batch = needed_ids[first : first + step]
        for i, w in enumerate(provider.get(layer, batch, tokens=x.shape[0])):
            lo, hi = bounds[first + i], bounds[first + i + 1]
            tokens = token_of[lo:hi]  # [N]
            y = expert_ffn(x[tokens], w)  # [N, D]
            y = y * slot_weights[lo:hi, None]  # fp32 weights promote, as the reference does
            out.index_add_(0, tokens, y.to(out.dtype))
    return out


def moe_decode(
    x: torch.Tensor,  # [1, D], already normalised
    ids: Sequence[int],  # the K chosen experts, in the router's order (host ints)
    weights: torch.Tensor,  # [1, K] fp32 (or the model dtype, as in moe)
    provider: ExpertProvider,
    layer: int,
    x_host: torch.Tensor | None = None,  # [1, D] x on the host, when the device is not (CUDA)
) -> torch.Tensor:
    """One token's MoE: the same numbers as ``moe`` with T = 1 (experts in ascending id, each
    output scaled in fp32, cast, summed in the input dtype), without the grouping.

    An expert the provider hands over on the host (``provider.last_sides`` says "cpu": a miss
    run on its RAM copy) is computed on the CPU from ``x_host`` after the device's experts are
    queued, so the two sides overlap; its output goes to the device and is scaled there, and
    the sum keeps ascending id order whichever side finished first. On a CPU device both sides
    are the same computation."""
    order = sorted(range(len(ids)), key=ids.__getitem__)  # positions of the experts, ascending id
    gates = weights.unbind(1)  # K x [1] fp32
    chosen = provider.get(layer, [ids[j] for j in order])
    sides = getattr(provider, "last_sides", ())
    on_cpu = [i for i, side in enumerate(sides) if side == "cpu"]
    if not on_cpu:
        out = None
        for j, w in zip(order, chosen):
            y = (expert_ffn(x, w) * gates[j]).to(x.dtype)  # [1, D]: fp32 weights promote, as in moe
            out = y if out is None else out + y
        return out
    outs: list[torch.Tensor | None] = [None] * len(order)
    for i, (j, w) in enumerate(zip(order, chosen)):  # the device's experts first: queued, they run meanwhile
        if i not in on_cpu:
            outs[i] = (expert_ffn(x, w) * gates[j]).to(x.dtype)
    here = x if x_host is None else x_host
    started = time.perf_counter()
    for i in on_cpu:
        y = expert_ffn(here, chosen[i])  # [1, D] on the CPU
        if y.device != x.device:
            y = y.to(x.device)
        outs[i] = (y * gates[order[i]]).to(x.dtype)
    report = getattr(provider, "add_cpu_seconds", None)
    if report is not None:
        report(layer, time.perf_counter() - started)
    out = outs[0]
    for y in outs[1:]:
        out = out + y
    return out


class MixtralModel:
    """Forward pass of the decoder over a KV cache; weights are given, never loaded here."""

    def __init__(
        self,
        config: ModelConfig,
        dense: DenseWeights,
        experts: ExpertProvider,
        cache: KVCache,
        rope: RotaryTable,
    ):
        self.config = config
        self.dense = dense
        self.experts = experts
        self.cache = cache
        self.rope = rope
        # decoder layer -> its expert layer (the index the providers, traces and prefetch use), or
        # None for a dense-MLP layer
        moe = {layer: i for i, layer in enumerate(config.moe_layers)}
        self._moe_index = [moe.get(layer) for layer in range(config.num_hidden_layers)]
        self.routing_observer: RoutingObserver | None = None
        self.routing_source: RoutingSource | None = None  # None: the routers choose
        # offload.experts.prefetch.Prefetcher: told each layer's routing before its experts run
        # (device_picks, routed; prompt_routed for a prompt) and after_moe once they are queued
        self.prefetcher = None
        self._position = torch.zeros(1, dtype=torch.int64, device=dense.embed_tokens.device)  # decode
        # a device that is not the host, with experts that may run on the host: each decode layer's
        # normalised input goes to this pinned buffer, queued before the routing's read (no new sync)
        device = dense.embed_tokens.device
        self._x_host = None
        if device.type != "cpu" and getattr(experts, "wants_host_input", False):
            self._x_host = torch.empty((1, config.hidden_size), dtype=dense.embed_tokens.dtype, pin_memory=True)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Run tokens [T] at the next cache positions; logits [T, V] (or [1, V] with last_only)."""
        c, cache = self.config, self.cache
        start = cache.length
        T = tokens.shape[0]
        if start + T > cache.max_len:
            raise ValueError(f"context of {cache.max_len} tokens exceeded ({start} + {T})")
        decode = T == 1
        prefetcher = self.prefetcher
        h = F.embedding(tokens, self.dense.embed_tokens)  # [T, D]
        if prefetcher is not None:
            prefetcher.begin_token()
        if decode:
            cos, sin = self.rope.cos[start], self.rope.sin_signed[start]  # [Dh] each, for every layer
            self._position.fill_(start)
        for layer, lw in enumerate(self.dense.layers):
            x = rms_norm(h, lw.input_layernorm, c.rms_norm_eps)  # [T, D]
            if decode:
                h = h + attention_decode(x, lw, c, cache, layer, start, cos, sin, self._position)
            else:
                h = h + attention(x, lw, c, cache, layer, start, self.rope)
            x = rms_norm(h, lw.post_attention_layernorm, c.rms_norm_eps)  # [T, D]
            moe_layer = self._moe_index[layer]
            if moe_layer is None:  # a dense-MLP layer (Qwen's mlp_only_layers): no routing, no experts
                h = h + expert_ffn(x, lw.mlp)
                continue
            if self.routing_source is None:
                chosen, gate = route(x, lw.router, c.num_experts_per_tok, c.norm_topk_prob)  # [T, K], [T, K]
            else:
                chosen, gate = self.routing_source.route(moe_layer, start, T)  # [T, K], [T, K]
            if self.routing_observer is not None:
                self.routing_observer(moe_layer, chosen, gate)
            if c.gate_in_model_dtype:
                gate = gate.to(x.dtype)  # the family scales by weights cast to the model dtype
            if decode:
                ahead = prefetcher.device_picks(moe_layer, h) if prefetcher is not None else None
                if self._x_host is not None:
                    self._x_host.copy_(x, non_blocking=True)  # done by the time the routing is read
                ids, picks = read_routing(chosen, ahead)  # the layer's one device -> host read
                if prefetcher is not None:
                    prefetcher.routed(moe_layer, ids, picks)
                routed = moe_decode(x, ids, gate, self.experts, moe_layer, self._x_host)
            else:
                if prefetcher is not None:
                    prefetcher.prompt_routed(moe_layer, chosen)
                routed = moe(x, chosen, gate, self.experts, moe_layer)
            h = h + (routed if lw.shared_w1 is None else routed + shared_expert(x, lw))
            if prefetcher is not None:
                prefetcher.after_moe(moe_layer)
        cache.length = start + T
        if last_only and not decode:
            h = h[-1:]
        h = rms_norm(h, self.dense.norm, c.rms_norm_eps)
        return F.linear(h, self.dense.lm_head)  # [T, V]


def read_routing(chosen: torch.Tensor, ahead: torch.Tensor | None) -> tuple[list[int], list[list[int]] | None]:
    """One token's chosen experts [1, K], with the look-ahead's picks [d, w] when given, read
    to the host in one copy: (the K ids, the d rows of picks or None)."""
    if ahead is None:
        return to_host(chosen)[0], None
    K, (d, w) = chosen.shape[1], ahead.shape
    row = to_host(torch.cat((chosen, ahead.view(1, d * w)), dim=1))[0]  # [K + d*w]
    return row[:K], [row[K + i * w : K + (i + 1) * w] for i in range(d)]
