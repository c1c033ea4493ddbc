"""Memory plan: how many experts fit on the device and in RAM, from byte budgets.

What it is: arithmetic over a model's shapes (dense weights, KV cache, expert records) and the
user's budgets (``--vram``, ``--ram``, ``--experts-per-layer``), with a clear refusal when a
budget cannot hold the minimum (dense weights + KV cache + top-k experts per layer, and on CUDA
the runtime reserve); the KV cache (``kv_cache_bytes``: 16 bits in the compute dtype or 8 bits,
int8 with a scale per layer, head and position, ``--kv-bits``; a sliding window's ring of the
window and one prefill chunk, ``kv_positions``: what ``offload.model.KVCache`` allocates); the
runtime reserve itself (``runtime_reserve``: CUDA context, cuBLAS workspaces, activations,
logits and kernel temporaries, term by term; a prefill chunk's attention through SDPA's fused
kernel, no [H, T, S] score matrix, or its math path, ``attention_bytes``); the prefill chunk
(``MemoryPlan.prefill_chunk``: ``--batch-size``, else 256, halved down to 16 while the reserve
leaves no room for top-k experts per layer; ``minimum_vram``, the least a card may have); the RAM tier in pinned
blocks (``pinned_chunks``: torch's host allocator rounds each block up to a power of two);
per-layer slot counts (``MemoryPlan.layer_slots``: the slots left over after an even split go
to the layers that gain most on the shared Mixtral-8x7B traces, or spread evenly);
``fit_to_free``, the check against the device's real free memory at load; the parameters and
dense bytes by class (embeddings, lm_head, attention, norms, routers, shared experts, dense
MLPs), counted from the family's tensor table (``offload.checkpoint.layer_table``: q/k norms,
biases, Qwen2-MoE's shared expert and Qwen's dense-MLP layers included; ``parameter_count``:
total and active); and
``plan_model``, the whole plan that ``offload info`` prints, for a checkpoint's config or a
built-in published shape (``BUILTIN_MODELS``: Mixtral-8x7B and -8x22B, Qwen3-30B-A3B and
-235B-A22B, OLMoE-1B-7B, Qwen1.5-MoE-A2.7B), so a plan needs no download.

What it is not: the engine (which allocates what the plan says), the machine probe and profiles
(profile.py), nor a timing model (estimate.py).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch

from offload import quant
from offload.config import ModelConfig
from offload.errors import BudgetError, ConfigError, SettingError
from offload.experts.record import RecordLayout

_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def _unit(unit: str) -> int | None:
    """Bytes in one ``unit``: B; K, Ki, KiB (2^10); KB (10^3); likewise M, G, T (any case)."""
    u = unit.lower()
    if u == "b":
        return 1
    if u[:1] in _BINARY:
        if u[1:] in ("", "i", "ib"):
            return _BINARY[u[0]]
        if u[1:] == "b":
            return _DECIMAL[u[0]]
    return None


def parse_bytes(text: str | int, setting: str = "budget") -> int:
    """A size as people write it, in bytes: ``24G``, ``24Gi`` and ``24GiB`` are 24 x 2^30;
    ``24GB`` is 24 x 10^9 (decimal, as on a box; plans report every figure in GiB); likewise
    K, M, T, any case, a fraction allowed (``1.5GiB``), ``512B`` in bytes. A bare number is
    refused (``12``: 12 bytes or 12 GiB?) with a one-line SettingError naming ``setting`` and
    suggesting ``12GiB``, except 0, which means none (``--ram 0``: every miss reads the pack).
    An int is taken as bytes."""
    if isinstance(text, bool):
        raise SettingError(f"{setting} {text!r}: expected a size like 12GiB")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if not match:
            raise SettingError(f"{setting} {text!r}: expected a size like 6GiB, 512MiB, 16GB or 0")
        number, unit = match.group(1), match.group(2)
        if not unit:
            if float(number) == 0:
                return 0
            raise SettingError(
                f"{setting} {text.strip()}: a size needs a unit: {number}GiB (2^30 bytes), {number}GB "
                f"(10^9 bytes) or {number}B (bytes)"
            )
        size = _unit(unit)
        if size is None:
            raise SettingError(
                f"{setting} {text!r}: expected a size like 6GiB, 512MiB, 16GB or 0 (unknown unit {unit!r})"
            )
        try:
            value = int(float(number) * size)
        except (OverflowError, ValueError):
            shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:37] + "..."
            raise SettingError(f"{setting} {shown!r}: too large a size") from None
    if value < 0:
        raise SettingError(f"{setting} must not be negative, got {text!r}")
    return value


def is_decimal_size(text: str | int) -> bool:
    """Does ``text`` use a decimal unit (KB, MB, GB, TB: powers of 10)? For a note that the
    plan reports it in GiB."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    return bool(match) and len(match.group(2)) == 2 and match.group(2)[1] in "bB" and _unit(match.group(2)) is not None


def article(words: str) -> str:
    """ "An" before a number said with a vowel sound (8, 11, 18, 80-89, 800..., 8.5, 11,000,
    18 GiB), else "A": for sentences that start with a size ("An 8 GiB card")."""
    whole = words.strip().split(" ")[0].split(".")[0].replace(",", "")
    if whole.startswith("8"):
        return "An"
    if whole[:2] in ("11", "18") and (len(whole) - 2) % 3 == 0:  # eleven, eighteen (thousand, million)
        return "An"
    return "A"


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Dense weights by class, as ``offload info`` shows them. "shared_experts" is Qwen2-MoE's shared
# expert and its gate, "dense_mlps" the FFN of Qwen's dense-MLP layers (mlp_only_layers): dense
# FFNs every token runs, always resident (0 where a model has none).
DENSE_CLASSES = ("embeddings", "lm_head", "attention", "norms", "routers", "shared_experts", "dense_mlps")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the matrices --attn-bits quantizes


def _layer_class(key: str) -> str:
    """The ``DENSE_CLASSES`` entry of a per-layer tensor of ``offload.checkpoint.layer_table``."""
    if key in ATTENTION_PROJECTIONS or key.endswith("_bias"):
        return "attention"
    if key.endswith("norm"):  # input_layernorm, post_attention_layernorm, q_norm, k_norm
        return "norms"
    if key == "router":
        return "routers"
    if key.startswith("shared_"):
        return "shared_experts"
    if key.startswith("mlp_"):
        return "dense_mlps"
    raise ValueError(f"layer tensor {key!r}: no dense class for it (offload.plan._layer_class)")


def layer_parameters_by_class(config: ModelConfig, layer: int | None = None) -> dict[str, int]:
    """Parameters of decoder layer ``layer``'s dense tensors by class (``DENSE_CLASSES``;
    embeddings and lm_head 0), from the family's tensor table (``offload.checkpoint.layer_table``).
    ``layer`` None: the first layer with experts."""
    from offload.checkpoint import layer_table

    layer = config.moe_layers[0] if layer is None else layer
    by = dict.fromkeys(DENSE_CLASSES, 0)
    for key, (_, shape_of) in layer_table(config, layer).items():
        by[_layer_class(key)] += math.prod(shape_of(config))
    return by


