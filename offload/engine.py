"""Engine: load a model onto a device, then prefill, decode, sample and stream tokens.

What it is: the glue between the checkpoint, the decoder math, the expert provider, the
sampler and the tokenizer, plus per-request statistics. What it is not: a command-line tool
(it never prints) or a chat session (it takes token ids; formats live in the tokenizer).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil
import torch

from offload.checkpoint import Checkpoint
from offload.config import ModelConfig
from offload.device import resolve_device, synchronize
from offload.errors import SettingError, TokenizerError
from offload.experts.cache import CacheStats, ExpertCache
from offload.experts.policy import cache_policy, default_policy
from offload.experts.predict import PREFETCH_POLICIES, ScoreEviction
from offload.experts.prefetch import Lookahead, Prefetcher
from offload.experts.record import RecordLayout
from offload.experts.tiers import CheckpointRecords
from offload.pack import Pack, is_pack
from offload.plan import (
    MemoryPlan,
    attention_shapes,
    dense_bytes,
    dense_bytes_by_class,
    parse_bytes,
    plan_memory,
)
from offload.model import (
    DenseWeights,
    ExpertWeights,
    KVCache,
    LayerWeights,
    Matrix,
    MixtralModel,
    RotaryTable,
)
from offload.quant import QuantizedMatrix, WeightFormat, format_for_bits, from_tensors, get_format, quantize
from offload.sampling import Sampler, SamplingSettings
from offload.trace import TraceHeader, TraceWriter
from offload.tokenizer import Tokenizer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_DTYPE = "bfloat16"
DEFAULT_CONTEXT = 4096

# progress(done, total, what): reported while loading weights
ProgressFn = Callable[[int, int, str], None]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise SettingError(f"dtype {name} is not supported (choose {', '.join(DTYPES)})")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise SettingError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


class ResidentExperts:
    """Expert provider that holds every expert on the device (the all-resident reference)."""

    def __init__(self, experts: list[list[ExpertWeights]], max_experts_per_call: int):
        self.experts = experts  # [layer][expert]
        self.max_experts_per_call = max_experts_per_call

    def get(self, layer: int, experts: Sequence[int]) -> list[ExpertWeights]:
        return [self.experts[layer][e] for e in experts]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    ignore_eos: bool = False  # keep going past EOS (benchmarks, exact-length comparisons)
    trace: Path | None = None  # write a router trace here (offload.trace format)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SettingError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise SettingError("stop strings must not be empty")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0  # forward passes after the prompt (the first token comes from prefill)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # eos | stop | length | context

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        out = asdict(self)
        out["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        out["generation_tokens_per_s"] = self.generation_tokens_per_s
        return out


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # text that became final with this token; may be "" (held back or a control token)


class StopMatcher:
    """Streams text but holds back any tail that could still grow into a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TraceRecorder:
    """Writes a router trace of a generation: per token and layer, the experts chosen, their
    gate weights, what was predicted for the layer before it ran, and the cache's outcome for
    each expert (decode tokens; a prompt is served in expert-major chunks, not per token).

    It wraps the model's routing observer (keeping any other one) and reads the prefetcher's
    predictions and the cache's last outcomes; it changes nothing the model computes."""

    def __init__(self, engine: Engine, path: Path):
        self.engine = engine
        model = engine.model
        c = engine.config
        plan, cache = engine.plan, engine.cache
        header = TraceHeader(
            model=str(engine.model_name),
            num_layers=c.num_hidden_layers,
            num_experts=c.num_local_experts,
            top_k=c.num_experts_per_tok,
            experts_per_layer=plan.slots_per_layer if plan is not None else None,
            policy=engine.policy if cache is not None else None,
        )
        self.writer = TraceWriter(path, header)
        self.t = 0
        self._routes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._outcomes: list[list[str]] = []
        self._inner = model.routing_observer
        model.routing_observer = self._observe

    def _observe(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        if self._inner is not None:
            self._inner(layer, experts, weights)
        if layer > 0:  # the cache's outcomes for the previous layer are final now
            self._take_outcomes()
        self._routes.append((experts.cpu(), weights.cpu()))

    def _take_outcomes(self) -> None:
        cache = self.engine.cache
        self._outcomes.append(list(cache.last_outcomes) if cache is not None else [])

    def flush(self, phase: str) -> None:
        """After a forward pass: write one line per token it ran."""
        self._take_outcomes()
        prefetcher = self.engine.model.prefetcher
        layers = range(self.engine.config.num_hidden_layers)
        predicted = [list(prefetcher.predicted.get(layer, [])) if prefetcher else [] for layer in layers]
        tokens = self._routes[0][0].shape[0] if self._routes else 0
        for i in range(tokens):
            experts = [self._routes[layer][0][i].tolist() for layer in layers]
            weights = [self._routes[layer][1][i].tolist() for layer in layers]
            decode = phase == "decode" and self.engine.cache is not None
            self.writer.write_token(
                self.t, phase, experts, weights,
                predicted=predicted if decode else None,
                outcome=self._outcomes if decode else None,
            )
            self.t += 1
        self._routes, self._outcomes = [], []

    def close(self, keep: bool = True) -> None:
        self.engine.model.routing_observer = self._inner
        if keep:
            self.writer.close()
        else:
            self.writer.discard()


class Generation:
    """One request: iterate it for ``TokenEvent``s; afterwards read tokens, text and stats."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], settings: GenerationSettings):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.tokens: list[int] = []
        self.text = ""
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self.cache_stats: CacheStats | None = None  # expert cache activity of this request
        if not self.prompt_ids:
            raise SettingError("the prompt is empty: give at least one token (BOS counts)")
        if len(self.prompt_ids) > engine.context_length:
            raise SettingError(
                f"prompt of {len(self.prompt_ids)} tokens exceeds the context length {engine.context_length}"
            )
        self._events = self._run()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def run(self) -> Generation:
        """Consume the whole generation."""
        for _ in self._events:
            pass
        return self

    def _run(self) -> Iterator[TokenEvent]:
        engine, settings, stats = self.engine, self.settings, self.stats
        sampler = Sampler(settings.sampling)
        decoder = engine.tokenizer.stream_decoder(self.prompt_ids)
        stopper = StopMatcher(settings.stop)
        eos = frozenset() if settings.ignore_eos else engine.tokenizer.eos_ids
        history = torch.tensor(self.prompt_ids, dtype=torch.int64)
        room = engine.context_length - len(self.prompt_ids)
        budget = min(settings.max_new_tokens, room)
        if budget <= 0:
            stats.stop_reason = "length" if settings.max_new_tokens <= room else "context"
            return

        cache = engine.cache
        before = cache.stats.copy() if cache is not None else None
        recorder = TraceRecorder(engine, settings.trace) if settings.trace is not None else None
        start = time.perf_counter()
        try:
            logits = engine.prefill(self.prompt_ids)
        except BaseException:
            if recorder is not None:
                recorder.close(keep=False)
            raise
        synchronize(engine.device)
        stats.prefill_seconds = time.perf_counter() - start
        if recorder is not None:
            recorder.flush("prefill")

        decode_start = time.perf_counter()
        try:
            while True:
                token = sampler(logits, history)
                self.tokens.append(token)
                stats.generated_tokens += 1
                history = torch.cat((history, torch.tensor([token])))
                reason = ""
                if token in eos:
                    reason, chunk = "eos", decoder.flush()
                else:
                    chunk = decoder.push(token)
                    if len(self.tokens) >= budget:
                        reason = "length" if len(self.tokens) >= settings.max_new_tokens else "context"
                        chunk += decoder.flush()
                text, stopped = stopper.feed(chunk)
                if stopped:
                    reason = "stop"
                elif reason:
                    text += stopper.flush()
                self.text += text
                yield TokenEvent(token, text)
                if reason:
                    stats.stop_reason = reason
                    return
                logits = engine.decode(token)
                stats.decode_steps += 1
                if recorder is not None:
                    recorder.flush("decode")
        finally:
            synchronize(engine.device)
            stats.decode_seconds = time.perf_counter() - decode_start
            if recorder is not None:
                recorder.close()
            if cache is not None:
                self.cache_stats = cache.stats.since(before)


class Engine:
    """A loaded model on one device, ready to generate."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer,
        dense: DenseWeights,
        experts: ResidentExperts | ExpertCache,
        device: torch.device,
        dtype: torch.dtype,
        context_length: int,
        plan: MemoryPlan | None = None,
        source: Checkpoint | Pack | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.context_length = context_length
        self.plan = plan  # None when every expert is resident (no cache)
        self.model_name = ""  # set by load: the path it came from
        self.policy = ""  # set by load: the --policy name when the cache is on
        self.cache = experts if isinstance(experts, ExpertCache) else None
        self._source = source  # kept open while the cache reads from it
        cache = KVCache(config, context_length, device, dtype)
        rope = RotaryTable(config, context_length, device, dtype)
        self.model = MixtralModel(config, dense, experts, cache, rope)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        context_length: int | None = None,
        progress: ProgressFn | None = None,
        vram: int | str | None = None,
        ram: int | str | None = None,
        experts_per_layer: int | None = None,
        policy: str = "auto",
        expert_format: str | None = None,
        expert_bits: int | None = None,
        attn_bits: int | None = None,
    ) -> Engine:
        """Load a Hugging Face Mixtral checkpoint directory or an offload pack.

        Every input is checked before weights are read. With no budget (``vram``, ``ram``,
        ``experts_per_layer``) every expert is resident on the device; with one, experts go
        through the expert cache. ``dtype`` (compute) defaults to an unquantized pack's own
        dtype, else bfloat16. ``expert_format`` (``offload.quant``: "int8", "nf4", ...) stores
        experts quantized; a pack's experts keep the format it was converted with.
        ``expert_bits`` / ``attn_bits`` (4, 8 or 16) pick a format by width for the experts and
        for the attention projections (``quant.format_for_bits``); embeddings, lm_head, norms
        and routers stay in the compute dtype.
        """
        if expert_format is not None and expert_bits is not None:
            raise SettingError("give --expert-format or --expert-bits, not both")
        model_dir = Path(model_dir)
        torch_device = resolve_device(device)
        requested = parse_dtype(dtype) if dtype is not None else None
        requested_format = get_format(expert_format) if expert_format is not None else None
        if policy == "auto":
            policy = default_policy(torch_device.type)
        eviction, predictor = cache_policy(policy)
        config = ModelConfig.from_dir(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        if tokenizer.vocab_size > config.vocab_size:
            raise TokenizerError(
                f"{model_dir / 'tokenizer.model'}: {tokenizer.vocab_size} pieces but the model has "
                f"only {config.vocab_size} embeddings"
            )
        if context_length is None:
            context_length = min(config.max_position_embeddings, DEFAULT_CONTEXT)
        if not 1 <= context_length <= config.max_position_embeddings:
            raise SettingError(
                f"context length {context_length} must be in [1, {config.max_position_embeddings}]"
            )
        source: Checkpoint | Pack = Pack(model_dir) if is_pack(model_dir) else Checkpoint(model_dir, config)
        try:
            torch_dtype, layout, attn_format = _weight_formats(
                source, torch_device, requested, requested_format, expert_bits, attn_bits
            )
            budgeted = vram is not None or ram is not None or experts_per_layer is not None
            dense = _load_dense(source, torch_device, torch_dtype, attn_format, progress)
            if not budgeted:
                experts = _load_resident_experts(source, layout, torch_device, torch_dtype, progress)
                source.close()
                engine = cls(config, tokenizer, dense, experts, torch_device, torch_dtype, context_length)
                engine.model_name = str(model_dir)
                return engine
            plan = plan_memory(
                config,
                layout.nbytes,
                torch_dtype,
                context_length,
                vram=None if vram is None else parse_bytes(vram, "--vram"),
                ram=None if ram is None else parse_bytes(ram, "--ram"),
                experts_per_layer=experts_per_layer,
                ram_available=_spare_ram(torch_device, config, torch_dtype),
                dense=sum(dense_bytes_by_class(config, torch_dtype, attn_format).values()),
            )
            records = source if isinstance(source, Pack) else CheckpointRecords(source, layout)
            history = spec = None
            if predictor in ("history", "combined"):
                spec = PREFETCH_POLICIES["history"]
                history = spec.make(config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok)
                eviction = ScoreEviction(history, config.num_hidden_layers, config.num_local_experts)
            cache = ExpertCache(
                records,
                layout,
                config.num_hidden_layers,
                config.num_local_experts,
                config.num_experts_per_tok,
                torch_device,
                slots_per_layer=plan.slots_per_layer,
                host_capacity=plan.host_experts,
                policy=eviction,
                progress=progress,
            )
        except BaseException:
            source.close()
            raise
        engine = cls(config, tokenizer, dense, cache, torch_device, torch_dtype, context_length, plan, source)
        engine.model_name, engine.policy = str(model_dir), policy
        if predictor == "lookahead":
            engine.model.prefetcher = Prefetcher(cache, Lookahead(config, dense), width=config.num_experts_per_tok)
        elif predictor == "history":
            engine.model.prefetcher = Prefetcher(cache, history=history, spec=spec)
        elif predictor == "combined":
            engine.model.prefetcher = Prefetcher(
                cache, Lookahead(config, dense), width=config.num_experts_per_tok, history=history, spec=spec
            )
        return engine

    def close(self) -> None:
        """Release the weight source (files stay open while the cache reads experts)."""
        if self._source is not None:
            self._source.close()
            self._source = None

    # ---- the forward steps ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the current sequence (the KV cache is reused, not reallocated)."""
        self.model.cache.reset()
        if self.model.prefetcher is not None:
            self.model.prefetcher.reset()

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Start a new sequence with ``ids``; logits [V] for the token after them."""
        if not ids:
            raise SettingError("the prompt is empty")
        if len(ids) > self.context_length:
            raise SettingError(
                f"prompt of {len(ids)} tokens exceeds the context length {self.context_length}"
            )
        self.reset()
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self.model.forward(tokens, last_only=True)[0]

    def decode(self, token: int) -> torch.Tensor:
        """Append one token to the sequence; logits [V] for the next one."""
        tokens = torch.tensor([token], dtype=torch.int64, device=self.device)
        return self.model.forward(tokens, last_only=True)[0]

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] for every position of a new sequence (used for evaluation)."""
        self.reset()
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self.model.forward(tokens)

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None) -> Generation:
        """A lazy generation: iterate it to stream, or call ``.run()``."""
        return Generation(self, prompt_ids, settings or GenerationSettings())


