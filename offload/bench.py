"""Benchmarks in the manner of llama-bench: prompt processing (ppN) and token generation (tgN)
speed as mean ± std over repetitions, for every combination of a sweep of engine settings.

What it is: ``sweep`` (comma lists of settings -> their Cartesian product of ``BenchConfig``s),
``run_bench`` (load one configuration, warm up, measure) and ``measure`` (the same on an
engine already loaded). What it is not: a command-line tool; it never prints.

Definitions:
- ppN: N prompt tokens (the tokenizer's BOS when it has one, Mixtral's but not Qwen's, then
  seeded random ids in [3, vocab) that are no special token: ``bench_prompt``) / prefill seconds.
- tgN: N decode forward passes / their seconds. A request generates N + 1 tokens with
  ``ignore_eos``: the first comes from the prefill's logits, the other N each from one decode
  pass, as llama-bench's tg128 times 128 single-token evaluations.
- ppP+tgN (``combined``, llama-bench's ``-pg``): one request of P prompt tokens then N decode
  passes, (P + N) / (prefill + decode seconds).
- Depth D (llama-bench's ``-d``): each repetition first prefills D tokens (a ``bench_prompt``
  of D: BOS when there is one, then seeded random ids; not timed), so the timed prompt and
  decode passes run with D positions already in the KV cache; the prompt is then N random ids,
  with no BOS of its own (``random_ids``). The tg row's depth is where decoding
  starts, D + P.
- Spread: ``Measure.spread`` is std / mean; ``Measure.within_noise`` says whether two
  measures cannot be told apart (their min..max ranges overlap, or the means differ by less
  than the two standard deviations together).
- Cache numbers (when experts go through the expert cache) cover the decode part only: the
  cache's counters are copied after the prefill (``Generation`` yields its first token before
  any decode pass) and subtracted at the end. Hit rate = hits / requests; stall share = stall
  seconds / decode seconds; bytes per token = bytes moved into the device slots (from RAM or
  disk) / decode passes. Summed over the repetitions, then divided.
- One warm-up request runs first and is not counted: the numbers are for a warm cache.
- Replay (``BenchConfig.replay``, a router trace): every request takes its routing from the
  trace, position by position from its start, so the prompt and the decode passes together
  need max(1, N prompt) + N gen of the trace's tokens (``fit_lengths`` fits the defaults).
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from offload.device import device_name
from offload.engine import Engine, GenerationSettings, parse_dtype
from offload.errors import SettingError
from offload.experts.cache import CacheStats
from offload.experts.policy import POLICY_CHOICES
from offload.plan import check_kv_bits, parse_bytes
from offload.quant import BITS_CHOICES
from offload.trace import ReplayRouting

# Ids 0, 1, 2 are <unk>, <s>, </s> in Mixtral's tokenizer. In a byte-level vocabulary (Qwen, OLMoE)
# they are ordinary tokens ("!", '"', "#" in Qwen's) and skipping them changes nothing; the special
# tokens of those sit elsewhere (Qwen's after the vocabulary), and the tokenizer's ``special_ids``
# are skipped wherever they are.
FIRST_RANDOM_ID = 3
DEFAULT_PROMPT_TOKENS = 512  # pp512
DEFAULT_GEN_TOKENS = 128  # tg128


@dataclass(frozen=True)
class BenchConfig:
    """One combination of engine settings (None: the engine's default)."""

    vram: str | None = None
    ram: str | None = None
    experts_per_layer: int | None = None
    policy: str = "auto"
    expert_bits: int | None = None
    attn_bits: int | None = None
    dtype: str | None = None
    device: str = "auto"
    replay: str | None = None  # a router trace whose routing replaces the routers'
    cpu_experts: str = "auto"  # where misses in RAM run (offload.experts.cache.CPU_EXPERTS)
    kv_bits: int | None = None  # the KV cache's width: 16 or 8 (offload.plan.KV_BITS)
    batch_size: int | None = None  # prompt tokens per forward pass (llama-bench's -b); None: the plan's

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Engine.load``; ``kv_bits`` and ``batch_size`` only when given
        (left out, the engine's defaults)."""
        kwargs = asdict(self)
        for key in ("kv_bits", "batch_size"):
            if kwargs[key] is None:
                del kwargs[key]
        return kwargs

    def settings(self) -> dict[str, Any]:
        """The settings as given (every field, None where left to the default)."""
        return asdict(self)


SWEEP_OPTIONS = tuple(f.name for f in fields(BenchConfig))


def _split(name: str, value: Any) -> list[str]:
    """A comma list (str) or a sequence of values -> stripped non-empty strings."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    else:
        parts = [str(v).strip() for v in value]
    if not parts or any(not p for p in parts):
        raise SettingError(f"--{name.replace('_', '-')} {value!r}: expected a comma list without empty items")
    return parts


def _check(name: str, text: str) -> Any:
    """One value of option ``name``, checked (before any weights are read) and converted."""
    flag = f"--{name.replace('_', '-')}"
    if name in ("experts_per_layer", "expert_bits", "attn_bits", "kv_bits", "batch_size"):
        try:
            value = int(text)
        except ValueError:
            raise SettingError(f"{flag} {text!r}: expected an integer (or a comma list of them)") from None
        if name in ("experts_per_layer", "batch_size") and value < 1:
            raise SettingError(f"{flag} {value}: must be at least 1")
        if name == "kv_bits":
            check_kv_bits(value, flag)
        elif name in ("expert_bits", "attn_bits") and value not in BITS_CHOICES:
            raise SettingError(f"{flag} {value}: choose one of {', '.join(map(str, BITS_CHOICES))}")
        return value
    if name in ("vram", "ram"):
        parse_bytes(text, flag)
        return text
    if name == "policy":
        if text not in POLICY_CHOICES:
            raise SettingError(f"{flag} {text!r}: choose one of {', '.join(POLICY_CHOICES)}")
        return text
    if name == "dtype":
        parse_dtype(text)
        return text
    if name in ("device", "replay"):
        return text
    if name == "cpu_experts":
        from offload.experts.cache import CPU_EXPERTS

        if text not in CPU_EXPERTS:
            raise SettingError(f"{flag} {text!r}: choose one of {', '.join(CPU_EXPERTS)}")
        return text
    raise SettingError(f"unknown benchmark setting {name!r}")


def sweep(options: Mapping[str, str | Sequence[Any] | None]) -> list[BenchConfig]:
    """Every combination of the options (name -> comma list or sequence; None: the default),
    in the order of ``BenchConfig``'s fields, the last varying fastest. Every value is checked
    first; duplicates within one option are dropped, keeping the first."""
    unknown = set(options) - set(SWEEP_OPTIONS)
    if unknown:
        raise SettingError(f"unknown benchmark setting(s): {', '.join(sorted(unknown))}")
    axes: list[list[tuple[str, Any]]] = []
    for name in SWEEP_OPTIONS:
        value = options.get(name)
        if value is None:
            continue
        values = list(dict.fromkeys(_check(name, part) for part in _split(name, value)))
        axes.append([(name, v) for v in values])
    return [BenchConfig(**dict(combo)) for combo in itertools.product(*axes)]


@dataclass(frozen=True)
class Measure:
    """Per-repetition values (tokens per second) and their mean and sample standard deviation."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else 0.0

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def min(self) -> float:
        return min(self.values, default=0.0)

    @property
    def max(self) -> float:
        return max(self.values, default=0.0)

    @property
    def spread(self) -> float:
        """std / mean (0 for one value or a zero mean)."""
        return self.std / self.mean if self.mean > 0 else 0.0

    def within_noise(self, other: Measure) -> bool:
        """Whether this and ``other`` cannot be told apart: their min..max ranges overlap, or
        their means differ by no more than their standard deviations together. One value each
        (no spread measured) is within the noise only when equal."""
        if max(self.min, other.min) <= min(self.max, other.max):
            return True
        return abs(self.mean - other.mean) <= self.std + other.std

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "values": list(self.values)}


@dataclass
class CacheSummary:
    """Expert cache activity during the decode passes of the measured repetitions."""

    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0  # from RAM and from disk into device slots
    stall_seconds: float = 0.0
    prefetches: int = 0
    cpu_runs: int = 0  # misses run on the CPU on their RAM copy
    decode_seconds: float = 0.0
    decode_steps: int = 0

    def add(self, stats: CacheStats, decode_seconds: float, decode_steps: int) -> None:
        t = stats.total()
        self.hits += t.hits
        self.misses += t.misses
        self.cpu_runs += t.cpu_runs
        self.bytes_moved += t.bytes_moved
        self.stall_seconds += t.stall_seconds
        self.prefetches += t.prefetches
        self.decode_seconds += decode_seconds
        self.decode_steps += decode_steps

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    @property
    def cpu_share(self) -> float:
        """Expert uses run on the CPU, on their RAM copy."""
        total = self.hits + self.misses
        return self.cpu_runs / total if total else 0.0

    @property
    def stall_share(self) -> float:
        return self.stall_seconds / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), hit_rate=self.hit_rate, stall_share=self.stall_share,
                    bytes_per_token=self.bytes_per_token)


