"""The MoE decoder, math only, for every family (``offload.families``).

What it is: RMSNorm, rotary embeddings, grouped-query attention over a preallocated KV cache
(16-bit, or int8 with a scale per head and position; a sliding window honoured, and kept as a
ring of slots when it is shorter than the context), the router (softmax in fp32, top-k,
renormalised where the family does) and the sparse MoE block, for one sequence (batch 1). What a
family adds is switched on by the traits its config carries: q/k RMSNorm per head (Qwen3) or
over the whole projection (OLMoE), projection biases (Qwen2), clip_qkv (OLMoE), a shared expert
with a sigmoid gate beside the routed ones (Qwen2), top-k weights in the model dtype. What it is
not: a loader or a cache. It never knows where a weight lives: dense weights are handed to it as
tensors, and expert weights come from an ``ExpertProvider`` that the engine supplies (all
resident, or the expert cache).

Two paths share these pieces: a forward of several tokens (a prompt: causal attention with no
mask tensor where SDPA's own causal flags express it, expert-major MoE grouping tokens by expert)
and a decode step of one token, written for few host operations: one fused q/k/v matmul when the
projections are plain, one rotary pass over queries and keys together, KV writes in place, no
mask (except where a sliding window wraps around its ring), no grouping, and exactly one
device-to-host read per layer (``offload.device.to_host``: the chosen experts, with the gate
look-ahead's picks when a prefetcher asks). Both compute the same math; their matmuls may
round differently (one token against many), as any two batch shapes do.

Shape legend: T = tokens in this call, S = key positions attended, D = hidden, H = query heads,
G = KV heads, Dh = head dim, E = experts, K = experts per token, I = expert FFN width, V = vocab,
C = KV cache slots per layer and head (the context, or a sliding window's ring).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from offload.config import ModelConfig
from offload.device import is_cuda, to_host
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
    """Every weight that is not a routed expert. All on the compute device (``device``: where
    the norms are), except perhaps ``embed_tokens``, which a card's plan keeps in host RAM
    (``offload.plan.embeddings_on_host``); ``embed`` looks tokens up wherever the table is."""

    embed_tokens: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    layers: list[LayerWeights]

    @property
    def device(self) -> torch.device:
        """The compute device."""
        return self.norm.device

    @property
    def token_device(self) -> torch.device:
        """Where token ids go in: the embedding table's device."""
        return self.embed_tokens.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] (on ``token_device``) -> hidden states [T, D] on the compute device. A table
        in host RAM: the rows gathered there, then one copy up, queued without a sync (from
        pageable memory the copy is staged before it returns, so nothing is overwritten later)."""
        h = F.embedding(tokens, self.embed_tokens)  # [T, D]
        return h if h.device == self.device else h.to(self.device, non_blocking=True)


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


KV_BITS = (16, 8)  # a KV cache's widths: the compute dtype, or int8 codes with per-row scales


def kv_capacity(config: ModelConfig, max_len: int, chunk: int | None = None) -> int:
    """Slots per layer and KV head of a ``KVCache`` for ``max_len`` positions: all of them, or, for
    a model with a sliding window W when W + ``chunk`` < max_len, a ring of W + ``chunk`` slots
    (a prefill chunk of up to ``chunk`` tokens reads the W - 1 keys before it and its own at
    once; the slots to spare let a held sequence step back by up to ``chunk`` positions and still
    be continued: prefix reuse). ``chunk`` None: every position."""
    window = config.sliding_window
    if window is None or chunk is None:
        return max_len
    return min(max_len, window + chunk)


def kv_cache_nbytes(config: ModelConfig, max_len: int, dtype: torch.dtype, bits: int = 16,
                    chunk: int | None = None) -> int:
    """The bytes a ``KVCache(config, max_len, ..., dtype, bits, chunk)`` allocates, without
    allocating it: keys and values of every layer and KV head in ``kv_capacity`` slots, each
    Dh values in ``dtype`` (16 bits) or Dh int8 codes and one scale in ``dtype`` (8 bits)."""
    if bits not in KV_BITS:
        raise ValueError(f"KV cache bits {bits!r}: expected one of {KV_BITS}")
    c = config
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = c.head_dim * itemsize if bits == 16 else c.head_dim + itemsize
    return 2 * c.num_hidden_layers * c.num_key_value_heads * kv_capacity(c, max_len, chunk) * per_row


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] -> (int8 codes [..., Dh], scales [..., 1] in ``dtype``): the scale is the
    row's absmax / 127 rounded to ``dtype`` (never below its smallest normal, so an all-zero row
    gives zero codes, not NaN), and the codes are x / that stored scale rounded to the nearest
    integer in fp32 and clamped to [-127, 127]: what ``codes * scale`` gives back is within half a
    step of x (the row's largest entries within half a step plus the scale's own rounding)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127).to(dtype).clamp_min(torch.finfo(dtype).tiny)  # [..., 1]
    codes = (xf / scale).round_().clamp_(-127, 127).to(torch.int8)  # [..., Dh]
    return codes, scale


class KVCache:
    """Keys and values of every layer, allocated once, written in place.

    Storage: ``kv`` [L, 2G, C, Dh], the G key heads then the G value heads of each layer, with
    position p in slot p % C. C (``capacity``) is ``kv_capacity``: ``max_len`` (slot = position),
    or a sliding window's ring. ``bits`` 16 keeps them in the compute dtype; 8 keeps int8 codes
    and one scale per (layer, head, position) in ``scale`` [L, 2G, C, 1] (``quantize_kv``),
    written with every cache write and multiplied back inside attention, so attention always
    reads keys and values as stored. The scale is in the compute dtype, not a fixed fp16: codes
    times scale is one multiplication in one dtype (bf16 * fp16 would promote to fp32, a cast and
    a copy twice the size), bf16 has fp32's range (no scale underflows), and since the codes are
    measured in the stored scale its rounding costs no accuracy. 2 bytes a row in bf16 or fp16,
    4 in fp32 runs.

    ``length`` is the positions filled; ``oldest`` the oldest position still held (0 unless a
    ring has wrapped: a write of positions up to e overwrites those before e - C). Prefill writes
    go through ``write`` / ``read`` (keys and values in position order), a decode step through
    ``decode_span``, ``write_step`` and ``read_step`` (in place, a few ops). What it is not: the
    attention itself, or the judge of which sequence it holds (the engine keeps that).
    """

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype,
                 bits: int = 16, chunk: int | None = None):
        if bits not in KV_BITS:
            raise ValueError(f"KV cache bits {bits!r}: expected one of {KV_BITS}")
        L, G, Dh = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.max_len = max_len
        self.capacity = C = kv_capacity(config, max_len, chunk)
        self.window = config.sliding_window
        self.bits, self.dtype, self.heads = bits, dtype, G
        store = dtype if bits == 16 else torch.int8
        self.kv = torch.zeros((L, 2 * G, C, Dh), device=device, dtype=store)  # [L, 2G, C, Dh]
        self.scale = None if bits == 16 else torch.ones((L, 2 * G, C, 1), device=device, dtype=dtype)  # [L, 2G, C, 1]
        self.length = 0  # positions filled, shared by all layers
        self.oldest = 0  # the oldest position whose keys and values are still in their slots
        # per layer, made once: views for the decode step's in-place writes and reads
        self.k_layers = [self.kv[layer, :G].unsqueeze(0) for layer in range(L)]  # [1, G, C, Dh]
        self.v_layers = [self.kv[layer, G:].unsqueeze(0) for layer in range(L)]  # [1, G, C, Dh]
        self.kv_layers = [self.kv[layer].unsqueeze(0) for layer in range(L)]  # [1, 2G, C, Dh]
        self.scale_layers = [] if self.scale is None else [self.scale[layer].unsqueeze(0) for layer in range(L)]
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)  # [1]: the decode step's slot
        # [1, C] slot numbers, for the mask of a window that wraps around the ring
        self._slots = torch.arange(C, device=device)[None] if C < max_len else None

    def reset(self) -> None:
        self.length = 0
        self.oldest = 0

    @property
    def nbytes(self) -> int:
        """Bytes held: keys and values, and the scales of an 8-bit cache."""
        scales = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.kv.numel() * self.kv.element_size() + scales

    @property
    def ring(self) -> bool:
        """Does it keep fewer slots than positions (a sliding window's ring)?"""
        return self.capacity < self.max_len

    def first_key(self, position: int) -> int:
        """The oldest key position a query at ``position`` attends to."""
        return 0 if self.window is None else max(0, position - self.window + 1)

    def can_continue(self, length: int) -> bool:
        """Can a sequence cut to its first ``length`` positions run on from here: are the keys and
        values its next position attends to still held? (Not when a ring has wrapped past them.)"""
        return length <= self.length and self.oldest <= self.first_key(length)

    def begin(self, start: int, tokens: int) -> None:
        """A pass of ``tokens`` at ``start`` is about to write: what it may overwrite is no longer
        held (said before the first layer writes, so a pass stopped halfway stays truthful)."""
        self.oldest = max(self.oldest, start + tokens - self.capacity)

    def _spans(self, first: int, n: int) -> list[tuple[int, int, int]]:
        """Positions first .. first+n-1 (n <= C) as runs of slots: (slot_lo, slot_hi, offset of
        the run's first position from ``first``); one run, or two where the ring wraps."""
        lo = first % self.capacity
        if lo + n <= self.capacity:
            return [(lo, lo + n, 0)]
        return [(lo, self.capacity, 0), (0, lo + n - self.capacity, self.capacity - lo)]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys k and values v [G, T, Dh] (compute dtype, rotated) of positions start ..
        start+T-1; a pass longer than the ring keeps its last C positions."""
        T = k.shape[1]
        if T > self.capacity:
            cut = T - self.capacity
            k, v, start, T = k[:, cut:], v[:, cut:], start + cut, self.capacity
        if self.scale is None:
            G = self.heads
            for lo, hi, off in self._spans(start, T):
                self.kv[layer, :G, lo:hi] = k[:, off : off + hi - lo]
                self.kv[layer, G:, lo:hi] = v[:, off : off + hi - lo]
            return
        codes, scale = quantize_kv(torch.cat((k, v)), self.dtype)  # [2G, T, Dh] int8, [2G, T, 1]
        for lo, hi, off in self._spans(start, T):
            self.kv[layer, :, lo:hi] = codes[:, off : off + hi - lo]
            self.scale[layer, :, lo:hi] = scale[:, off : off + hi - lo]

    def read(self, layer: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [G, S, Dh] of positions first .. end-1 (S = end - first <= C), in
        position order, in the compute dtype: a view of the slots where they are contiguous and
        16-bit; two runs of a wrapped ring are joined (a copy), 8-bit ones multiplied back."""
        runs = []
        for lo, hi, _ in self._spans(first, end - first):
            run = self.kv[layer, :, lo:hi]  # [2G, n, Dh]
            runs.append(run if self.scale is None else run * self.scale[layer, :, lo:hi])  # int8 * scale: the dtype
        kv = runs[0] if len(runs) == 1 else torch.cat(runs, 1)  # [2G, S, Dh]
        return kv[: self.heads], kv[self.heads :]

    def stored(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v [G, T, Dh] as ``read`` would give them back after ``write`` (8 bits: quantized
        and multiplied back), for a pass whose own keys do not all fit in the ring."""
        if self.scale is None:
            return k, v
        codes, scale = quantize_kv(torch.cat((k, v)), self.dtype)
        kv = codes * scale  # [2G, T, Dh] in the compute dtype
        return kv[: self.heads], kv[self.heads :]

    def decode_span(self, start: int) -> tuple[int, int, torch.Tensor | None]:
        """Before a decode step at position ``start``: point ``slot`` at its slot (one fill) and
        give the slots its query reads, [lo, hi), with a mask over them when the window wraps
        around the ring (then every slot is read and the mask [1, C] keeps the window's: three
        ops, once per step for every layer); the keys are then in ring order, not position
        order, which changes only the rounding of attention's sums."""
        C = self.capacity
        self.slot.fill_(start % C)
        first = self.first_key(start)
        lo, n = first % C, start + 1 - first
        if lo + n <= C:
            return lo, lo + n, None
        return 0, C, (self._slots >= lo) | (self._slots < (start + 1) % C)  # [1, C]

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one position's key and value [1, G, 1, Dh] at ``slot``, in place."""
        if self.scale is None:
            self.k_layers[layer].index_copy_(2, self.slot, k)
            self.v_layers[layer].index_copy_(2, self.slot, v)
            return
        codes, scale = quantize_kv(torch.cat((k, v), 1), self.dtype)  # [1, 2G, 1, Dh] int8, [1, 2G, 1, 1]
        self.kv_layers[layer].index_copy_(2, self.slot, codes)
        self.scale_layers[layer].index_copy_(2, self.slot, scale)

    def read_step(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, G, hi-lo, Dh] of slots lo .. hi-1 in the compute dtype: views when
        16-bit, the slice multiplied back when 8-bit (O(hi - lo) work, no copy of the rest)."""
        if self.scale is None:
            return self.k_layers[layer][:, :, lo:hi], self.v_layers[layer][:, :, lo:hi]
        kv = self.kv_layers[layer][:, :, lo:hi] * self.scale_layers[layer][:, :, lo:hi]  # [1, 2G, n, Dh], one pass
        return kv[:, : self.heads], kv[:, self.heads :]


def prefill_mask(start: int, tokens: int, first: int, window: int | None, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """How SDPA is told the causal (and window) mask of ``tokens`` queries at positions start ..
    end-1 over keys first .. end-1: (attn_mask, is_causal), made once per pass for every layer.

    - One query, or queries over exactly their own keys (a pass from position 0) with no window
      cutting in: no tensor (``is_causal`` for the second; SDPA's causal mask is aligned top-left,
      which is right only when queries and keys are the same positions).
    - On CUDA, a later chunk with no window cutting in (every key before it, a causal triangle
      of its own): ``torch.nn.attention.bias.causal_lower_right``, the bottom-right-aligned causal
      mask, which the flash and memory-efficient kernels apply with no [T, S] tensor.
    - Otherwise (a CPU, where SDPA would make that bias into a bool tensor in every layer and
      then into a float one; or a window that cuts in): an additive [T, S] mask in ``dtype``, 0
      where a key is seen and -inf where not, made once for every layer (a bool mask would be
      turned into this inside each SDPA call: two more [T, S] tensors per layer, and the time).
    """
    end = start + tokens
    S = end - first
    binds = window is not None and end - window > first  # some query's window starts after ``first``
    if tokens == 1:
        return None, False
    if not binds and S == tokens:
        return None, True
    if not binds and is_cuda(device):
        return causal_lower_right(tokens, S), False
    q_pos = torch.arange(start, end, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(first, end, device=device)[None, :]  # [1, S]
    hidden = k_pos > q_pos  # [T, S]
    if window is not None:
        hidden |= k_pos <= q_pos - window
    return torch.zeros((tokens, S), device=device, dtype=dtype).masked_fill_(hidden, float("-inf")), False


def attention(
    x: torch.Tensor,  # [T, D], already normalised
    weights: LayerWeights,
    config: ModelConfig,
    cache: KVCache,
    layer: int,
    start: int,
    rope: RotaryTable,
    mask: torch.Tensor | None = None,  # from ``prefill_mask``
    causal: bool = False,
) -> torch.Tensor:
    """A prompt pass's attention: q, k, v of T tokens at ``start``, rotated, written to the cache,
    then SDPA over keys ``cache.first_key(start)`` .. start+T-1 as the cache stores them."""
    T = x.shape[0]
    H, G, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v = project_qkv(x, weights, config)  # [T, H, Dh], [T, G, Dh], [T, G, Dh]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, Dh], [G, T, Dh], [G, T, Dh]
    q, k = rope.apply(q, start), rope.apply(k, start)
    end = start + T
    first = cache.first_key(start)
    if end - first <= cache.capacity:  # every key this pass reads fits in the slots at once
        cache.write(layer, start, k, v)
        keys, values = cache.read(layer, first, end)  # [G, S, Dh] each
    else:  # a pass longer than a window's ring (Engine.logits of a long sequence): earlier keys, then its own
        old_k, old_v = cache.read(layer, first, start)  # [G, start - first, Dh]
        cache.write(layer, start, k, v)
        new_k, new_v = cache.stored(k, v)  # [G, T, Dh]
        keys, values = torch.cat((old_k, new_k), 1), torch.cat((old_v, new_v), 1)  # [G, S, Dh]
    out = F.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask, is_causal=causal, enable_gqa=G != H
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
    cos: torch.Tensor,  # [Dh] at the step's position
    sin_signed: torch.Tensor,  # [Dh]
    lo: int,  # the slots the query reads, from ``cache.decode_span`` (which also set ``cache.slot``)
    hi: int,
    mask: torch.Tensor | None = None,  # [1, C] where a window wraps around the ring, else None
) -> torch.Tensor:
    """One token's attention: ``attention`` for T = 1 in fewer ops (q, k, v in one matmul when
    plain, rotated together, written to the cache in place, no mask unless a window's ring has
    wrapped)."""
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
    cache.write_step(layer, k, v.view(1, G, 1, Dh))
    keys, values = cache.read_step(layer, lo, hi)  # [1, G, hi-lo, Dh] each
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=G != H)  # [1, H, 1, Dh]
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
        # a device that is not the host, with experts that may run on the host: each decode layer's
        # normalised input goes to this pinned buffer, queued before the routing's read (no new sync)
        device = dense.device
        self._x_host = None
        if device.type != "cpu" and getattr(experts, "wants_host_input", False):
            self._x_host = torch.empty((1, config.hidden_size), dtype=dense.norm.dtype, pin_memory=True)

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
        h = self.dense.embed(tokens)  # [T, D] on the compute device
        if prefetcher is not None:
            prefetcher.begin_token()
        cache.begin(start, T)
        if decode:
            cos, sin = self.rope.cos[start], self.rope.sin_signed[start]  # [Dh] each, for every layer
            lo, hi, ring_mask = cache.decode_span(start)  # the slots read, for every layer
        else:
            mask, causal = prefill_mask(start, T, cache.first_key(start), c.sliding_window, h.device, h.dtype)
        for layer, lw in enumerate(self.dense.layers):
            x = rms_norm(h, lw.input_layernorm, c.rms_norm_eps)  # [T, D]
            if decode:
                h = h + attention_decode(x, lw, c, cache, layer, cos, sin, lo, hi, ring_mask)
            else:
                h = h + attention(x, lw, c, cache, layer, start, self.rope, mask, causal)
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