def _weight_formats(
    source: Checkpoint | Pack,
    device: torch.device,
    dtype: torch.dtype | None,
    expert_format: WeightFormat | None,
    expert_bits: int | None,
    attn_bits: int | None,
) -> tuple[torch.dtype, RecordLayout, WeightFormat | None]:
    """(compute dtype, expert record layout, attention format or None) for a load.

    A pack fixes its experts' format, and for unquantized packs the compute dtype too; a
    checkpoint takes ``expert_format`` or ``expert_bits``, else unquantized in the compute dtype.
    """
    config = source.config
    if isinstance(source, Pack):
        layout = source.layout
        if expert_format is not None and expert_format != layout.fmt:
            raise SettingError(
                f"--expert-format {expert_format.name}: {source.path} holds {layout.fmt.name} experts; "
                f"convert the checkpoint again with --expert-format {expert_format.name}"
            )
        dtype = dtype or (layout.dtype if layout.plain else parse_dtype(DEFAULT_DTYPE))
        if layout.plain and dtype != layout.dtype:
            raise SettingError(
                f"--dtype {str(dtype).removeprefix('torch.')}: {source.path} holds "
                f"{str(layout.dtype).removeprefix('torch.')} experts; run with that dtype "
                f"or convert the checkpoint again with --dtype"
            )
    else:
        dtype = dtype or parse_dtype(DEFAULT_DTYPE)
        if expert_bits is not None:
            I, D = config.intermediate_size, config.hidden_size
            expert_format = format_for_bits(expert_bits, dtype, device.type, ((I, D), (D, I)), "--expert-bits")
        layout = RecordLayout.for_config(config, expert_format or dtype)
    attn_format = None
    if attn_bits is not None and attn_bits != 16:
        shapes = tuple(attention_shapes(config).values())
        attn_format = format_for_bits(attn_bits, dtype, device.type, shapes, "--attn-bits")
    return dtype, layout, attn_format