@dataclass
class BenchResult:
    """One configuration at one (prompt, generation) length: pp and tg, and the cache."""

    model: str
    machine: str  # offload.device.device_name
    config: BenchConfig
    prompt_tokens: int
    gen_tokens: int
    reps: int
    pp: Measure | None  # None when prompt_tokens == 0
    tg: Measure | None  # None when gen_tokens == 0
    cache: CacheSummary | None  # None when every expert is resident (no budget given)
    plan: str | None = None  # the memory plan, described; None without a cache
    resolved: dict[str, Any] = field(default_factory=dict)  # what "auto"/None became
    depth: int = 0  # tokens already in the KV cache when the timed prompt starts (-d)
    pg: Measure | None = None  # ppP+tgN: the whole request's tokens / seconds (-pg); pp, tg None then
    facts: dict[str, Any] = field(default_factory=dict)  # model_facts: size, params, formats, threads, version

    def rows(self, depth_in_name: bool = False) -> list[dict[str, Any]]:
        """Flat rows, one per test (pp, then tg; or the one ppP+tgN), for tables, JSON and CSV.
        A tg row names its depth (`` @ dN``, where decoding starts) when ``depth_in_name`` or
        ``depth``; pp and pg rows name a depth given."""
        base: dict[str, Any] = {"model": self.model, "machine": self.machine}
        base.update(self.facts)
        base.update(self.config.settings())
        base.update(self.resolved)
        base.update(n_prompt=self.prompt_tokens, n_gen=self.gen_tokens, n_depth=self.depth, reps=self.reps)
        cache = {
            "hit_rate": self.cache.hit_rate if self.cache else None,
            "cpu_share": self.cache.cpu_share if self.cache else None,
            "stall_share": self.cache.stall_share if self.cache else None,
            "bytes_per_token": self.cache.bytes_per_token if self.cache else None,
        }
        at = f" @ d{self.depth}" if self.depth else ""

        def row(name: str, m: Measure, extra: dict[str, Any]) -> dict[str, Any]:
            return dict(base, test=name, t_s_mean=m.mean, t_s_std=m.std, t_s_min=m.min, t_s_max=m.max,
                        t_s_spread=m.spread, t_s_values=list(m.values), **extra)

        rows = []
        if self.pg is not None:
            rows.append(row(f"pp{self.prompt_tokens}+tg{self.gen_tokens}{at}", self.pg, cache))
        if self.pp is not None:
            rows.append(row(f"pp{self.prompt_tokens}{at}", self.pp, {k: None for k in cache}))
        if self.tg is not None:
            tg_at = f" @ d{self.depth + self.prompt_tokens}" if depth_in_name or self.depth else ""
            rows.append(row(f"tg{self.gen_tokens}{tg_at}", self.tg, cache))
        return rows