def dense_parameters_by_class(config: ModelConfig) -> dict[str, int]:
    """Parameters of every weight that is not a routed expert, by class (``DENSE_CLASSES``):
    attention counts the q, k, v, o projections and any biases; norms the two per layer, the
    final one and any q/k norms; routers one per layer with experts; shared_experts a shared
    expert's three matrices and its gate; dense_mlps the FFN of each dense-MLP layer. lm_head is
    0 when tied to the embeddings."""
    c = config
    per_moe = layer_parameters_by_class(c)
    per_dense = layer_parameters_by_class(c, c.dense_layers[0]) if c.dense_layers else per_moe
    by = {name: c.num_moe_layers * n + len(c.dense_layers) * per_dense[name] for name, n in per_moe.items()}
    by["embeddings"] = c.vocab_size * c.hidden_size
    by["lm_head"] = 0 if c.tie_word_embeddings else by["embeddings"]
    by["norms"] += c.hidden_size  # the final norm
    return by


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters: ``dense`` (everything but the routed experts, shared experts and
    dense-MLP layers included) and ``expert`` (one routed expert); ``total`` counts every routed
    expert, ``active`` the top-k of each layer with experts (what one token runs, embeddings and
    lm_head included, as model cards count it)."""

    dense: int
    expert: int
    experts_per_layer: int
    top_k: int
    num_layers: int  # layers with experts

    @property
    def total(self) -> int:
        return self.dense + self.num_layers * self.experts_per_layer * self.expert

    @property
    def active(self) -> int:
        return self.dense + self.num_layers * self.top_k * self.expert


def parameter_count(config: ModelConfig) -> ParameterCount:
    """Total and active parameters of ``config`` (``ParameterCount``)."""
    c = config
    return ParameterCount(
        sum(dense_parameters_by_class(c).values()), c.expert_parameters, c.num_local_experts,
        c.num_experts_per_tok, c.num_moe_layers,
    )


def dense_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Every weight that is not a routed expert, in ``dtype``: embeddings, lm_head, norms,
    attention (with any biases), routers, and a shared expert or dense-MLP layers where the
    model has them."""
    return sum(dense_parameters_by_class(config).values()) * _itemsize(dtype)


def embeddings_on_host(config: ModelConfig, device_type: str | torch.device) -> bool:
    """Does the input embedding table stay in host RAM? On CUDA, when lm_head is a matrix of its
    own (untied): a token's embedding is one row the CPU gathers and copies up (8 KiB a token for
    Mixtral, queued without a sync), so the table (Mixtral's 250 MiB, two and a half 4-bit
    experts) takes no card memory. Tied, the table is lm_head, which runs on the card. On a CPU
    everything is host RAM anyway (False: nothing moves)."""
    return _device_type(device_type) == "cuda" and not config.tie_word_embeddings


def device_dense_bytes(config: ModelConfig, by_class: dict[str, int], device_type: str | torch.device) -> int:
    """The dense bytes (``dense_bytes_by_class``) the device holds: all of them, less the input
    embeddings where they stay in host RAM (``embeddings_on_host``)."""
    host = by_class["embeddings"] if embeddings_on_host(config, device_type) else 0
    return sum(by_class.values()) - host


# ---- the KV cache ------------------------------------------------------------------------------

# The engine prefills a prompt in chunks of at most this many tokens: the activations of a chunk
# are part of the runtime reserve below, so a longer chunk costs device memory, a shorter one
# costs a sweep of expert loads per chunk (every expert of a layer is wanted by 256 tokens).
PREFILL_CHUNK_TOKENS = 256
# The chunks a plan tries, largest first, when the reserve of PREFILL_CHUNK_TOKENS does not leave
# room for top-k experts per layer (``plan_memory``): each halving halves the chunk's activations
# and doubles the prompt's sweeps of expert loads.
PREFILL_CHUNK_CHOICES = (256, 128, 64, 32, 16)

# KV cache widths (``--kv-bits``): 16 keeps keys and values in the compute dtype; 8 stores them as
# int8 codes with one scale per layer, KV head and position, for keys and values each, the scale
# in the compute dtype (``offload.model.KVCache(bits=8)``: 2 bytes in bf16, 4 in fp32).
KV_BITS = (16, 8)


def check_kv_bits(bits: int, setting: str = "--kv-bits") -> int:
    """``bits`` when it is a KV cache width (``KV_BITS``); a one-line SettingError naming ``setting``."""
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise SettingError(f"{setting} {bits!r}: choose one of {', '.join(map(str, KV_BITS))}")
    return int(bits)


def kv_positions(config: ModelConfig, context: int, chunk: int = PREFILL_CHUNK_TOKENS) -> int:
    """Positions the KV cache holds for ``context``: all of them, or for a model with a sliding
    window shorter than that, a ring of the window plus one prefill chunk (a chunk's first query
    still sees ``window - 1`` keys before it while the chunk's own are written; the rest lets a
    held prefix step back a little): min(context, window + chunk)."""
    window = config.sliding_window
    return context if window is None else min(context, window + chunk)


def kv_bytes_per_position(config: ModelConfig, dtype: torch.dtype, kv_bits: int = 16) -> int:
    """KV cache bytes of one position over every layer: keys and values of each KV head, Dh
    values in the compute dtype (16 bits), or Dh int8 codes and one scale in the compute dtype
    (8 bits)."""
    c = config
    size = _itemsize(dtype)
    per_head = c.head_dim * size if check_kv_bits(kv_bits, "KV cache bits") == 16 else c.head_dim + size
    return 2 * c.num_hidden_layers * c.num_key_value_heads * per_head


def kv_cache_bytes(
    config: ModelConfig, context: int, dtype: torch.dtype, kv_bits: int = 16, chunk: int = PREFILL_CHUNK_TOKENS
) -> int:
    """The KV cache for ``context`` positions: ``kv_positions`` (a sliding window's ring) x
    ``kv_bytes_per_position`` (``kv_bits`` 16: the compute dtype; 8: int8 and the scales), what
    ``offload.model.KVCache(config, context, device, dtype, kv_bits, chunk)`` allocates."""
    return kv_positions(config, context, chunk) * kv_bytes_per_position(config, dtype, kv_bits)


# ---- what the device needs besides weights, KV cache and expert slots ------------------------

MiB = 2**20

# The CUDA context of a PyTorch process once cuBLAS and bitsandbytes kernels are loaded. A bare
# context with lazy module loading (CUDA >= 11.7, PyTorch's default) is ~300 MiB on consumer
# cards; loading cuBLAS's and bitsandbytes' kernels adds to it. A stated round figure, not a
# measurement on every card: ``fit_to_free`` measures the real free memory at load.
CUDA_CONTEXT_BYTES = 512 * MiB
# cuBLAS and cuBLASLt workspaces of the compute stream: PyTorch's default cuBLAS workspace is
# 32 MiB on Hopper (":4096:8") and ~8 MiB on earlier GPUs (":4096:2:16:8"); counted at Hopper's,
# for both libraries.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
# The caching allocator rounds blocks and leaves fragments between prefill chunks.
ALLOCATOR_MARGIN_BYTES = 64 * MiB
# Sampling one position: fp32 logits, probabilities, sorted probabilities and their cumulative
# sum (top-p), 4 bytes per vocabulary entry each, and int64 sort indices.
SAMPLING_BYTES_PER_VOCAB = 4 * 4 + 8
DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class ReserveTerm:
    """One thing the device must hold besides weights, KV cache and slots: bytes and why."""

    name: str
    nbytes: int
    reason: str
    at_init: bool = False  # taken when CUDA starts: already missing from mem_get_info's free at load