def _spare_ram(device: torch.device, config: ModelConfig, dtype: torch.dtype) -> int:
    """RAM the host tier may take when no --ram is given: 80% of what is free now, less the
    dense weights when they live in RAM too (CPU device)."""
    free = int(psutil.virtual_memory().available * 0.8)
    if device.type == "cpu":
        free -= dense_bytes(config, dtype)
    return max(0, free)


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _load_dense(
    source: Checkpoint | Pack,
    device: torch.device,
    dtype: torch.dtype,
    attn_format: WeightFormat | None,
    progress: ProgressFn | None,
) -> DenseWeights:
    """Every non-expert weight on the device, in the compute dtype; the attention projections
    quantized to ``attn_format`` when one is given."""
    c = source.config
    total = 2 + c.num_hidden_layers + (0 if c.tie_word_embeddings else 1)

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    def place_attention(t: torch.Tensor) -> Matrix:
        if attn_format is None:
            return place(t)
        quantized = quantize(t, attn_format)
        return from_tensors(quantized.tensors, quantized.shape, quantized.fmt, device)

    def tick(done: int, what: str) -> None:
        if progress is not None:
            progress(done, total, what)

    embed = place(source.dense("embed_tokens"))
    norm = place(source.dense("norm"))
    lm_head = embed if c.tie_word_embeddings else place(source.dense("lm_head"))
    tick(total - c.num_hidden_layers, "embeddings")
    layers: list[LayerWeights] = []
    for layer in range(c.num_hidden_layers):
        layers.append(LayerWeights(**{
            key: (place_attention if key in ATTENTION_PROJECTIONS else place)(source.dense(key, layer))
            for key in ("input_layernorm", *ATTENTION_PROJECTIONS, "post_attention_layernorm", "router")
        }))
        tick(total - c.num_hidden_layers + layer + 1, f"layer {layer} dense weights")
    return DenseWeights(embed_tokens=embed, norm=norm, lm_head=lm_head, layers=layers)