def parameter_count(config: Any) -> int:
    """The model's parameters from its config (``offload.config.ModelConfig``): every dense and
    expert weight, counted by ``offload.plan.parameter_count`` from the family's tensor table."""
    from offload.plan import parameter_count as counted

    return counted(config).total


def model_bytes(model: str | Path) -> int:
    """Bytes of the model's weight files: a pack's own files, or a checkpoint's ``*.safetensors``
    (``*.bin`` when it has none)."""
    from offload.pack import is_pack, pack_files

    root = Path(model)
    if is_pack(root):
        files = [root / name for name in pack_files(root) or ()]
    else:
        files = list(root.glob("*.safetensors")) or list(root.glob("*.bin"))
    return sum(f.stat().st_size for f in files if f.is_file())


def offload_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("offload")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout
        return "unknown"


def weight_format_names(engine: Engine, config: BenchConfig | None = None) -> tuple[str | None, str | None]:
    """(experts, attention) format names that ``engine`` runs: a pack's stored formats, or a
    checkpoint's under ``config``'s bits (``offload.loader.weight_formats``); the compute dtype
    for plain weights. (None, None) when the source cannot be read again."""
    from offload.checkpoint import Checkpoint
    from offload.loader import weight_formats
    from offload.pack import Pack, is_pack

    dtype = str(engine.dtype).removeprefix("torch.")
    try:
        root = Path(engine.model_name)
        source = Pack(root) if is_pack(root) else Checkpoint(root, engine.config)
        try:
            _, layout, attn = weight_formats(
                source, engine.device, engine.dtype, None,
                config.expert_bits if config else None, config.attn_bits if config else None,
            )
        finally:
            source.close()
    except Exception:  # the facts are for display only
        return None, None
    experts = dtype if layout.plain else layout.fmt.name
    attention = dtype if attn is None or attn.kind == "plain" else attn.name
    return experts, attention


