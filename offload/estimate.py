"""Decode speed estimate: tokens/s for a memory plan on a machine, from bytes and bandwidths.

What it is: arithmetic that turns a plan (``offload.plan.MemoryPlan``: device slots per layer,
RAM tier, disk) and a machine (``Machine``: the device's memory bandwidth, the host-to-device
link, the disk, and for experts run on the CPU the host's RAM) into an estimated decode speed, with the per-layer hit rate of an LRU cache of
that many slots replayed over recorded routing (``offload.trace.simulate`` on the shared
Mixtral-8x7B traces). What it is not: a measurement (``offload bench`` measures; see
``benchmarks/check_estimate.py`` for the comparison), a model of prefill, or of prefetching:
the hit rates are demand-loading LRU's, and nothing overlaps across layers (with CPU experts,
below, a layer's copies and CPU work overlap its own GPU work, as the placement model says).

The model, per decoded token (serial: loads and compute never overlap):

    t_token      = t_head + sum over layers l of ( t_compute(l) + t_load(l) )
    t_compute(l) = sum over matrices m read by layer l of t(m) + overhead          [device]
    t(m)         = touched(m) / (mem_gbps * efficiency)  (+ numel(m) / CPU_CONVERT_WEIGHTS_PER_S
                   where a CPU converts the matrix before the matmul: int8, portable 4-bit)
                   matrices: q, k, v, o, the router, the norms (two, and a family's q/k norms),
                   any projection biases, a shared expert's w1, w3, w2 and gate (Qwen2-MoE: every
                   token runs it, in the compute dtype), the KV cache at ``position`` tokens
                   (``kv_read_bytes``: a window's at most; at 8 bits the codes, the scales and the
                   copies made back in the compute dtype), and
                   the top-k routed experts' w1, w3, w2 (one routed expert's width, however many
                   experts a layer has); ``touched_bytes`` says how much of a matrix a batch-1
                   matmul moves in each format
    t_load(l)    = misses(l) * record * ( (1 - d) / link + d * (1 / disk + 1 / link on CUDA) )
    misses(l)    = top_k * (1 - hit_rate(l, slots(l)))
    d            = 1 - host_experts / experts_total   (the share of misses the RAM tier lacks:
                   it holds a fixed set, and misses spread over the experts)
    t_head       = (final norm + lm_head) / (mem_gbps * efficiency)

The sum runs over the layers with experts (``ModelConfig.moe_layers``); a layer with a dense MLP
instead (Qwen's ``mlp_only_layers``) costs its attention, norms, KV cache, FFN (in the compute
dtype) and overhead, and loads nothing (``Estimate.dense_layers_s``, all of them together).

``hit_rate(l, s)`` is layer l's LRU hit rate with s slots on the shared Mixtral-8x7B decode
traces (each layer its own count when the plan is uneven). A model of another shape with 8
experts and top-2 borrows them (the mean over Mixtral's layers at that count, said so in
``Estimate.hit_source``); any other shape (Qwen3's 128 experts top-8, OLMoE's 64 top-8,
Qwen1.5-MoE's 60 top-4), or no traces, takes a uniform router's s / E, which real routers usually
beat (their choices are skewed and repeat from token to token). A plan with every expert
on the device has no misses.

What overlap would change: with copies on their own stream and every load started a layer
ahead (prefetch in time), a layer costs max(t_compute, t_load) instead of the sum;
``Estimate.overlap_tokens_per_s`` is that bound (it keeps LRU's load count; a prefetching
policy loads more, and wrong guesses cost link time too).

CPU experts (``cpu_experts``, ``--cpu-experts``; issue 13). "off" is the formula above, every
miss over the link (the transfer-only figures, ``Estimate.transfer_tokens_per_s`` whatever the
mode). "auto" and "all" on a card price each layer's misses with the placement cost model
(``offload.experts.placement``, "auto": the split that finishes the layer soonest; "all": every
miss on the CPU):

    t_layer(l)   = t_dense(l) + sum over m = 0..K, r = 0..m of
                   P(m misses) * P(r of them in RAM) * placement_finish(m, r)
    P(m misses)  = binomial(K, 1 - hit_rate(l, slots(l)))   (each use misses independently)
    P(r in RAM)  = binomial(m, 1 - d)
    placement_finish(m, r) = the layer's experts done, from its routing: the K - m resident
                   experts on the GPU first (t_expert each), the misses placed, the link, the
                   CPU and the disk idle when the layer starts (no prefetch traffic, nothing
                   carried over from the layer before)
    t_dense(l)   = t_compute(l) - K * t_expert (attention, router, norms, KV cache, overhead)
    cpu expert   = record / (ram_gbps * cpu_efficiency), or record / cpu_expert_gbps measured

Under "auto" the hit rates stay LRU's, as if every miss entered a slot; the engine's cache
admits only the misses it copies (a miss run on the CPU takes no slot), which lowers them unless
misses run on the CPU are also copied in the background. Under "all" nothing enters the slots
(no CPU miss is admitted, nothing in RAM is prefetched): every use runs on the CPU.
``offload.timeline`` replays the real traces with the engine's rules (placement per miss with
the queues as they stand, the slots as the cache keeps them, the link a queue with prefetches
behind demand copies) and is the better figure (README: the hybrid, simulated); this one
is a quick figure for ``offload info``. On a CPU device "auto" and "all" compute a miss in RAM
where it lies (nothing is copied), so only the misses the RAM tier lacks cost a read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from offload import quant
from offload.config import ModelConfig
from offload.errors import OffloadError, SettingError
from offload.experts.placement import CPU, CPU_EXPERTS, CPU_KERNEL_EFFICIENCY, ROUND_TRIP_S, Costs, Miss, Queues, place_layer
from offload.plan import (
    PREFILL_CHUNK_TOKENS,
    MemoryPlan,
    ModelPlan,
    attention_shapes,
    format_bytes,
    is_mixtral_8x7b_shape,
    layer_parameters_by_class,
    trace_hit_rates,
)

# Share of the stated memory bandwidth that batch-1 weight reads reach (cuBLAS's gemv and
# bitsandbytes' 4-bit gemv reach roughly half to three quarters of peak on recent cards, a
# stated figure, not a measurement).
MEMORY_EFFICIENCY = 0.6
# Fixed host cost per layer: on CUDA ~25 kernel launches (~8 us each), the one device-to-host
# copy of the routing per layer and the cache's bookkeeping (~0.05 ms, README); on a CPU the
# Python dispatch of the same ops and the bookkeeping. Stated figures.
LAYER_OVERHEAD_S = {"cuda": 0.3e-3, "cpu": 0.1e-3}
# A CPU converting a matrix before its matmul (int8 cast; 4-bit formats run offload's kernel on the
# codes, unconverted): weights per second, from FACTS.md on the AVX-512 Xeon (one 14336 x 4096 nf4 matrix
# dequantized to bf16 in 35 ms: 1.7e9 weights/s; int8's cast costs about the same).
CPU_CONVERT_WEIGHTS_PER_S = 1.7e9
# Defaults for a machine given by flags (``offload info --vram``): PCIe 4.0 x16 from pinned
# memory measures ~25 GB/s; the RTX 3060 12 GB's published 360 GB/s; a PCIe 4.0 NVMe's ~3.5 GB/s.
DEFAULT_LINK_GBPS = 25.0
DEFAULT_MEM_GBPS = 360.0
DEFAULT_DISK_GBPS = 3.5
# The CPU's RAM read bandwidth for a machine given by flags: dual-channel DDR5-5600 is 89.6 GB/s
# peak (2 channels x 8 bytes x 5600 MT/s); desktop read benchmarks reach ~70-75% of it: ~65 GB/s
# usable, a stated figure.
DEFAULT_RAM_GBPS = 65.0
# Tokens already in the KV cache when a token is decoded (its keys and values are read).
DEFAULT_POSITION = 512

UNIFORM = "a uniform router's slots/experts (no trace for this shape)"
RESIDENT = "every expert resident"


@dataclass(frozen=True)
class Machine:
    """What the estimate needs to know of a machine. ``expert_seconds``, when measured, replaces
    the bandwidth model for one expert's FFN at batch 1 (``benchmarks/check_estimate.py``)."""

    device_type: str = "cuda"  # "cuda": slots on a card, loads cross the link; "cpu": slots are RAM
    mem_gbps: float = DEFAULT_MEM_GBPS  # the device's memory bandwidth (a CPU: its RAM's)
    link_gbps: float = DEFAULT_LINK_GBPS  # host-to-device copy (a CPU: memcpy)
    disk_gbps: float = DEFAULT_DISK_GBPS  # sequential read of the pack
    efficiency: float = MEMORY_EFFICIENCY
    layer_overhead_s: float | None = None  # None: LAYER_OVERHEAD_S[device_type]
    expert_seconds: float | None = None
    source: str = ""  # where the numbers come from, for the output
    # the host side, for CPU experts (--cpu-experts auto|all on a card): the CPU's RAM read
    # bandwidth (None: not stated, and then no CPU expert can be priced), the share of it the
    # CPU kernel reaches, or that kernel's measured GB/s on expert records; the round trip per
    # layer with CPU experts
    ram_gbps: float | None = None
    cpu_efficiency: float = CPU_KERNEL_EFFICIENCY
    cpu_expert_gbps: float | None = None
    round_trip_s: float = ROUND_TRIP_S

    def __post_init__(self) -> None:
        if self.device_type not in LAYER_OVERHEAD_S:
            raise SettingError(f"device type {self.device_type!r}: expected one of {', '.join(LAYER_OVERHEAD_S)}")
        for name in ("mem_gbps", "link_gbps", "disk_gbps", "efficiency", "cpu_efficiency"):
            value = getattr(self, name)
            if not value > 0:
                raise SettingError(f"--{name.replace('_', '-')} {value!r}: must be above 0")
        for name in ("ram_gbps", "cpu_expert_gbps"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise SettingError(f"--{name.replace('_', '-')} {value!r}: must be above 0")
        if not 0 <= self.round_trip_s < math.inf:
            raise SettingError(f"round trip {self.round_trip_s!r} s: must be a finite number >= 0")
        if self.layer_overhead_s is None:
            object.__setattr__(self, "layer_overhead_s", LAYER_OVERHEAD_S[self.device_type])

    @property
    def prices_cpu_experts(self) -> bool:
        """Whether a CPU expert can be priced: the RAM's bandwidth or the kernel's is known."""
        return self.ram_gbps is not None or self.cpu_expert_gbps is not None

    def cpu_expert_seconds(self, record_bytes: int) -> float:
        """One expert's FFN on the CPU from its RAM copy: a read of the record at the kernel's
        measured GB/s, else at ``ram_gbps`` x ``cpu_efficiency``."""
        if self.cpu_expert_gbps is not None:
            return record_bytes / (self.cpu_expert_gbps * 1e9)
        if self.ram_gbps is None:
            raise SettingError("CPU experts need the CPU's memory bandwidth (machine.ram_gbps, --ram-gbps)")
        return record_bytes / (self.ram_gbps * 1e9 * self.cpu_efficiency)

    @classmethod
    def from_profile(cls, profile, **overrides: Any) -> Machine:
        """A shipped or written profile's machine (``offload.profile.Profile``); ``overrides``
        (None values ignored) replace its figures. Raises SettingError when neither gives the
        memory bandwidth."""
        round_trip_ms = getattr(profile, "round_trip_ms", None)
        values = dict(
            device_type="cuda" if profile.has_gpu else "cpu",
            mem_gbps=profile.mem_gbps,
            link_gbps=profile.h2d_gbps,
            disk_gbps=profile.disk_gbps,
            ram_gbps=getattr(profile, "ram_gbps", None),
            cpu_expert_gbps=getattr(profile, "cpu_expert_gbps", None),
            round_trip_s=ROUND_TRIP_S if round_trip_ms is None else round_trip_ms * 1e-3,
            source=f"profile {profile.name or profile.source}",
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["mem_gbps"] is None:
            where = profile.source or profile.name or "profile"
            raise SettingError(f"{where}: machine.mem_gbps: not given, and the estimate needs it (or --mem-gbps)")
        return cls(**values)

    def describe(self, cpu_experts: bool = False) -> str:
        memory = (f"experts {self.expert_seconds * 1e3:.2f} ms each (measured), " if self.expert_seconds else "")
        host = ""
        if cpu_experts and self.device_type == "cuda":
            kernel = (f"CPU experts at {self.cpu_expert_gbps:g} GB/s (measured)" if self.cpu_expert_gbps is not None
                      else f"RAM {self.ram_gbps:g} GB/s x {self.cpu_efficiency:g}")
            host = f", {kernel}, round trip {self.round_trip_s * 1e3:.2f} ms"
        return (
            f"{memory}memory {self.mem_gbps:g} GB/s x {self.efficiency:g}, link {self.link_gbps:g} GB/s, "
            f"disk {self.disk_gbps:g} GB/s{host}, {self.layer_overhead_s * 1e3:.2f} ms/layer overhead"
        )


def touched_bytes(shape: tuple[int, int], fmt: quant.WeightFormat | str, dtype: torch.dtype, device_type: str) -> int:
    """Bytes a batch-1 matmul on one [out, in] matrix moves through memory: its stored bytes,
    plus, where the kernel first makes the whole matrix in the compute dtype (int8's cast;
    4-bit dequantized on a CPU, or the CPU layout on CUDA; a plain matrix in another dtype), the
    write and the read of that copy. bitsandbytes' CUDA 4-bit kernel, offload's CPU 4-bit kernel
    (``offload.kernels.cpu4``, built wherever a C compiler is; without one a CPU dequantizes,
    which this does not price) and bitsandbytes' fused CPU kernel read the packed codes directly."""
    fmt = quant.get_format(fmt)
    stored = quant.matrix_bytes(shape, fmt)
    copy = 2 * shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if fmt.kind == "plain":
        return stored if fmt.dtype == dtype else stored + copy
    if fmt.kind == "int8":
        return stored + copy
    if fmt.kind == "4bit":
        return stored
    return stored if device_type == "cpu" else stored + copy + shape[0] * shape[1]  # "4bit-cpu": unpacked codes


def _converts_on_cpu(fmt: quant.WeightFormat, dtype: torch.dtype) -> bool:
    return fmt.kind == "int8" or (fmt.kind == "plain" and fmt.dtype != dtype)


def matrix_seconds(
    shape: tuple[int, int], fmt: quant.WeightFormat | str, dtype: torch.dtype, machine: Machine
) -> float:
    """One batch-1 matmul on a [out, in] matrix: ``touched_bytes`` at the machine's effective
    bandwidth, plus, on a CPU that converts the matrix first, its weights at
    ``CPU_CONVERT_WEIGHTS_PER_S``."""
    fmt = quant.get_format(fmt)
    seconds = touched_bytes(shape, fmt, dtype, machine.device_type) / (machine.mem_gbps * 1e9 * machine.efficiency)
    if machine.device_type == "cpu" and _converts_on_cpu(fmt, dtype):
        seconds += shape[0] * shape[1] / CPU_CONVERT_WEIGHTS_PER_S
    return seconds


@dataclass(frozen=True)
class LayerEstimate:
    slots: int
    hit_rate: float
    misses: float  # expert misses per token (loads, when every miss is loaded)
    compute_s: float  # dense part + top-k experts on the device
    load_s: float  # the misses' loads when every miss is loaded (transfer-only)
    dense_s: float = 0.0  # of compute_s: attention, router, norms, KV cache, host overhead
    hybrid_s: float | None = None  # --cpu-experts auto|all: the layer's time (None: "off")
    cpu_runs: float = 0.0  # --cpu-experts auto|all: experts per token run on the CPU


@dataclass(frozen=True)
class Estimate:
    """The estimate's parts; ``tokens_per_s`` is the figure of ``cpu_experts``: "off", the
    serial transfer-only figure (the module's formula); "auto" / "all", the placement model's."""

    layers: tuple[LayerEstimate, ...]
    head_s: float
    record_bytes: int
    disk_share: float
    hit_source: str
    machine: Machine
    position: int
    expert_s: float = 0.0  # one expert's FFN on the device
    cpu_experts: str = "off"
    cpu_expert_s: float | None = None  # one expert's FFN on the CPU ("auto" / "all" on a card)
    dense_layers_s: float = 0.0  # the layers without experts (Qwen's mlp_only_layers), all of them
    kv_bits: int = 16  # the KV cache's width
    kv_s: float = 0.0  # one layer's read of the KV cache at ``position`` (in every layer's compute_s)

    @property
    def fixed_s(self) -> float:
        """What no expert placement changes: the head and the layers without experts."""
        return self.head_s + self.dense_layers_s

    @property
    def compute_s(self) -> float:
        return self.fixed_s + sum(layer.compute_s for layer in self.layers)

    @property
    def load_s(self) -> float:
        return sum(layer.load_s for layer in self.layers)

    @property
    def hybrid(self) -> bool:
        """Whether misses are placed (``cpu_experts`` "auto" or "all" priced per layer)."""
        return all(layer.hybrid_s is not None for layer in self.layers) and self.cpu_experts != "off"

    @property
    def transfer_seconds_per_token(self) -> float:
        """Every miss over the link, serial (the module's first formula)."""
        return self.compute_s + self.load_s

    @property
    def transfer_tokens_per_s(self) -> float:
        return 1.0 / self.transfer_seconds_per_token

    @property
    def seconds_per_token(self) -> float:
        if not self.hybrid:
            return self.transfer_seconds_per_token
        return self.fixed_s + sum(layer.hybrid_s for layer in self.layers)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    @property
    def cpu_runs_per_token(self) -> float:
        return sum(layer.cpu_runs for layer in self.layers)

    @property
    def overlap_tokens_per_s(self) -> float:
        """The bound with every load hidden behind its layer's compute (or the reverse)."""
        return 1.0 / (self.fixed_s + sum(max(layer.compute_s, layer.load_s) for layer in self.layers))

    @property
    def misses_per_token(self) -> float:
        return sum(layer.misses for layer in self.layers)

    @property
    def hit_rate(self) -> float:
        return sum(layer.hit_rate for layer in self.layers) / len(self.layers)

    @property
    def bytes_moved_per_token(self) -> float:
        return self.misses_per_token * self.record_bytes

    def describe(self) -> str:
        """One line, labelled an estimate."""
        loads = (
            f" + loads {self.load_s * 1e3:.1f} ms ({self.misses_per_token:.1f} experts, "
            f"{format_bytes(int(self.bytes_moved_per_token))}"
            f"{f', {self.disk_share:.0%} from disk' if self.disk_share else ''})"
            if self.misses_per_token else ""
        )
        overlap = (f"; {self.overlap_tokens_per_s:.1f} tok/s if loads overlapped compute"
                   if self.misses_per_token else "")
        hits = f"hit rate {self.hit_rate:.3f}, {self.hit_source}" if self.misses_per_token else self.hit_source
        if not self.hybrid or not self.misses_per_token:
            return (
                f"estimate: {self.tokens_per_s:.1f} tok/s decode (per token: compute {self.compute_s * 1e3:.1f} ms"
                f"{loads}{overlap}); {hits}; {self.machine.describe()}"
            )
        share = "every expert use" if self.cpu_experts == "all" else f"of {self.misses_per_token:.1f} misses"
        on_cpu = (f", {self.cpu_runs_per_token:.1f} experts on the CPU ({share}) at {self.cpu_expert_s * 1e3:.2f} ms "
                  "each" if self.cpu_expert_s is not None else
                  f", {self.cpu_runs_per_token:.1f} experts computed where they lie in RAM")
        return (
            f"estimate: {self.tokens_per_s:.1f} tok/s decode with --cpu-experts {self.cpu_experts} "
            f"({self.seconds_per_token * 1e3:.1f} ms per token{on_cpu}); transfer only: "
            f"{self.transfer_tokens_per_s:.1f} tok/s (compute {self.compute_s * 1e3:.1f} ms{loads}{overlap}); "
            f"{hits}; {self.machine.describe(cpu_experts=True)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "cpu_experts": self.cpu_experts,
            "transfer_tokens_per_s": self.transfer_tokens_per_s,
            "cpu_runs_per_token": self.cpu_runs_per_token,
            "expert_s": self.expert_s,
            "cpu_expert_s": self.cpu_expert_s,
            "overlap_tokens_per_s": self.overlap_tokens_per_s,
            "seconds_per_token": self.seconds_per_token,
            "compute_s": self.compute_s,
            "load_s": self.load_s,
            "head_s": self.head_s,
            "dense_layers_s": self.dense_layers_s,
            "hit_rate": self.hit_rate,
            "hit_source": self.hit_source,
            "misses_per_token": self.misses_per_token,
            "bytes_moved_per_token": self.bytes_moved_per_token,
            "disk_share": self.disk_share,
            "position": self.position,
            "kv_bits": self.kv_bits,
            "kv_s": self.kv_s,
            "machine": {
                "device_type": self.machine.device_type, "mem_gbps": self.machine.mem_gbps,
                "link_gbps": self.machine.link_gbps, "disk_gbps": self.machine.disk_gbps,
                "efficiency": self.machine.efficiency, "layer_overhead_s": self.machine.layer_overhead_s,
                "expert_seconds": self.machine.expert_seconds, "source": self.machine.source,
                "ram_gbps": self.machine.ram_gbps, "cpu_efficiency": self.machine.cpu_efficiency,
                "cpu_expert_gbps": self.machine.cpu_expert_gbps, "round_trip_s": self.machine.round_trip_s,
            },
            "layers": [asdict(layer) for layer in self.layers],
        }


# ---- hit rates ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _trace_rates(path: str) -> dict[int, tuple[float, ...]]:
    from offload.trace import load_trace, simulate

    trace = load_trace(path)
    return {k: tuple(simulate(trace, k, "lru").layer_hit_rates()) for k in range(trace.top_k, trace.num_experts + 1)}


def layer_hit_rates(
    config: ModelConfig, layer_slots: Sequence[int], trace: str | Path | None = None
) -> tuple[tuple[float, ...], str]:
    """(hit rate of each layer with its slot count, where the rates come from). ``trace``: a
    router trace to replay instead of the shared Mixtral-8x7B traces (its experts and top-k
    the model's; its first layers the model's layers, as ``--replay`` takes them)."""
    L, E, K = config.num_moe_layers, config.num_local_experts, config.num_experts_per_tok
    if len(layer_slots) != L:
        raise SettingError(f"{len(layer_slots)} slot counts for a model of {L} layers with experts")
    if trace is not None:  # as --replay reads it: the trace's first L layers are the model's
        rates = _trace_rates(str(trace))
        if len(next(iter(rates.values()))) < L or min(rates) != K or max(rates) != E:
            raise OffloadError(
                f"{trace}: fewer layers than the model's {L}, or not its {E} experts and top-{K}"
            )
        return tuple(rates[s][layer] for layer, s in enumerate(layer_slots)), f"LRU replayed on {Path(trace).name}"
    shared = trace_hit_rates()
    if shared is not None and is_mixtral_8x7b_shape(config):
        return tuple(shared[s][layer] for layer, s in enumerate(layer_slots)), "LRU on the Mixtral-8x7B traces"
    if shared is not None and min(shared) == K and max(shared) == E:
        means = {s: sum(r) / len(r) for s, r in shared.items()}
        return tuple(means[s] for s in layer_slots), "LRU borrowed from Mixtral-8x7B's traces (mean over its layers)"
    return tuple(s / E for s in layer_slots), UNIFORM


# ---- the estimate ------------------------------------------------------------------------------


def estimate_decode(
    config: ModelConfig,
    memory: MemoryPlan,
    machine: Machine,
    *,
    dtype: torch.dtype,
    expert_format: quant.WeightFormat | str,
    attn_format: quant.WeightFormat | str,
    position: int = DEFAULT_POSITION,
    trace: str | Path | None = None,
    cpu_experts: str = "off",
    kv_bits: int | None = None,
) -> Estimate:
    """Estimated decode speed of ``memory`` on ``machine`` (the module's formula). ``dtype`` is
    the compute dtype, ``expert_format`` / ``attn_format`` the weights' formats, ``position``
    the tokens already in the KV cache (``kv_read_bytes``: each layer reads them, the window's
    at most; ``kv_bits`` their width, default the plan's), ``trace`` a trace to take hit rates from instead of the
    shared Mixtral-8x7B traces, ``cpu_experts`` where misses run ("off": every one over the link;
    "auto" / "all": placed, on a card, by ``offload.experts.placement``; a card's machine must
    then say its RAM's bandwidth, ``Machine.ram_gbps``, or its CPU kernel's)."""
    if cpu_experts not in CPU_EXPERTS:
        raise SettingError(f"--cpu-experts {cpu_experts!r}: choose one of {', '.join(CPU_EXPERTS)}")
    c = config
    L, E, K = c.num_moe_layers, c.num_local_experts, c.num_experts_per_tok  # L: the layers with experts
    D, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    if memory.num_layers != L:
        raise SettingError(f"a plan of {memory.num_layers} layers for a model of {L} layers with experts")
    if position < 0:
        raise SettingError(f"position {position}: must not be negative")
    size = torch.empty((), dtype=dtype).element_size()
    bandwidth = machine.mem_gbps * 1e9 * machine.efficiency
    expert_fmt, attn_fmt = quant.get_format(expert_format), quant.get_format(attn_format)
    plain = quant.get_format(str(dtype).removeprefix("torch."))
    if machine.expert_seconds is not None:
        expert_s = machine.expert_seconds
    else:
        expert_s = sum(matrix_seconds(shape, expert_fmt, dtype, machine) for shape in ((I, D), (I, D), (D, I)))
    attention_s = sum(matrix_seconds(shape, attn_fmt, dtype, machine) for shape in attention_shapes(c).values())
    shared_s = 0.0  # Qwen2-MoE's shared expert: a dense FFN in the compute dtype, run by every token
    if c.shared_expert_intermediate_size is not None:
        Is = c.shared_expert_intermediate_size
        shared_s = sum(matrix_seconds(shape, plain, dtype, machine) for shape in ((Is, D), (Is, D), (D, Is), (1, D)))
    projections = sum(out * inp for out, inp in attention_shapes(c).values())

    def small_s(layer: int | None) -> float:  # router, norms (q/k norms too), biases
        by = layer_parameters_by_class(c, layer)
        return (by["routers"] + by["norms"] + by["attention"] - projections) * size / bandwidth

    kv_bits = memory.kv_bits if kv_bits is None else kv_bits
    kv_s = kv_read_bytes(c, dtype, position, kv_bits, memory.prefill_chunk, machine.device_type) / bandwidth
    compute_s = attention_s + shared_s + small_s(None) + kv_s + K * expert_s + machine.layer_overhead_s
    head_s = matrix_seconds((V, D), plain, dtype, machine) + D * size / bandwidth
    dense_layers_s = 0.0  # Qwen's dense-MLP layers (mlp_only_layers): attention and an FFN in the compute dtype
    if c.dense_layers:
        Id = c.dense_intermediate_size
        mlp_s = sum(matrix_seconds(shape, plain, dtype, machine) for shape in ((Id, D), (Id, D), (D, Id)))
        dense_layers_s = len(c.dense_layers) * (
            attention_s + small_s(c.dense_layers[0]) + kv_s + mlp_s + machine.layer_overhead_s
        )
    resident = memory.slots_per_layer == E
    if resident:
        rates, source = (1.0,) * L, RESIDENT
    else:
        rates, source = layer_hit_rates(c, memory.layer_slots, trace)
    disk_share = 0.0 if resident else 1.0 - memory.host_experts / memory.experts_total
    record = memory.expert_bytes
    link, disk = machine.link_gbps * 1e9, machine.disk_gbps * 1e9
    then_link = 1 / link if machine.device_type == "cuda" else 0.0  # a CPU reads straight into the slot
    per_miss = record * ((1 - disk_share) / link + disk_share * (1 / disk + then_link))
    dense_s = compute_s - K * expert_s
    cpu_s = None
    if cpu_experts == "off":
        layers = tuple(
            LayerEstimate(s, h, K * (1 - h), compute_s, K * (1 - h) * per_miss, dense_s)
            for s, h in zip(memory.layer_slots, rates)
        )
    elif resident:  # no misses to place
        layers = tuple(LayerEstimate(s, 1.0, 0.0, compute_s, 0.0, dense_s, compute_s) for s in memory.layer_slots)
    elif machine.device_type == "cpu":  # a miss in RAM is computed where it lies: only disk misses cost a read
        layers = tuple(
            LayerEstimate(s, h, K * (1 - h), compute_s, K * (1 - h) * per_miss, dense_s,
                          compute_s + K * (1 - h) * disk_share * record / disk, K * (1 - h) * (1 - disk_share))
            for s, h in zip(memory.layer_slots, rates)
        )
    else:
        if not machine.prices_cpu_experts:
            raise SettingError(
                f"--cpu-experts {cpu_experts}: the machine ({machine.source or 'given'}) states no RAM bandwidth "
                "(machine.ram_gbps, --ram-gbps) to price CPU experts; --cpu-experts off estimates transfer only"
            )
        cpu_s = machine.cpu_expert_seconds(record)
        costs = Costs(link_s=record / link, gpu_s=expert_s, cpu_s=cpu_s, round_trip_s=machine.round_trip_s,
                      disk_s=record / disk)
        # "all": the slots stay empty (no miss run on the CPU is admitted, nothing in RAM is
        # prefetched), so every use runs on the CPU; "auto": LRU's misses, placed. Layers with
        # the same miss rate cost the same: each rate is placed once (top-8 of 128 experts over
        # 94 layers is thousands of placements a layer).
        placed: dict[float, tuple[float, float]] = {}

        def layer_time(h: float) -> tuple[float, float]:
            miss_rate = 1.0 if cpu_experts == "all" else 1 - h
            if miss_rate not in placed:
                placed[miss_rate] = _placed_layer(dense_s, K, miss_rate, disk_share, costs, cpu_experts)
            return placed[miss_rate]

        layers = tuple(
            LayerEstimate(s, h, K * (1 - h), compute_s, K * (1 - h) * per_miss, dense_s, *layer_time(h))
            for s, h in zip(memory.layer_slots, rates)
        )
    return Estimate(layers, head_s, record, disk_share, source, machine, position, expert_s, cpu_experts, cpu_s,
                    dense_layers_s, kv_bits, kv_s)


def kv_read_bytes(
    config: ModelConfig, dtype: torch.dtype, position: int, kv_bits: int = 16, chunk: int = PREFILL_CHUNK_TOKENS,
    device_type: str = "cuda",
) -> int:
    """Bytes one layer's decode step moves through device memory to attend over ``position``
    cached tokens, as ``offload.model.KVCache.read_step`` and SDPA do it: at 16 bits the kernel
    reads Dh values in the compute dtype (s bytes) a KV head. At 8 bits the codes times the
    scales are made in the compute dtype and the product read by the kernel: on CUDA in one
    elementwise pass that casts the int8 codes as it reads them (1 byte and the row's scale read,
    s written), 1 + 2 s bytes a value (5 in bf16, 2.5 times 16 bits: an 8-bit cache saves memory,
    not bandwidth, until attention reads int8 itself); on a CPU (``device_type`` "cpu") torch
    casts the codes into a temporary first (s written and read again), 1 + 4 s. The positions
    read: all of them; with a sliding window W, at most W, and once the ring of W + ``chunk``
    slots has wrapped, every slot (with a mask)."""
    from offload.plan import check_kv_bits

    c = config
    W = c.sliding_window
    if W is None:
        seen = position
    else:
        seen = W + chunk if position >= W + chunk else min(position, W)
    s = torch.empty((), dtype=dtype).element_size()
    if check_kv_bits(kv_bits, "KV cache bits") == 16:
        per_head = c.head_dim * s
    else:
        per_head = c.head_dim * (1 + (4 if device_type == "cpu" else 2) * s) + s
    return 2 * c.num_key_value_heads * seen * per_head


def _placed_layer(dense_s: float, top_k: int, miss_rate: float, disk_share: float, costs: Costs,
                  mode: str) -> tuple[float, float]:
    """(expected layer seconds, expected experts run on the CPU) under the placement model: m
    of the top-k uses miss (binomial), r of those m have their record in RAM (binomial); each
    case placed with the link, CPU and disk idle and the GPU computing the top-k - m hits first."""
    seconds = on_cpu = 0.0
    for m in range(top_k + 1):
        p_m = math.comb(top_k, m) * miss_rate**m * (1 - miss_rate) ** (top_k - m)
        if p_m == 0.0:
            continue
        for r in range(m + 1):
            p = p_m * math.comb(m, r) * (1 - disk_share) ** r * disk_share ** (m - r)
            if p == 0.0:
                continue
            misses = [Miss(i, i < r) for i in range(m)]
            got = place_layer(misses, costs, Queues(gpu_s=(top_k - m) * costs.gpu_s), mode)
            seconds += p * got.finish_s
            on_cpu += p * got.sides.count(CPU)
    return dense_s + seconds, on_cpu


def estimate_plan(plan: ModelPlan, machine: Machine, **kwargs: Any) -> Estimate:
    """``estimate_decode`` for a ``ModelPlan`` (``offload info``'s): its memory plan, formats, dtype."""
    return estimate_decode(
        plan.config, plan.memory, machine, dtype=plan.dtype, expert_format=plan.expert_format,
        attn_format=plan.attn_format, **kwargs,
    )


__all__ = [
    "CPU_CONVERT_WEIGHTS_PER_S", "DEFAULT_DISK_GBPS", "DEFAULT_LINK_GBPS", "DEFAULT_MEM_GBPS", "DEFAULT_POSITION",
    "DEFAULT_RAM_GBPS",
    "Estimate", "LAYER_OVERHEAD_S", "LayerEstimate", "MEMORY_EFFICIENCY", "Machine", "estimate_decode",
    "estimate_plan", "kv_read_bytes", "layer_hit_rates", "matrix_seconds", "touched_bytes",
]