def _load_resident_experts(
    source: Checkpoint | Pack,
    layout: RecordLayout,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None,
) -> ResidentExperts:
    """Every expert on the device, in the layout's format: the all-resident reference. Quantized
    experts are made exactly as the cache's records are (same input, same quantizer)."""
    c = source.config

    def place(w: Matrix) -> Matrix:
        if isinstance(w, QuantizedMatrix):  # from a quantized pack: its tensors, moved
            return from_tensors(w.tensors, w.shape, w.fmt, device)
        if layout.plain:
            return w.to(device=device, dtype=dtype)
        quantized = quantize(w, layout.fmt)  # the checkpoint's own tensor, as CheckpointRecords does
        return from_tensors(quantized.tensors, quantized.shape, quantized.fmt, device)

    total = c.num_hidden_layers * c.num_local_experts
    experts: list[list[ExpertWeights]] = []
    for layer in range(c.num_hidden_layers):
        row = []
        for e in range(c.num_local_experts):
            row.append(ExpertWeights(*(place(w) for w in source.expert(layer, e))))
            if progress is not None:
                progress(layer * c.num_local_experts + e + 1, total, f"layer {layer} expert {e}")
        experts.append(row)
    return ResidentExperts(experts, max_experts_per_call=c.num_experts_per_tok)
