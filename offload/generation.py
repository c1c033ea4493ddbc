"""One generation request: the decode loop, stop conditions, streaming, statistics, traces.

What it is: ``Generation`` (iterate it for ``TokenEvent``s), its settings and statistics,
``StopMatcher`` for stop strings, and ``TraceRecorder`` for ``--trace``. What it is not: the
forward pass (model.py) or loading (loader.py); it drives an ``Engine``'s prefill and decode.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from offload.device import synchronize
from offload.errors import SettingError
from offload.experts.cache import CacheStats
from offload.sampling import Sampler, SamplingSettings
from offload.trace import ReplayRouting, TraceHeader, TraceWriter

if TYPE_CHECKING:
    from offload.engine import Engine


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    ignore_eos: bool = False  # keep going past EOS (benchmarks, exact-length comparisons)
    trace: Path | None = None  # write a router trace here (offload.trace format)
    trace_force: bool = False  # replace an existing trace file (a regular file only: offload.files)
    # keep the prompt's common prefix with the sequence the engine holds and prefill only the rest
    # (a chat's next turn, a server's next request); off for a request measured or traced whole
    # (a traced request prefills everything: a trace holds every position of its sequence)
    reuse_prefix: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SettingError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise SettingError("stop strings must not be empty")


class PrefillInterrupted(Exception):
    """A prefill stopped between chunks because its ``should_stop`` said so; ``done`` prompt
    tokens had run (they stay in the engine's sequence). Not an error: a user's Ctrl+C."""

    def __init__(self, done: int):
        super().__init__(f"prompt processing stopped after {done} tokens")
        self.done = done


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # prompt tokens prefilled (the prompt less reused_tokens)
    generated_tokens: int = 0
    decode_steps: int = 0  # forward passes after the prompt (the first token comes from prefill)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # eos | stop | length | context | interrupted
    reused_tokens: int = 0  # prompt tokens whose keys and values the engine held already (reuse_prefix)
    first_token_seconds: float = 0.0  # from the request's start (prefill included) to its first token

    @property
    def context_tokens(self) -> int:
        """Positions of the context this request's sequence takes: prompt and reply."""
        return self.reused_tokens + self.prompt_tokens + self.generated_tokens

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

    def __init__(self, engine: Engine, path: Path, force: bool = False):
        self.engine = engine
        model = engine.model
        c = engine.config
        plan, cache = engine.plan, engine.cache
        header = TraceHeader(
            model=str(engine.model_name),
            num_layers=c.num_moe_layers,
            num_experts=c.num_local_experts,
            top_k=c.num_experts_per_tok,
            experts_per_layer=plan.slots_per_layer if plan is not None else None,
            policy=engine.policy if cache is not None else None,
        )
        self.writer = TraceWriter(path, header, force=force)
        self.t = 0
        # per layer, the routing of each forward pass since the last flush (a prompt runs in chunks)
        self._routes: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(c.num_moe_layers)]
        self._outcomes: list[list[str]] = []
        self._inner = model.routing_observer
        model.routing_observer = self._observe

    def _observe(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        if self._inner is not None:
            self._inner(layer, experts, weights)
        if layer > 0:  # the cache's outcomes for the previous layer are final now
            self._take_outcomes()
        self._routes[layer].append((experts.cpu(), weights.cpu()))

    def _take_outcomes(self) -> None:
        cache = self.engine.cache
        self._outcomes.append(list(cache.last_outcomes) if cache is not None else [])

    def flush(self, phase: str) -> None:
        """After the forward passes of a phase (a prompt's chunks, or one decode step): write one
        line per token they ran."""
        self._take_outcomes()
        prefetcher = self.engine.model.prefetcher
        layers = range(self.engine.config.num_moe_layers)
        predicted = [list(prefetcher.predicted.get(layer, [])) if prefetcher else [] for layer in layers]
        routes = [
            (torch.cat([e for e, _ in runs]), torch.cat([w for _, w in runs])) if runs else None
            for runs in self._routes
        ]  # per layer: experts [T, K], weights [T, K]
        tokens = routes[0][0].shape[0] if routes and routes[0] is not None else 0
        for i in range(tokens):
            experts = [routes[layer][0][i].tolist() for layer in layers]
            weights = [routes[layer][1][i].tolist() for layer in layers]
            decode = phase == "decode" and self.engine.cache is not None
            self.writer.write_token(
                self.t, phase, experts, weights,
                predicted=predicted if decode else None,
                outcome=self._outcomes if decode else None,
            )
            self.t += 1
        self._routes, self._outcomes = [[] for _ in layers], []

    def close(self, keep: bool = True) -> None:
        self.engine.model.routing_observer = self._inner
        if keep:
            self.writer.close()
        else:
            self.writer.discard()


class Generation:
    """One request: iterate it for ``TokenEvent``s; afterwards read tokens, text and stats."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], settings: GenerationSettings,
                 should_stop: Callable[[], bool] | None = None):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.should_stop = should_stop  # asked between prompt chunks: True ends the request there
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
        routing = getattr(engine.model, "routing_source", None)
        if isinstance(routing, ReplayRouting):  # --replay: the trace must hold every position run
            room = engine.context_length - len(self.prompt_ids)
            routing.check_request(len(self.prompt_ids), min(settings.max_new_tokens, room))
        self._events = self._run()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def run(self) -> Generation:
        """Consume the whole generation."""
        for _ in self._events:
            pass
        return self

    def _prefill(self, reuse: bool) -> torch.Tensor:
        """Prefill the prompt (only what the engine does not hold, with ``reuse``); logits [V] for
        the first new token. Sets the prompt statistics, also when interrupted."""
        engine, stats, ids = self.engine, self.stats, self.prompt_ids
        stats.reused_tokens = engine.reusable_prefix(ids) if reuse else 0  # what prefill(reuse=True) keeps
        stats.prompt_tokens = len(ids) - stats.reused_tokens
        options = {}  # engine.prefill is the one entry point (callers and tests replace it): plain when plain
        if reuse:
            options["reuse"] = True
        if self.should_stop is not None:
            options["should_stop"] = self.should_stop
        try:
            return engine.prefill(ids, **options)
        except PrefillInterrupted as stop:
            stats.prompt_tokens = stop.done
            raise

    def _run(self) -> Iterator[TokenEvent]:
        engine, settings, stats = self.engine, self.settings, self.stats
        sampler = Sampler(settings.sampling)
        decoder = engine.tokenizer.stream_decoder(self.prompt_ids)
        stopper = StopMatcher(settings.stop)
        eos = frozenset() if settings.ignore_eos else engine.tokenizer.eos_ids
        room = engine.context_length - len(self.prompt_ids)
        budget = min(settings.max_new_tokens, room)
        # every id the sampler may look at, allocated once: the prompt, then each new token
        history = torch.empty(len(self.prompt_ids) + max(0, budget), dtype=torch.int64)
        history[: len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.int64)
        seen = len(self.prompt_ids)
        if budget <= 0:
            stats.stop_reason = "length" if settings.max_new_tokens <= room else "context"
            return

        cache = engine.cache
        before = cache.stats.copy() if cache is not None else None
        recorder = TraceRecorder(engine, settings.trace, settings.trace_force) if settings.trace is not None else None
        start = time.perf_counter()
        try:
            logits = self._prefill(reuse=settings.reuse_prefix and recorder is None)
        except BaseException as exc:
            if recorder is not None:
                recorder.close(keep=False)
            if not isinstance(exc, PrefillInterrupted):
                raise
            stats.prefill_seconds = time.perf_counter() - start
            stats.stop_reason = "interrupted"  # no token: the engine holds the chunks that ran
            return
        synchronize(engine.device)
        stats.prefill_seconds = time.perf_counter() - start
        if recorder is not None:
            recorder.flush("prefill")

        decode_start = time.perf_counter()
        try:
            while True:
                token = sampler(logits, history[:seen])
                if not self.tokens:
                    stats.first_token_seconds = time.perf_counter() - start
                self.tokens.append(token)
                stats.generated_tokens += 1
                history[seen] = token
                seen += 1
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