def model_facts(engine: Engine, config: BenchConfig | None = None) -> dict[str, Any]:
    """What llama-bench prints beside each row: the model's size (bytes of its weight files),
    parameter count, the weight formats that ran (experts, attention), torch's threads and this
    offload's version."""
    import torch

    experts, attention = weight_format_names(engine, config)
    return {
        "model_bytes": model_bytes(engine.model_name) if engine.model_name else None,
        "model_params": parameter_count(engine.config),
        "expert_format": experts,
        "attn_format": attention,
        "threads": torch.get_num_threads(),
        "offload_version": offload_version(),
    }


def random_ids(vocab_size: int, count: int, seed: int,
               skip: Sequence[int] | frozenset[int] | set[int] = ()) -> list[int]:
    """``count`` seeded random ids in [3, vocab), none of them in ``skip`` (the tokenizer's
    special ids): each drawn with ``random.Random(seed).randrange(3, vocab)``, drawn again while
    it is in ``skip`` (so a ``skip`` below 3, as Mixtral's, changes nothing)."""
    skipped = {i for i in skip if FIRST_RANDOM_ID <= i < vocab_size}
    if vocab_size - FIRST_RANDOM_ID - len(skipped) < 1:
        raise SettingError(f"vocabulary of {vocab_size} is too small for a random prompt")
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < count:
        i = rng.randrange(FIRST_RANDOM_ID, vocab_size)
        if i not in skipped:
            ids.append(i)
    return ids


def bench_prompt(vocab_size: int, prompt_tokens: int, seed: int, bos_id: int | None = 1,
                 skip: Sequence[int] | frozenset[int] | set[int] = ()) -> list[int]:
    """A benchmark's prompt of ``prompt_tokens`` ids: ``bos_id``, then ``prompt_tokens - 1``
    ``random_ids`` (just BOS for 0 or 1); with ``bos_id`` None (a tokenizer without one, as
    Qwen's) ``prompt_tokens`` random ids, one for 0 (a request needs a token to start from)."""
    if bos_id is None:
        return random_ids(vocab_size, max(1, prompt_tokens), seed, skip)
    return [bos_id] + random_ids(vocab_size, max(0, prompt_tokens - 1), seed, skip)