@dataclass(frozen=True)
class RuntimeReserve:
    """Device memory kept free for the runtime (``runtime_reserve``); no terms on a CPU."""

    device_type: str = "cpu"
    prefill_tokens: int = 0
    terms: tuple[ReserveTerm, ...] = ()
    sdpa: str = "fused"  # the kernel a prefill chunk's attention takes (SDPA_PATHS): its term's size

    @property
    def total(self) -> int:
        """Every term: what a ``--vram`` budget (the card's size) must leave for the runtime."""
        return sum(t.nbytes for t in self.terms)

    @property
    def working(self) -> int:
        """The terms not yet allocated when the engine measures free memory after loading dense
        weights and the KV cache: everything but the CUDA context."""
        return sum(t.nbytes for t in self.terms if not t.at_init)

    def describe(self) -> str:
        if not self.terms:
            return f"no runtime reserve on {self.device_type} (slots are RAM)"
        parts = " + ".join(f"{t.name} {format_bytes(t.nbytes)}" for t in self.terms)
        return f"runtime reserve {format_bytes(self.total)}: {parts}"

    def to_dict(self) -> dict:
        return {
            "device_type": self.device_type,
            "prefill_tokens": self.prefill_tokens,
            "sdpa": self.sdpa,
            "total": self.total,
            "working": self.working,
            "terms": [asdict(t) for t in self.terms],
        }


def _device_type(device_type: str | torch.device) -> str:
    kind = device_type.type if isinstance(device_type, torch.device) else str(device_type).split(":")[0]
    if kind not in DEVICE_TYPES:
        raise SettingError(f"device type {device_type!r}: expected one of {', '.join(DEVICE_TYPES)}")
    return kind


def _dequantized_bytes(shapes, fmt: quant.WeightFormat, dtype: torch.dtype) -> int:
    """The largest temporary a matmul on ``fmt`` makes in ``dtype`` on CUDA: nothing for plain
    weights already in the compute dtype; for the portable 4-bit formats one slice of rows
    (``quant.dequantized_slice_bytes``: a prompt chunk's matmul dequantizes at most
    ``quant.DEQUANTIZE_SLICE_BYTES`` at a time; one row runs bitsandbytes' fused kernel); one
    whole [out, in] matrix otherwise (int8 casts the matrix on every call; a plain matrix in
    another dtype is cast); the CPU-layout 4-bit formats unpack the codes first, a second one."""
    if fmt.kind == "plain" and fmt.dtype == dtype:
        return 0
    if fmt.kind == "4bit":
        return max(quant.dequantized_slice_bytes(shape, fmt, dtype) for shape in shapes)
    largest = max(out * inp for out, inp in shapes) * _itemsize(dtype)
    return 2 * largest if fmt.kind == "4bit-cpu" else largest


# How a prefill chunk's attention runs on CUDA (``runtime_reserve``'s ``sdpa``): "fused", torch's
# flash kernel (Ampere and later: it takes grouped KV heads and the bottom-right causal mask with
# no [T, S] tensor); "math", SDPA's math path (fp32 scores), which a card without flash takes
# for grouped KV heads (the memory-efficient kernel does not take them).
SDPA_PATHS = ("fused", "math")


def attention_bytes(
    config: ModelConfig,
    dtype: torch.dtype,
    tokens: int,
    keys: int,
    *,
    kv_bits: int = 16,
    sdpa: str = "fused",
    masked: bool = False,
    ring: bool = False,
) -> dict[str, int]:
    """The temporaries of one layer's attention over a prefill chunk of ``tokens`` (T) queries
    against ``keys`` (S) key positions, as ``offload.model.attention`` makes them, by part (bytes;
    0 where a part does not arise; their sum bounds the peak, as not all live at once):

    - ``projections``: q, k, v, the rotated q and k and the output, T x (3 H + 4 G) x Dh in the
      compute dtype; with q/k norms, rms_norm's fp32 q and k;
    - ``kv writes`` (``kv_bits`` 8): the chunk's keys and values quantized (``quantize_kv``):
      joined in the compute dtype, an fp32 copy and its absolute values, the fp32 quotient and
      the int8 codes, 2 G x T x Dh x (s + 9);
    - ``kv reads``: the S keys and values as the kernel takes them (``KVCache.read``): at 8 bits
      the codes times the scales, one [2G, S, Dh] tensor in the compute dtype (CUDA's elementwise
      kernels cast an int8 input as they read it; a CPU would make the cast a temporary first,
      but a CPU has no reserve); at 16 bits a view. A sliding window's ``ring`` that wraps reads
      two runs and joins them: one [2G, S, Dh] more;
    - ``mask``: the [T, S] bool mask of a chunk a sliding window cuts into (``masked``); a chunk
      over every key before it takes ``causal_lower_right`` (no tensor on the fused path);
    - ``kernel``: the fused path (``sdpa`` "fused", and no mask tensor, or one head per KV head
      for the memory-efficient kernel, which then takes the mask as a T x S bias in the compute
      dtype): the [H, T, Dh] output and fp32 log-sum-exp [H, T]; the math path ("math", or a
      mask with grouped KV heads: flash takes no mask tensor): two fp32 [H, T, S] score
      tensors (scores, softmax), k and v expanded to every query head, fp32 copies of q, k, v
      in a 16-bit dtype, and the mask as a bool and an fp32 [T, S].

    At T 256, S 32768 and Mixtral's 32 heads the math path's scores are 2 GiB, the fused
    kernel's output and log-sum-exp 2 MiB."""
    if sdpa not in SDPA_PATHS:
        raise SettingError(f"attention kernel {sdpa!r}: expected one of {', '.join(SDPA_PATHS)}")
    c = config
    s = _itemsize(dtype)
    T, S = tokens, keys
    H, G, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    eight = check_kv_bits(kv_bits, "KV cache bits") == 8
    parts = {
        "projections": T * (3 * H * Dh + 4 * G * Dh) * s + (T * (H + G) * Dh * 4 if c.qk_norm is not None else 0),
        "kv writes": 2 * G * T * Dh * (s + 9) if eight else 0,
        "kv reads": (int(eight) + int(ring)) * 2 * G * S * Dh * s,
        "mask": T * S if masked and T > 1 else 0,
    }
    math_path = sdpa == "math" or (masked and G != H)
    if not math_path:
        parts["kernel"] = H * T * Dh * s + H * T * 4 + (T * S * s if masked else 0)
    else:
        expanded = 2 * H * S * Dh * s if G != H else 0
        upcast = 4 * (H * T * Dh + 2 * H * S * Dh) if s < 4 else 0
        mask = T * S * (1 + 4) if T > 1 and not masked else (T * S * 4 if T > 1 else 0)
        parts["kernel"] = 2 * H * T * S * 4 + expanded + upcast + mask
    return parts


