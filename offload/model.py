"""The Mixtral decoder, math only.

What it is: RMSNorm, rotary embeddings, grouped-query attention over a preallocated KV cache
(sliding window honoured), the router (softmax in fp32, top-k, renormalised) and the sparse MoE
block, for one sequence (batch 1). What it is not: a loader or a cache. It never knows where a
weight lives: dense weights are handed to it as tensors, and expert weights come from an
``ExpertProvider`` that the engine supplies (all resident now, the expert cache later).

Shape legend: T = tokens in this call, S = key positions attended, D = hidden, H = query heads,
G = KV heads, Dh = head dim, E = experts, K = experts per token, I = expert FFN width, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from offload.config import ModelConfig
from offload.quant import QuantizedMatrix, linear as quantized_linear


Matrix = Union[torch.Tensor, QuantizedMatrix]  # a plain weight, or one in a quantized format


class ExpertWeights(NamedTuple):
    """One expert's matrices: w1 (gate) [I, D], w3 (up) [I, D], w2 (down) [D, I], each a plain
    tensor in the compute dtype or a ``QuantizedMatrix``."""

    w1: Matrix
    w3: Matrix
    w2: Matrix


def matmul(x: torch.Tensor, w: Matrix) -> torch.Tensor:
    """x [N, In] @ w.T -> [N, Out], for a plain weight or a quantized one."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else quantized_linear(x, w)


class ExpertProvider(Protocol):
    """Where the MoE block gets expert weights from.

    ``get`` receives at most ``max_experts_per_call`` distinct experts of one layer and returns
    their weights in the same order; they stay valid until the next call to ``get``.
    """

    max_experts_per_call: int

    def get(self, layer: int, experts: Sequence[int]) -> Sequence[ExpertWeights]: ...


@dataclass
class LayerWeights:
    """One layer's dense weights; the attention projections may be quantized."""

    input_layernorm: torch.Tensor  # [D]
    q_proj: Matrix  # [H*Dh, D]
    k_proj: Matrix  # [G*Dh, D]
    v_proj: Matrix  # [G*Dh, D]
    o_proj: Matrix  # [D, H*Dh]
    post_attention_layernorm: torch.Tensor  # [D]
    router: torch.Tensor  # [E, D]


@dataclass
class DenseWeights:
    embed_tokens: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    layers: list[LayerWeights]


# Called once per layer per forward with the chosen experts [T, K] and their weights [T, K].
RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, scale in the input dtype (as the reference does)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RotaryTable:
    """cos/sin for every position up to ``max_positions``, computed once in fp32."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype):
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [P, Dh/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, Dh]
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x [heads, T, Dh] whose first token is at position ``start``."""
        T = x.shape[1]
        cos = self.cos[start : start + T]  # [T, Dh]
        sin = self.sin[start : start + T]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, allocated once for ``max_len`` positions."""

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.num_hidden_layers, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, G, max_len, Dh]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled, shared by all layers

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
    q = matmul(x, weights.q_proj).view(T, H, Dh).transpose(0, 1)  # [H, T, Dh]
    k = matmul(x, weights.k_proj).view(T, G, Dh).transpose(0, 1)  # [G, T, Dh]
    v = matmul(x, weights.v_proj).view(T, G, Dh).transpose(0, 1)  # [G, T, Dh]
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
    return matmul(out, weights.o_proj)  # [T, D]


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their renormalised weights.

    x [T, D], router [E, D] -> (experts [T, K] int64, weights [T, K] fp32)
    """
    logits = F.linear(x, router)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top_weights, top_experts = torch.topk(probs, top_k, dim=-1)  # [T, K]
    top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return top_experts, top_weights


def expert_ffn(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """SwiGLU expert: x [N, D] -> [N, D]."""
    return matmul(F.silu(matmul(x, w.w1)) * matmul(x, w.w3), w.w2)


def moe(
    x: torch.Tensor,  # [T, D], already normalised
    experts: torch.Tensor,  # [T, K]
    weights: torch.Tensor,  # [T, K] fp32
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
        for i, w in enumerate(provider.get(layer, batch)):
            lo, hi = bounds[first + i], bounds[first + i + 1]
            tokens = token_of[lo:hi]  # [N]
            y = expert_ffn(x[tokens], w)  # [N, D]
            y = y * slot_weights[lo:hi, None]  # fp32 weights promote, as the reference does
            out.index_add_(0, tokens, y.to(out.dtype))
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
        self.routing_observer: RoutingObserver | None = None
        # before_moe(layer, hidden [T, D], chosen [T, K]) once a layer has routed, before its
        # experts run; after_moe(layer) once they are queued (offload.experts.prefetch)
        self.prefetcher = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Run tokens [T] at the next cache positions; logits [T, V] (or [1, V] with last_only)."""
        c, cache = self.config, self.cache
        start = cache.length
        T = tokens.shape[0]
        if start + T > cache.max_len:
            raise ValueError(f"context of {cache.max_len} tokens exceeded ({start} + {T})")
        h = F.embedding(tokens, self.dense.embed_tokens)  # [T, D]
        if self.prefetcher is not None:
            self.prefetcher.begin_token()
        for layer, lw in enumerate(self.dense.layers):
            h = h + attention(
                rms_norm(h, lw.input_layernorm, c.rms_norm_eps), lw, c, cache, layer, start, self.rope
            )
            x = rms_norm(h, lw.post_attention_layernorm, c.rms_norm_eps)  # [T, D]
            chosen, gate = route(x, lw.router, c.num_experts_per_tok)  # [T, K], [T, K]
            if self.routing_observer is not None:
                self.routing_observer(layer, chosen, gate)
            if self.prefetcher is not None:
                self.prefetcher.before_moe(layer, h, chosen)
            h = h + moe(x, chosen, gate, self.experts, layer)
            if self.prefetcher is not None:
                self.prefetcher.after_moe(layer)
        cache.length = start + T
        if last_only:
            h = h[-1:]
        h = rms_norm(h, self.dense.norm, c.rms_norm_eps)
        return F.linear(h, self.dense.lm_head)  # [T, V]