def _check_lengths(prompt_tokens: int, gen_tokens: int, reps: int) -> None:
    if prompt_tokens < 0 or gen_tokens < 0:
        raise SettingError(f"prompt and generation lengths must be >= 0, got {prompt_tokens} and {gen_tokens}")
    if prompt_tokens == 0 and gen_tokens == 0:
        raise SettingError("nothing to measure: prompt and generation lengths are both 0")
    if reps < 1:
        raise SettingError(f"repetitions must be >= 1, got {reps}")


def context_needed(prompt_tokens: int, gen_tokens: int, depth: int = 0) -> int:
    """Positions one request takes: ``depth`` tokens already there, the prompt (at least one
    token, BOS or a random id, without a depth) and gen_tokens + 1 tokens."""
    if depth > 0:
        return depth + prompt_tokens + gen_tokens + 1
    return max(1, prompt_tokens) + gen_tokens + 1


def replay_needed(prompt_tokens: int, gen_tokens: int) -> int:
    """Trace tokens one request replays: the prompt (at least one token) and one per decode pass."""
    return max(1, prompt_tokens) + gen_tokens


@dataclass(frozen=True)
class LengthLimits:
    """What bounds a benchmark's lengths: the model's positions (``max_position_embeddings``)
    and, with replay, the shortest trace's tokens; ``model`` and ``trace`` name them in messages."""

    max_positions: int
    model: str = "the model"
    replay_tokens: int | None = None
    trace: str | None = None

    def _context(self, prompt_tokens: int, gen_tokens: int) -> str:
        return (f"needs a context of {context_needed(prompt_tokens, gen_tokens)}; {self.model} allows "
                f"{self.max_positions} (max_position_embeddings)")

    def _replay(self, prompt_tokens: int, gen_tokens: int) -> str:
        needed = replay_needed(prompt_tokens, gen_tokens)
        return f"replays {needed} trace tokens; {self.trace} holds {self.replay_tokens}"

    def _trace_binds(self, gen_tokens: int) -> bool:
        """Whether the trace, not the model, sets the longest prompt."""
        return self.replay_tokens is not None and self.replay_tokens - gen_tokens < self.max_positions - gen_tokens - 1

    def why(self, prompt_tokens: int, gen_tokens: int) -> str | None:
        """Why (prompt, gen) does not fit, in words; None when it does."""
        reasons = []
        if context_needed(prompt_tokens, gen_tokens) > self.max_positions:
            reasons.append(self._context(prompt_tokens, gen_tokens))
        if self.replay_tokens is not None and replay_needed(prompt_tokens, gen_tokens) > self.replay_tokens:
            reasons.append(self._replay(prompt_tokens, gen_tokens))
        return " and ".join(reasons) or None

    def binding(self, prompt_tokens: int, gen_tokens: int) -> str:
        """Why (prompt, gen) does not fit, naming only the limit that sets the longest prompt."""
        if self._trace_binds(gen_tokens):
            return self._replay(prompt_tokens, gen_tokens)
        return self._context(prompt_tokens, gen_tokens)

    def largest_prompt(self, gen_tokens: int) -> int:
        """The longest prompt that fits with ``gen_tokens`` decode passes (< 1: none fits)."""
        largest = self.max_positions - gen_tokens - 1
        if self.replay_tokens is not None:
            largest = min(largest, self.replay_tokens - gen_tokens)
        return largest