def runtime_reserve(
    config: ModelConfig,
    dtype: torch.dtype,
    expert_format: quant.WeightFormat | str,
    attn_format: quant.WeightFormat | str,
    device_type: str | torch.device,
    *,
    context: int,
    prefill_tokens: int = PREFILL_CHUNK_TOKENS,
    quantize_experts: bool = False,
    kv_bits: int = 16,
    sdpa: str = "fused",
) -> RuntimeReserve:
    """Device bytes the runtime needs beyond dense weights, KV cache and expert slots, term by
    term with its reason (``RuntimeReserve.terms``). On "cpu" there are none (the slots are RAM,
    and so is everything else). On "cuda":

    - the CUDA context (``CUDA_CONTEXT_BYTES``, taken at start: ``at_init``);
    - cuBLAS workspaces (``CUBLAS_WORKSPACE_BYTES``);
    - the largest dequantized weight: a quantized matrix (expert or attention) becomes a whole
      matrix in the compute dtype inside a matmul (Mixtral's 14336 x 4096 in bf16: 112 MiB);
    - attention over one prefill chunk of T = ``prefill_tokens`` tokens against S keys (the
      context, or the sliding window and the chunk): ``attention_bytes``, through SDPA's fused
      kernel (``sdpa`` "fused": no score matrix) or its math path ("math", and wherever a window
      cuts into a chunk of a model with grouped KV heads: two fp32 [H, T, S] score tensors);
      with an 8-bit KV cache (``kv_bits``) the chunk's keys and values quantized and the S keys
      and values made back into the compute dtype;
    - the experts' activations for T tokens (an expert can be asked for by every token): the
      gathered input, w1 and w3 outputs and their product [T, I], and the fp32 weighted output
      (I the widest of a routed expert, a shared expert and a dense-MLP layer's FFN);
    - hidden states for T tokens: residual, normed input, attention and MoE outputs, the MoE
      accumulator, and rms_norm's fp32 temporaries;
    - logits and sampling: generation asks for the last position only, [1, V] in fp32 with the
      sampler's copies (``SAMPLING_BYTES_PER_VOCAB``); ``Engine.logits`` (evaluation, every
      position) needs more and is not planned for;
    - an allocator margin (``ALLOCATOR_MARGIN_BYTES``);
    - with ``quantize_experts`` (the cache reads a checkpoint and quantizes each record on the
      device), one matrix being quantized: its bf16 copy, an fp32 temporary and the codes.

    The engine must prefill in chunks of at most ``prefill_tokens`` for this to hold."""
    kind = _device_type(device_type)
    if kind != "cuda":
        return RuntimeReserve(kind, 0, ())
    if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) or prefill_tokens < 1:
        raise SettingError(f"prefill chunk {prefill_tokens!r} tokens: must be at least 1 (--batch-size)")
    c = config
    s = _itemsize(dtype)
    T = min(prefill_tokens, context)
    window = c.sliding_window
    S = context if window is None else min(context, window + T - 1)
    masked = window is not None and context > window  # some chunk's window starts after its first key
    ring = kv_positions(c, context, prefill_tokens) < context
    D, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    expert_fmt, attn_fmt = quant.get_format(expert_format), quant.get_format(attn_format)
    expert_shapes = ((I, D), (D, I))
    attn_shapes = tuple(attention_shapes(c).values())
    dequantized = max(
        _dequantized_bytes(expert_shapes, expert_fmt, dtype), _dequantized_bytes(attn_shapes, attn_fmt, dtype)
    )
    attention = attention_bytes(c, dtype, T, S, kv_bits=kv_bits, sdpa=sdpa, masked=masked, ring=ring)
    # the widest FFN a token goes through: a routed expert, a shared expert (Qwen2-MoE), a dense MLP
    W = max(I, c.shared_expert_intermediate_size or 0, c.dense_intermediate_size or 0)
    experts = T * (3 * W * s + D * s + D * 4)
    hidden = T * D * (5 * s + 2 * 4)
    sampling = V * (s + SAMPLING_BYTES_PER_VOCAB)
    math_path = sdpa == "math" or (masked and c.num_key_value_heads != c.num_attention_heads)
    kernel = ("SDPA's math path: fp32 scores and softmax, head-expanded fp32 q/k/v" if math_path
              else "fused SDPA, no score matrix")
    kv = ", keys and values made back from int8" if kv_bits == 8 else ""
    terms = (
        ReserveTerm("CUDA context", CUDA_CONTEXT_BYTES,
                    "the process's CUDA context with cuBLAS and bitsandbytes kernels loaded", at_init=True),
        ReserveTerm("cuBLAS workspaces", CUBLAS_WORKSPACE_BYTES,
                    "cuBLAS and cuBLASLt workspaces, Hopper's default size"),
        ReserveTerm("dequantized weight", dequantized,
                    f"one whole matrix in {str(dtype).removeprefix('torch.')} inside a matmul on "
                    f"{expert_fmt.name} experts / {attn_fmt.name} attention"),
        ReserveTerm("attention", sum(attention.values()),
                    f"prefill chunk of {T} tokens against {S} keys: {kernel}; projections{kv}"),
        ReserveTerm("expert activations", experts,
                    f"{T} tokens through one {'expert' if W == I else 'dense FFN'}: [T, {W}] x 3, fp32 output"),
        ReserveTerm("hidden states", hidden, f"{T} tokens: residual, norms, attention and MoE outputs"),
        ReserveTerm("logits", sampling, "the last position's fp32 logits and the sampler's copies"),
        ReserveTerm("allocator margin", ALLOCATOR_MARGIN_BYTES, "caching allocator rounding and fragments"),
    )
    if quantize_experts and expert_fmt.kind != "plain":
        terms += (ReserveTerm("quantizing a record", I * D * (s + 4 + 1),
                              "an expert matrix read from the checkpoint, quantized on the device: "
                              "its copy, an fp32 temporary, the codes"),)
    return RuntimeReserve(kind, T, terms, "math" if math_path else "fused")


# ---- the RAM tier in pinned blocks --------------------------------------------------------------


def pinned_block_bytes(nbytes: int) -> int:
    """What torch's caching host allocator takes for one pinned block of ``nbytes``: the size
    rounded up to a power of two (a 23.6 GiB ``pin_memory`` tensor takes 32 GiB)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


@dataclass(frozen=True)
class PinnedChunks:
    """The RAM tier as pinned blocks: ``rows[i]`` records in block i, each block one pinned
    tensor of ``rows[i] * row_bytes`` bytes, allocated in this order (record r lives in the
    block whose cumulative row range holds r)."""

    rows: tuple[int, ...]
    row_bytes: int

    @property
    def records(self) -> int:
        return sum(self.rows)

    @property
    def raw_bytes(self) -> int:
        return self.records * self.row_bytes

    @property
    def pinned_bytes(self) -> int:
        """The host allocator's bytes for all blocks (each rounded up to a power of two)."""
        return sum(pinned_block_bytes(r * self.row_bytes) for r in self.rows)