def fit_lengths(
    prompts: Sequence[int] | None, gens: Sequence[int] | None, limits: LengthLimits
) -> tuple[list[int], list[int], str | None]:
    """The (-p, -n) lists to run, and a note when a default was changed. None: not given, the
    default (pp512, tg128). A default -p that does not fit shrinks to the longest prompt that does
    (the note says so); a length the user gave that does not fit, or a -n that leaves no room for
    even a one-token prompt, is refused naming the flags (SettingError)."""
    gen_list = list(gens) if gens is not None else [DEFAULT_GEN_TOKENS]
    prompt_list = list(prompts) if prompts is not None else [DEFAULT_PROMPT_TOKENS]

    def flags(p: int, n: int) -> str:
        return (f"-p {p}" + ("" if prompts is not None else " (the default)") + f" -n {n}"
                + ("" if gens is not None else " (the default)"))

    note = None
    if prompts is None:
        worst = max(gen_list)
        largest = limits.largest_prompt(worst)
        if largest < 1:
            raise SettingError(
                f"-n {worst}{'' if gens is not None else ' (the default)'} leaves no room for a prompt: with a "
                f"1-token prompt it {limits.binding(1, worst)}; give -n {worst + largest - 1} or less"
            )
        if any(limits.why(p, n) for p in prompt_list for n in gen_list):
            why = limits.binding(DEFAULT_PROMPT_TOKENS, worst)
            prompt_list = [largest]
            note = f"-p {largest}: pp{DEFAULT_PROMPT_TOKENS} with -n {worst} {why}; give -p to choose"
    for p in prompt_list:
        for n in gen_list:
            why = limits.why(p, n)
            if why:
                raise SettingError(f"{flags(p, n)} {why}: lower -p or -n")
    return prompt_list, gen_list, note


def load(
    model: str | Path,
    config: BenchConfig,
    context_length: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> Engine:
    """Load ``model`` with ``config``'s settings and a context of ``context_length``."""
    return Engine.load(model, context_length=context_length, progress=progress, **config.load_kwargs())


def measure(
    engine: Engine,
    config: BenchConfig,
    prompt_tokens: int,
    gen_tokens: int,
    reps: int,
    seed: int = 0,
    warmup: bool = True,
    depth: int = 0,
    combined: bool = False,
) -> BenchResult:
    """Warm up once (unless ``warmup`` is False), then time ``reps`` requests on ``engine``;
    ``depth`` tokens prefilled first in each (not timed), ``combined``: one ppP+tgN measure
    (``BenchResult.pg``) instead of pp and tg."""
    _check_lengths(prompt_tokens, gen_tokens, reps)
    if depth < 0:
        raise SettingError(f"-d {depth}: a depth must be >= 0")
    if combined and (prompt_tokens == 0 or gen_tokens == 0):
        raise SettingError(f"-pg {prompt_tokens},{gen_tokens}: both lengths must be >= 1")
    needed = context_needed(prompt_tokens, gen_tokens, depth)
    if needed > engine.context_length:
        at = f" at depth {depth}" if depth else ""
        raise SettingError(
            f"pp{prompt_tokens} + tg{gen_tokens}{at} needs {needed} positions; the engine holds {engine.context_length}"
        )
    routing = engine.model.routing_source
    replayed = replay_needed(prompt_tokens, gen_tokens) + depth - (1 if depth and prompt_tokens == 0 else 0)
    if isinstance(routing, ReplayRouting) and replayed > routing.tokens:
        raise SettingError(
            f"-p {prompt_tokens} -n {gen_tokens}{f' -d {depth}' if depth else ''} replay {replayed} trace tokens; "
            f"{routing.path} holds {routing.tokens}: lower -p or -n"
        )
    vocab = min(engine.config.vocab_size, engine.tokenizer.vocab_size)  # ids the tokenizer can decode too
    cache = engine.cache
    summary = CacheSummary() if cache is not None else None
    pp: list[float] = []
    tg: list[float] = []
    pg: list[float] = []
    bos, special = engine.tokenizer.bos_id, engine.tokenizer.special_ids  # bos None: a tokenizer without one
    if depth:
        context_ids = bench_prompt(vocab, depth, seed + 1, bos, special)  # the sequence's start: BOS if any
        ids = random_ids(vocab, prompt_tokens, seed, special)  # a continuation: no BOS mid-sequence
    else:
        ids = bench_prompt(vocab, prompt_tokens, seed, bos, special)
    # with gen_tokens == 0: one token from the prefill, no decode pass
    settings = GenerationSettings(max_new_tokens=gen_tokens + 1, ignore_eos=True)
    for rep in range(reps + (1 if warmup else 0)):
        if depth:
            prefill_s, decode_s, steps, after_prefill = _timed_at_depth(engine, context_ids, ids, gen_tokens)
        else:
            generation = engine.generate(ids, settings)
            after_prefill = None
            for i, _ in enumerate(generation):
                if i == 0 and cache is not None:  # first token: prefill done, no decode pass yet
                    after_prefill = cache.stats.copy()
            s = generation.stats
            prefill_s, decode_s, steps = s.prefill_seconds, s.decode_seconds, s.decode_steps
        if steps != gen_tokens:  # pragma: no cover - ignore_eos and a checked context
            raise SettingError(f"expected {gen_tokens} decode passes, ran {steps}")
        if warmup and rep == 0:
            continue
        pp.append(prompt_tokens / prefill_s if prefill_s > 0 else 0.0)
        tg.append(gen_tokens / decode_s if decode_s > 0 else 0.0)
        total = prefill_s + decode_s
        pg.append((prompt_tokens + gen_tokens) / total if total > 0 else 0.0)
        if summary is not None and after_prefill is not None:
            summary.add(cache.stats.since(after_prefill), decode_s, steps)
    resolved = {"policy_used": engine.policy or None, "dtype_used": str(engine.dtype).removeprefix("torch."),
                "device_used": str(engine.device)}
    resolved["batch_size_used"] = engine.prefill_chunk
    resolved["kv_bits_used"] = getattr(engine.model.cache, "bits", 16)
    if engine.plan is not None:
        resolved["slots_per_layer"] = engine.plan.slots_per_layer
        resolved["host_experts"] = engine.plan.host_experts
    return BenchResult(
        model=str(engine.model_name),
        machine=device_name(engine.device),
        config=config,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        reps=reps,
        pp=Measure(tuple(pp)) if prompt_tokens > 0 and not combined else None,
        tg=Measure(tuple(tg)) if gen_tokens > 0 and not combined else None,
        cache=summary if gen_tokens > 0 else None,
        plan=engine.plan.describe() if engine.plan is not None else None,
        resolved=resolved,
        depth=depth,
        pg=Measure(tuple(pg)) if combined else None,
        facts=model_facts(engine, config),
    )


def _timed_at_depth(
    engine: Engine, context_ids: list[int], ids: list[int], gen_tokens: int
) -> tuple[float, float, int, Any]:
    """One request at a depth: ``context_ids`` prefilled (not timed), then ``ids`` timed as a
    continuation (in chunks of ``engine.prefill_chunk``), then ``gen_tokens`` greedy decode
    passes. (prompt seconds, decode seconds, decode passes, cache counters after the prompt)."""
    import torch

    from offload.device import synchronize

    logits = engine.prefill(context_ids)
    synchronize(engine.device)
    start = time.perf_counter()
    chunk = engine.prefill_chunk
    for first in range(0, len(ids), chunk):
        tokens = torch.tensor(ids[first : first + chunk], dtype=torch.int64, device=engine.device)
        logits = engine.model.forward(tokens, last_only=True)[0]
    token = int(torch.argmax(logits))
    synchronize(engine.device)
    prefill_s = time.perf_counter() - start
    after_prefill = engine.cache.stats.copy() if engine.cache is not None else None
    start = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(torch.argmax(engine.decode(token)))
    synchronize(engine.device)
    return prefill_s, time.perf_counter() - start, gen_tokens, after_prefill


def run_bench(
    model: str | Path,
    config: BenchConfig,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    reps: int = 3,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> BenchResult:
    """Load ``model`` once with ``config`` (context sized to the test, as llama-bench does),
    warm up once, then measure ``reps`` repetitions of ppN and tgN."""
    _check_lengths(prompt_tokens, gen_tokens, reps)
    engine = load(model, config, context_needed(prompt_tokens, gen_tokens), progress)
    try:
        return measure(engine, config, prompt_tokens, gen_tokens, reps, seed)
    finally:
        engine.close()


__all__ = [
    "BenchConfig", "BenchResult", "CacheSummary", "LengthLimits", "Measure", "SWEEP_OPTIONS",
    "bench_prompt", "context_needed", "fit_lengths", "load", "measure", "model_bytes", "model_facts",
    "offload_version", "parameter_count", "random_ids", "replay_needed", "run_bench", "sweep",
]