@functools.lru_cache(maxsize=64)
def _pinned_table(rows: int, row_bytes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(cost, choice) for every n <= rows: the fewest pinned bytes that hold at least n records
    in blocks of power-of-two size, and the capacity (records) of the first block to take.

    A block of 2^p bytes holds floor(2^p / row_bytes) records; taking the largest such block
    that fits the remaining count halves the count each time, so at most floor(log2 n) + 1
    blocks each waste under ``row_bytes``; the table (a covering DP over those block sizes)
    never does worse than that."""
    options = []  # (capacity, block bytes), largest first
    p = max(0, (row_bytes - 1).bit_length())
    top = max(p, (rows * row_bytes - 1).bit_length())
    for q in range(top, p - 1, -1):
        capacity = (1 << q) // row_bytes
        if capacity >= 1:
            options.append((capacity, 1 << q))
    cost = [0] * (rows + 1)
    choice = [0] * (rows + 1)
    for n in range(1, rows + 1):
        best = None
        for capacity, block in options:  # largest first: ties go to fewer, larger blocks
            value = block + cost[max(0, n - capacity)]
            if best is None or value < best:
                best, choice[n] = value, capacity
        cost[n] = best
    return tuple(cost), tuple(choice)


def pinned_chunks(rows: int, row_bytes: int) -> PinnedChunks:
    """Split ``rows`` records of ``row_bytes`` into pinned blocks whose power-of-two rounding
    wastes little: ``PinnedChunks.rows`` (records per block) and ``.pinned_bytes``.

    The bound, for any counts: pinned bytes < (rows + floor(log2 rows) + 1) * row_bytes. In
    practice: within 5% of rows * row_bytes whenever rows >= 128 (tested over record sizes from
    64 KiB to 1 GiB), and for the RAM tier holding every expert of the demo model, Mixtral-8x7B
    and Mixtral-8x22B in each format (Mixtral-8x7B nf4, 256 x 99,090,624 B: 12 blocks of 2 GiB,
    24 GiB for 23.63 GiB, 1.6% over; one block would take 32 GiB)."""
    if rows < 0 or row_bytes < 1:
        raise SettingError(f"pinned RAM tier: {rows} records of {row_bytes} bytes")
    _, choice = _pinned_table(rows, row_bytes)
    out = []
    n = rows
    while n > 0:
        take = min(choice[n], n)
        out.append(take)
        n -= take
    return PinnedChunks(tuple(out), row_bytes)


def _host_tier(total: int, expert_bytes: int, limit: int | None, pinned: bool) -> tuple[int, tuple[int, ...]]:
    """(records in RAM, pinned blocks) for a RAM budget of ``limit`` bytes (None: every record);
    pinned, the count is the largest whose blocks fit the budget (so the last block is full)."""
    host = total if limit is None else max(0, min(total, limit // expert_bytes))
    if not pinned:
        return host, ()
    if limit is not None:
        cost, _ = _pinned_table(host, expert_bytes)
        while host > 0 and cost[host] > limit:
            host -= 1
    return host, pinned_chunks(host, expert_bytes).rows


# ---- uneven slots: the spare slots to the layers that gain most -------------------------------


MIXTRAL_8X7B_SHAPE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


def is_mixtral_8x7b_shape(config: ModelConfig) -> bool:
    """Whether ``config`` has Mixtral-8x7B's layers, widths, heads and routing (the shape of
    the shared router traces, ``MIXTRAL_8X7B_SHAPE``); the vocabulary and context may differ."""
    ref = BUILTIN_MODELS["mixtral-8x7b"][1]
    return all(getattr(config, f) == ref[f] for f in MIXTRAL_8X7B_SHAPE)


@functools.cache
def trace_hit_rates() -> dict[int, tuple[float, ...]] | None:
    """Per-layer LRU hit rates, demand loading, on the shared Mixtral-8x7B decode traces
    (``offload.trace.MIXTRAL_DECODE``, replayed by ``offload.trace.simulate``) for every slot
    count from top-k to all experts: {slots: (hit rate of layer 0, ...)}. None when the traces
    are not there (an installed package without the shared folder)."""
    from offload.errors import OffloadError
    from offload.trace import MIXTRAL_DECODE, load_trace, simulate

    if not MIXTRAL_DECODE.is_file():
        return None
    try:
        trace = load_trace(MIXTRAL_DECODE)
        counts = range(trace.top_k, trace.num_experts + 1)
        return {k: tuple(simulate(trace, k, "lru").layer_hit_rates()) for k in counts}
    except OffloadError:
        return None


SPREADS = ("auto", "even", "trace")


def spread_slots(
    total: int, num_layers: int, num_experts: int, top_k: int, gains: Sequence[float] | None = None
) -> tuple[int, ...]:
    """``total`` device slots over ``num_layers`` layers: every layer gets total // L, and the
    remaining total % L slots go one each to the layers with the largest ``gains`` (the hit
    rate one more slot adds to that layer; ties to the lower layer), or, with no gains, to
    layers spread evenly (the middle of each of total % L equal runs of layers)."""
    L, E, K = num_layers, num_experts, top_k
    if not L * K <= total <= L * E:
        raise BudgetError(f"{total} expert slots over {L} layers: must be in [{L * K}, {L * E}] (top-k to all)")
    base, extra = divmod(total, L)
    if extra == 0:
        return (base,) * L
    if gains is not None:
        if len(gains) != L:
            raise ValueError(f"expected {L} per-layer gains, got {len(gains)}")
        chosen = set(sorted(range(L), key=lambda layer: (-gains[layer], layer))[:extra])
    else:
        chosen = {(2 * j + 1) * L // (2 * extra) for j in range(extra)}
    return tuple(base + (layer in chosen) for layer in range(L))


def _layer_slots(total: int, num_layers: int, num_experts: int, top_k: int, trace: bool) -> tuple[tuple[int, ...], str]:
    """(slots per layer, the rule used: "trace" or "even") for ``total`` slots; ``trace``: give
    the leftover slots by the gains on the shared Mixtral-8x7B traces when they are there."""
    gains = None
    base = total // num_layers
    if trace and total % num_layers:
        rates = trace_hit_rates()
        if rates is not None and base in rates and base + 1 in rates and len(rates[base]) == num_layers:
            gains = [after - before for before, after in zip(rates[base], rates[base + 1])]
    used = "trace" if gains is not None else "even"
    return spread_slots(total, num_layers, num_experts, top_k, gains), used


# ---- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Where experts live: device slots per layer, records in RAM, the rest on disk.

    The first seven fields are the plan as it always was; ``slots_per_layer`` is the smallest
    per-layer count, so code that sizes every layer alike stays within the plan. The engine
    sizes layer l's slots by ``layer_slots[l]``, the RAM tier by ``host_experts`` in the pinned
    blocks ``host_chunks`` (CUDA; () means one unpinned buffer), and on CUDA checks the plan
    against the real free memory with ``fit_to_free``."""

    dense_bytes: int
    kv_cache_bytes: int
    expert_bytes: int  # one expert record
    experts_total: int
    slots_per_layer: int  # device slots of the layer with the fewest
    host_experts: int  # records held in RAM
    num_layers: int  # layers with experts (``ModelConfig.num_moe_layers``)
    layer_slots: tuple[int, ...] = ()  # device slots of each layer (() at construction: all slots_per_layer)
    top_k: int = 1  # experts per token: the fewest slots a layer may have
    reserve: RuntimeReserve = RuntimeReserve()  # device bytes kept for the runtime (CUDA)
    host_chunks: tuple[int, ...] = ()  # records per pinned block of the RAM tier; (): not pinned
    host_limit: int | None = None  # the RAM budget the tier was sized for (None: every record)
    spread: str = "even"  # how slots above slots_per_layer were placed: "even" or "trace"
    kv_bits: int = 16  # the KV cache's width: 16 (the compute dtype) or 8 (int8 with scales)
    prefill_chunk: int = PREFILL_CHUNK_TOKENS  # prompt tokens per forward pass, the reserve's T

    def __post_init__(self) -> None:
        if not self.layer_slots:
            object.__setattr__(self, "layer_slots", (self.slots_per_layer,) * self.num_layers)
        object.__setattr__(self, "layer_slots", tuple(int(s) for s in self.layer_slots))
        if len(self.layer_slots) != self.num_layers or min(self.layer_slots) != self.slots_per_layer:
            raise ValueError(
                f"layer_slots {self.layer_slots}: expected {self.num_layers} counts, "
                f"the smallest {self.slots_per_layer}"
            )
        if self.host_chunks and sum(self.host_chunks) != self.host_experts:
            raise ValueError(f"host_chunks {self.host_chunks} do not add up to {self.host_experts} records")

    @property
    def experts_per_layer(self) -> int:
        """Experts each layer has (E)."""
        return self.experts_total // self.num_layers

    @property
    def device_slots(self) -> int:
        return sum(self.layer_slots)

    @property
    def max_slots_per_layer(self) -> int:
        return max(self.layer_slots)

    @property
    def device_expert_bytes(self) -> int:
        return self.device_slots * self.expert_bytes

    @property
    def reserve_bytes(self) -> int:
        return self.reserve.total

    @property
    def device_bytes(self) -> int:
        """Dense weights + KV cache + expert slots + the runtime reserve."""
        return self.dense_bytes + self.kv_cache_bytes + self.device_expert_bytes + self.reserve.total

    @property
    def host_pinned(self) -> bool:
        return bool(self.host_chunks)

    @property
    def host_raw_bytes(self) -> int:
        return self.host_experts * self.expert_bytes

    @property
    def host_bytes(self) -> int:
        """RAM the tier takes: pinned blocks as the host allocator rounds them, else the records."""
        if self.host_chunks:
            return PinnedChunks(self.host_chunks, self.expert_bytes).pinned_bytes
        return self.host_raw_bytes

    @property
    def disk_tier(self) -> bool:
        """Whether some misses will read the source on disk."""
        return self.device_slots < self.experts_total and self.host_experts < self.experts_total

    def slots_text(self, sep: str = "/") -> str:
        """Slots per layer of E: "3/8", or "2-3/8" when layers differ (``sep`` " of " for prose)."""
        low, high = self.slots_per_layer, self.max_slots_per_layer
        return f"{low}{sep}{self.experts_per_layer}" if low == high else f"{low}-{high}{sep}{self.experts_per_layer}"

    def slots_phrase(self, where: str = "on the device", sep: str = "/") -> str:
        """"3/8 experts per layer on the device", or "2-3/8 experts per layer on the device (2.72
        on average)" when layers differ."""
        average = "" if self.max_slots_per_layer == self.slots_per_layer else (
            f" ({self.device_slots / self.num_layers:.2f} on average)")
        return f"{self.slots_text(sep)} experts per layer {where}{average}"

    def to_dict(self) -> dict:
        return dict(
            asdict(self),
            layer_slots=list(self.layer_slots),
            host_chunks=list(self.host_chunks),
            reserve=self.reserve.to_dict(),
            device_slots=self.device_slots,
            device_expert_bytes=self.device_expert_bytes,
            reserve_bytes=self.reserve_bytes,
            device_bytes=self.device_bytes,
            host_raw_bytes=self.host_raw_bytes,
            host_bytes=self.host_bytes,
            host_pinned=self.host_pinned,
            disk_tier=self.disk_tier,
        )

    def describe(self) -> str:
        pinned = " pinned" if self.host_pinned else ""
        return (
            f"{self.slots_phrase()}, {format_bytes(self.device_expert_bytes)}; "
            f"{self.host_experts}/{self.experts_total} in RAM ({format_bytes(self.host_bytes)}{pinned})"
            f"{', rest read from disk' if self.disk_tier else ''}"
        )


def plan_memory(
    config: ModelConfig,
    expert_bytes: int,
    dtype: torch.dtype,
    context: int,
    *,
    vram: int | None = None,
    ram: int | None = None,
    experts_per_layer: int | None = None,
    ram_available: int | None = None,
    dense: int | None = None,
    device_type: str | torch.device = "cpu",
    expert_format: quant.WeightFormat | str | None = None,
    attn_format: quant.WeightFormat | str | None = None,
    prefill_tokens: int | None = None,
    spread: str = "auto",
    quantize_experts: bool = False,
    kv_bits: int = 16,
    sdpa: str = "fused",
) -> MemoryPlan:
    """Slots per layer from ``experts_per_layer`` or the ``vram`` budget; RAM records from ``ram``.

    With neither device setting, every expert gets a slot. With no ``ram``, RAM holds every
    expert, or as many as fit in ``ram_available`` bytes when that is given. ``dense`` (the
    dense bytes the device holds) replaces ``device_dense_bytes`` of the weights in ``dtype``
    (every dense weight, less a card's embeddings in RAM) when they are not all in ``dtype``
    (quantized attention: ``dense_bytes_by_class``). The KV cache is ``kv_cache_bytes`` at ``kv_bits``.

    ``device_type`` "cuda" counts ``runtime_reserve`` inside the device budget (the minimum and
    ``vram`` both include it; ``expert_format`` / ``attn_format`` name the formats, or, left
    None, are taken as quantized when ``expert_bytes`` / ``dense`` are below their plain size;
    ``sdpa`` the attention kernel, ``SDPA_PATHS``) and sizes the RAM tier in pinned blocks
    (``pinned_chunks``), counting the bytes the host allocator takes. "cpu" (the default, as
    before) has no reserve and no pinning.

    The prefill chunk (``MemoryPlan.prefill_chunk``, the reserve's T): ``prefill_tokens`` when
    given (``--batch-size``), exactly; None: ``PREFILL_CHUNK_TOKENS``, or on a card whose
    ``vram`` cannot hold the minimum with its reserve, the largest of ``PREFILL_CHUNK_CHOICES``
    that can (a smaller chunk, smaller activations, more sweeps of expert loads per prompt).

    ``experts_per_layer`` gives every layer the same count. A ``vram`` budget buys as many
    slots as fit: every layer gets the same share, and the slots left over go one each to some
    layers (``spread``: "auto" = "trace" for a Mixtral-8x7B-shaped model while the shared
    traces are there, the layers whose LRU hit rate gains most from one more slot; "even"
    otherwise, layers spread evenly; "trace" asks for the traces whatever the shape, when the
    layer count matches). Deterministic either way."""
    c = config
    L, E, K = c.num_moe_layers, c.num_local_experts, c.num_experts_per_tok  # L: the layers with experts
    kind = _device_type(device_type)
    plain_dense = device_dense_bytes(c, dense_bytes_by_class(c, dtype), kind)  # what the device holds, unquantized
    dense = plain_dense if dense is None else dense
    if kind == "cuda":
        plain = str(dtype).removeprefix("torch.")  # quant.get_format reads dtype names
        if expert_format is None:
            plain_expert = 3 * c.hidden_size * c.intermediate_size * _itemsize(dtype)
            expert_format = quant.FOUR_BIT if expert_bytes < plain_expert else plain
        if attn_format is None:
            attn_format = quant.FOUR_BIT if dense < plain_dense else plain
    if prefill_tokens is not None:
        chunks: tuple[int, ...] = (prefill_tokens,)
    elif kind == "cuda" and vram is not None and experts_per_layer is None:
        chunks = PREFILL_CHUNK_CHOICES
    else:
        chunks = (PREFILL_CHUNK_TOKENS,)
    for chunk in chunks:
        kv = kv_cache_bytes(c, context, dtype, kv_bits, chunk)
        if kind == "cuda":
            reserve = runtime_reserve(
                c, dtype, expert_format, attn_format, kind, context=context, prefill_tokens=chunk,
                quantize_experts=quantize_experts, kv_bits=kv_bits, sdpa=sdpa,
            )
        else:
            check_kv_bits(kv_bits)
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise SettingError(f"prefill chunk {chunk!r} tokens: must be at least 1 (--batch-size)")
            reserve = RuntimeReserve(kind, 0, ())
        fixed = dense + kv + reserve.total
        minimum = fixed + L * K * expert_bytes
        if vram is None or experts_per_layer is not None or vram >= minimum:
            break
    if spread not in SPREADS:
        raise SettingError(f"slot spread {spread!r}: expected one of {', '.join(SPREADS)}")
    used = "even"
    if experts_per_layer is not None:
        if not K <= experts_per_layer <= E:
            raise BudgetError(f"--experts-per-layer {experts_per_layer}: must be in [{K}, {E}] (top-k to all experts)")
        layer_slots = (experts_per_layer,) * L
    elif vram is not None:
        if vram < minimum:
            extra = f" + runtime reserve {format_bytes(reserve.total)}" if reserve.total else ""
            if reserve.total and chunk != PREFILL_CHUNK_TOKENS:
                extra += f" (prefill chunks of {chunk} tokens)"
            width = "" if kv_bits == 16 else f", {kv_bits}-bit"
            raise BudgetError(
                f"--vram {format_bytes(vram)} is below the minimum {format_bytes(minimum)}: dense weights "
                f"{format_bytes(dense)} + KV cache {format_bytes(kv)} at context {context}{width} + top-{K} experts "
                f"for each of {L} layers ({format_bytes(L * K * expert_bytes)}){extra}"
            )
        by_trace = spread == "trace" or (spread == "auto" and is_mixtral_8x7b_shape(c))
        layer_slots, used = _layer_slots(min(L * E, (vram - fixed) // expert_bytes), L, E, K, by_trace)
    else:
        layer_slots = (E,) * L
    total = L * E
    limit = ram if ram is not None else ram_available
    if min(layer_slots) == E:
        host, host_chunks = 0, ()  # everything lives on the device; nothing to stage in RAM
    else:
        host, host_chunks = _host_tier(total, expert_bytes, limit, kind == "cuda")
    return MemoryPlan(
        dense, kv, expert_bytes, total, min(layer_slots), host, L,
        layer_slots=layer_slots, top_k=K, reserve=reserve, host_chunks=host_chunks, host_limit=limit, spread=used,
        kv_bits=kv_bits, prefill_chunk=chunk,
    )


def fit_to_free(plan: MemoryPlan, free: int) -> tuple[MemoryPlan, str | None]:
    """The plan clamped to the device memory really free, for the engine to call at load on
    CUDA after the dense weights and the KV cache are allocated and before the expert slots
    are: ``free`` is ``torch.cuda.mem_get_info()[0]`` then. The slots must fit in ``free`` less
    the reserve's terms still to come (``RuntimeReserve.working``: all but the CUDA context,
    which is already taken). Returns ``(plan, None)`` when they fit; otherwise a plan with as
    many slots as fit, spread over the layers by the plan's own rule (``MemoryPlan.spread``),
    and a one-line note naming the numbers. A RAM tier that
    was left empty because every expert had a slot is sized again from ``plan.host_limit``.
    Raises BudgetError, naming the numbers, when not even top-k slots per layer fit."""
    working = plan.reserve.working
    available = free - working
    if plan.device_expert_bytes <= available:
        return plan, None
    L, K, E = plan.num_layers, plan.top_k, plan.experts_per_layer
    slots = min(plan.device_slots, max(0, available) // plan.expert_bytes)
    if slots < L * K:
        raise BudgetError(
            f"device: {format_bytes(free)} free after dense weights and KV cache, less {format_bytes(working)} "
            f"for the runtime, holds {slots} expert slots of {format_bytes(plan.expert_bytes)}; top-{K} for each "
            f"of {L} layers needs {L * K} ({format_bytes(L * K * plan.expert_bytes)})"
        )
    layer_slots, used = _layer_slots(slots, L, E, K, plan.spread == "trace")
    host, chunks, limit = plan.host_experts, plan.host_chunks, plan.host_limit
    if host == 0 and plan.slots_per_layer == E:  # the RAM tier had nothing to hold; now it has
        host, chunks = _host_tier(plan.experts_total, plan.expert_bytes, limit, plan.reserve.device_type == "cuda")
    fitted = replace(
        plan, slots_per_layer=min(layer_slots), layer_slots=layer_slots, host_experts=host, host_chunks=chunks,
        spread=used,
    )
    note = (
        f"device: {format_bytes(free)} free after dense weights and KV cache, less {format_bytes(working)} for the "
        f"runtime, holds {slots} expert slots of {format_bytes(plan.expert_bytes)}, not the planned "
        f"{plan.device_slots}: {fitted.slots_phrase()} instead of {plan.slots_text()}"
    )
    return fitted, note


# ---- the model plan that `offload info` prints ----------------------------------------------

# Published config.json values, as the hub files spell them (the fields ModelConfig reads, and
# the family keys that decide a shape: decoder_sparse_step, mlp_only_layers, use_sliding_window),
# so a plan needs no download. Recalled, not re-read here (no network); the headline totals they
# give are checked against the model cards in tests/test_presets.py.
# - Mixtral-8x7B: mistralai/Mixtral-8x7B-v0.1 (its numbers are also in /work/shared/ARCHITECTURE.md
#   "Sizes worth knowing").
# - Mixtral-8x22B: mistralai/Mixtral-8x22B-v0.1 and -Instruct-v0.1: vocab_size 32768 (the v3
#   tokenizer with control tokens; the first torrent conversion, mistral-community/Mixtral-8x22B-v0.1,
#   says 32000; the difference is 2 x 768 x 6144 weights, 18.9 MB in bf16).
# - Qwen3-30B-A3B, Qwen3-235B-A22B: Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B. intermediate_size
#   (6144, 12288) is the dense FFN width the family would use for mlp_only_layers (none here); the
#   expert width is moe_intermediate_size. max_window_layers (48, 94) as recalled; unused while
#   use_sliding_window is false.
# - OLMoE-1B-7B: allenai/OLMoE-1B-7B-0924. torch_dtype "bfloat16" as recalled (its safetensors,
#   ~13.8 GB for 6.9B weights, are 2 bytes a weight); not certain the file says so.
# - Qwen1.5-MoE-A2.7B: Qwen/Qwen1.5-MoE-A2.7B. intermediate_size 5632 is the dense width (unused:
#   every layer is sparse); max_window_layers 21 as recalled, unused (use_sliding_window false);
#   sliding_window 32768 is in the file and ignored for the same reason. max_position_embeddings
#   8192 as recalled for the base model; not certain: copies of the -Chat config seen elsewhere
#   say 32768 (it changes only the --context ceiling, not a size).
BUILTIN_MODELS: dict[str, tuple[str, dict]] = {
    "mixtral-8x7b": ("Mixtral-8x7B", {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
    "mixtral-8x22b": ("Mixtral-8x22B", {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
        "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 65536,
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
    "qwen3-30b-a3b": ("Qwen3-30B-A3B", {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
        "max_position_embeddings": 40960, "rope_theta": 1e6, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
    "qwen3-235b-a22b": ("Qwen3-235B-A22B", {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
        "max_position_embeddings": 40960, "rope_theta": 1e6, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 94,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
    "olmoe-1b-7b": ("OLMoE-1B-7B", {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "attention_bias": False, "clip_qkv": None,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
    "qwen1.5-moe-a2.7b": ("Qwen1.5-MoE-A2.7B", {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "max_position_embeddings": 8192, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }),
}


def builtin_model(name: str) -> tuple[str, ModelConfig]:
    """(display name, config) of a built-in model by its name, any case ("mixtral-8x7b")."""
    key = name.strip().lower()
    if key not in BUILTIN_MODELS:
        raise ConfigError(f"{name!r}: no built-in model of that name (built in: {', '.join(BUILTIN_MODELS)})")
    display, raw = BUILTIN_MODELS[key]
    return display, ModelConfig.from_dict(raw, source=f"built-in {key}")


def attention_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """q, k, v, o projection shapes [out, in] of one layer: the matrices an attention format
    quantizes (their biases and q/k norms, where a family has them, stay in the compute dtype)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    D = c.hidden_size
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q)}


def dense_bytes_by_class(
    config: ModelConfig, dtype: torch.dtype, attn_format: quant.WeightFormat | str | None = None
) -> dict[str, int]:
    """Bytes of every non-expert weight by class (``DENSE_CLASSES``). The attention projections
    are in ``attn_format`` (default: plain ``dtype``), each matrix with its quantization state,
    packed tight; the rest (biases, norms, routers, a shared expert) stays in ``dtype``, as packs
    store them. lm_head is 0 when it is the embedding table (tied). In plain ``dtype`` the sum
    equals ``dense_bytes(config, dtype)``."""
    c = config
    size = _itemsize(dtype)
    fmt = quant.get_format(attn_format if attn_format is not None else str(dtype).removeprefix("torch."))
    by = {name: n * size for name, n in dense_parameters_by_class(c).items()}
    shapes = attention_shapes(c)
    plain = sum(out * inp for out, inp in shapes.values()) * size
    stored = sum(quant.matrix_bytes(shape, fmt) for shape in shapes.values())
    by["attention"] += c.num_hidden_layers * (stored - plain)  # the projections in their format
    return by


@dataclass(frozen=True)
class ModelPlan:
    """Everything ``offload info`` shows: sizes by class, one expert record, and the memory
    plan for a card (``vram``), or ``experts_per_layer`` slots, or, with neither given, the plan
    at the minimum card. On CUDA every device figure includes the runtime reserve."""

    name: str
    config: ModelConfig
    dtype: torch.dtype
    context: int
    expert_format: quant.WeightFormat
    attn_format: quant.WeightFormat
    dense_by_class: dict[str, int]
    expert_bytes: int  # one expert record (RecordLayout.nbytes)
    min_vram: int  # dense + KV cache + top-k experts per layer (+ the runtime reserve on CUDA)
    all_resident_vram: int  # dense + KV cache + every expert (+ the runtime reserve on CUDA)
    memory: MemoryPlan  # at ``vram`` or ``experts_per_layer``, else at ``min_vram``
    vram: int | None
    ram: int | None
    device_type: str = "cuda"
    experts_per_layer: int | None = None

    @property
    def dense_bytes(self) -> int:
        """Every dense weight, wherever it lives."""
        return sum(self.dense_by_class.values())

    @property
    def device_dense_bytes(self) -> int:
        """The dense weights on the device (``device_dense_bytes``: the embeddings may stay in RAM)."""
        return device_dense_bytes(self.config, self.dense_by_class, self.device_type)

    @property
    def host_dense_bytes(self) -> int:
        """The dense weights kept in host RAM on a card: the input embeddings, or nothing."""
        return self.dense_bytes - self.device_dense_bytes

    @property
    def parameters(self) -> ParameterCount:
        return parameter_count(self.config)

    @property
    def experts_total_bytes(self) -> int:
        return self.memory.experts_total * self.expert_bytes

    @property
    def device_experts(self) -> int:
        return self.memory.device_slots

    @property
    def disk_experts(self) -> int:
        """Experts with no place in RAM (nor a device slot of their own): read from disk on a miss."""
        return self.memory.experts_total - self.memory.host_experts if self.memory.disk_tier else 0

    def to_dict(self) -> dict:
        m = self.memory
        return {
            "model": self.name,
            "family": self.config.family,
            "parameters": {"total": self.parameters.total, "active": self.parameters.active},
            "dtype": str(self.dtype).removeprefix("torch."),
            "context": self.context,
            "expert_format": self.expert_format.name,
            "expert_bits_per_weight": self.expert_format.bits_per_weight(
                (self.config.intermediate_size, self.config.hidden_size)
            ),
            "attn_format": self.attn_format.name,
            "dense_bytes": self.dense_bytes,
            "dense_bytes_by_class": dict(self.dense_by_class),
            "device_dense_bytes": self.device_dense_bytes,
            "embeddings_on_host": embeddings_on_host(self.config, self.device_type),
            "expert_bytes": self.expert_bytes,
            "experts_total": m.experts_total,
            "experts_total_bytes": self.experts_total_bytes,
            "kv_cache_bytes": m.kv_cache_bytes,
            "kv_bits": m.kv_bits,
            "kv_positions": kv_positions(self.config, self.context, m.prefill_chunk),
            "prefill_chunk": m.prefill_chunk,
            "min_vram_bytes": self.min_vram,
            "all_resident_vram_bytes": self.all_resident_vram,
            "vram_bytes": self.vram,
            "ram_bytes": self.ram,
            "device_type": self.device_type,
            "experts_per_layer": self.experts_per_layer,
            "slots_per_layer": m.slots_per_layer,
            "layer_slots": list(m.layer_slots),
            "slot_spread": m.spread,
            "device_experts": self.device_experts,
            "device_expert_bytes": m.device_expert_bytes,
            "reserve_bytes": m.reserve_bytes,
            "reserve": m.reserve.to_dict(),
            "device_bytes": m.device_bytes,
            "host_experts": m.host_experts,
            "host_raw_bytes": m.host_raw_bytes,
            "host_bytes": m.host_bytes,
            "host_pinned": m.host_pinned,
            "host_chunks": list(m.host_chunks),
            "disk_experts": self.disk_experts,
            "config": self.config.to_dict(),
        }


def plan_model(
    name: str,
    config: ModelConfig,
    dtype: torch.dtype,
    context: int,
    expert_format: quant.WeightFormat | str,
    attn_format: quant.WeightFormat | str,
    *,
    vram: int | None = None,
    ram: int | None = None,
    experts_per_layer: int | None = None,
    device_type: str = "cuda",
    prefill_tokens: int | None = None,
    kv_bits: int = 16,
    sdpa: str = "fused",
) -> ModelPlan:
    """The plan for ``config`` on a card of ``vram`` bytes (or with ``experts_per_layer`` slots
    on every layer) with ``ram`` bytes for experts (no ``ram``: RAM holds every expert). Raises
    BudgetError, naming the minimum, when ``vram`` is below it; with neither device setting the
    plan is the one at the minimum card (top-k slots per layer). ``device_type`` "cuda" (a
    card, the default) counts the runtime reserve and pins the RAM tier (``plan_memory``);
    "cpu" plans a machine whose slots are RAM. ``kv_bits``: the KV cache's width (16, 8).
    ``prefill_tokens``: the prefill chunk (``--batch-size``); None: ``PREFILL_CHUNK_TOKENS``,
    fitted down on a ``vram`` too small for its reserve (``plan_memory``). ``sdpa``: the card's
    attention kernel (``SDPA_PATHS``). The minimum and the all-resident figures are at the
    memory plan's chunk."""
    if not 1 <= context <= config.max_position_embeddings:
        raise SettingError(f"--context {context}: must be in [1, {config.max_position_embeddings}]")
    expert_format, attn_format = quant.get_format(expert_format), quant.get_format(attn_format)
    by_class = dense_bytes_by_class(config, dtype, attn_format)
    record = RecordLayout.for_config(config, expert_format).nbytes

    def plan(chunk: int | None, **budget) -> MemoryPlan:
        return plan_memory(
            config, record, dtype, context, ram=ram, dense=device_dense_bytes(config, by_class, device_type),
            device_type=device_type,
            expert_format=expert_format, attn_format=attn_format, prefill_tokens=chunk, kv_bits=kv_bits, sdpa=sdpa,
            **budget,
        )

    if experts_per_layer is not None:
        memory = plan(prefill_tokens, experts_per_layer=experts_per_layer)
    elif vram is not None:
        memory = plan(prefill_tokens, vram=vram)
    else:
        memory = plan(prefill_tokens, experts_per_layer=config.num_experts_per_tok)
    minimum = plan(memory.prefill_chunk, experts_per_layer=config.num_experts_per_tok)
    everything = plan(memory.prefill_chunk, experts_per_layer=config.num_local_experts)
    return ModelPlan(
        name, config, dtype, context, expert_format, attn_format, by_class, record,
        minimum.device_bytes, everything.device_bytes, memory, vram, ram, _device_type(device_type), experts_per_layer,
    )


def minimum_vram(
    config: ModelConfig,
    dtype: torch.dtype,
    context: int,
    expert_format: quant.WeightFormat | str,
    attn_format: quant.WeightFormat | str,
    *,
    device_type: str = "cuda",
    kv_bits: int = 16,
    prefill_tokens: int | None = None,
    sdpa: str = "fused",
) -> int:
    """The least device memory that holds ``config``'s plan: dense weights, the KV cache, top-k
    experts per layer and the reserve, at the prefill chunk ``prefill_tokens``, or with None at
    the smallest a plan fits down to (``PREFILL_CHUNK_CHOICES``' last): a ``--vram`` of at least
    this plans."""
    chunk = PREFILL_CHUNK_CHOICES[-1] if prefill_tokens is None else prefill_tokens
    return plan_model("", config, dtype, context, expert_format, attn_format, device_type=device_type,
                      prefill_tokens=chunk, kv_bits=kv_bits, sdpa=sdpa).min_vram
