"""Router traces: record, load, convert, replay; a cache simulator with the Belady bound.

What it is: the engine's compact trace format (a writer and a reader), readers for the shared
research traces of real Mixtral-8x7B routing, ``convert_trace`` (a shared trace -> the engine's
format, layers that line up only), ``ReplayRouting`` (an engine trace as the model's routing,
``--replay``), and ``simulate``, which replays a trace through per-layer caches of k experts
under a policy (LRU, LFU, Belady's offline optimum for demand loading, which a prefetching
policy can beat, or a prefetching policy from ``offload.experts.predict``) and counts hits,
loads, prefetch precision and prefetch recall. What it is not: the
engine's cache (no bytes move here) or a predictor.

The engine's format, JSON Lines (one object per line; weights rounded to 4 decimals)::

    {"format": "offload-trace", "version": 1, "model": str, "num_layers": N, "num_experts": E,
     "top_k": K, "experts_per_layer": int | null, "policy": str | null,
     "source": str | null, "source_layers": [int] | null, "source_sequences": [str] | null}
                                                                           <- the header
    {"t": 0, "phase": "prefill" | "decode",
     "experts":   [[K expert ids] per layer],
     "weights":   [[K gate weights] per layer],
     "predicted": [[ids predicted for that layer before it ran] per layer],   (lists may be empty)
     "outcome":   [["hit" | "prefetched" | "late" | "miss" | "cpu" per chosen expert] per layer]}
                                                                           (outcome may be absent)

One file is one token sequence: the simulator starts it with empty caches. The ``source*``
fields (optional; absent or null in a recording) say what a converted file came from: the source
file, which of its layers became layers 0, 1, ... here, and which of its sequences, in order.

The shared traces (``../shared/traces/README.md``) come in two shapes, both read here:
- the decode JSONL, one record per (problem, layer, step). Its recorder dropped steps whose two
  gates tied and renumbered the rest per layer, so within a layer the order is right but across
  layers steps line up only where a layer lost nothing. ``load_trace`` keeps one sequence per
  problem, packs each layer's records in order (a layer with drops ends with ``None``), and
  names the layers that line up in ``TokenSequence.aligned_layers``; ``Trace.aligned`` is False.
- the aligned JSON of one problem, ``prefill[token][layer]`` and ``decode[step][layer]``, with
  an explicit ``null`` where a record was dropped: every layer lines up.

Simulation rules (those of the shared README): each sequence starts with empty caches; a step
asks for its K experts of a layer together, and none of them may evict another; a layer with no
record at a step asks for nothing. Decode steps only unless prefill is asked for (prefill is then
replayed token by token, which the engine's expert-major prefill does not do). A request's
experts are served in ascending id, as the engine's MoE block asks its cache for them.

Replay (``ReplayRouting``): sequence position p takes the trace's token p, in file order,
whatever phase it was recorded in, so a prompt of P tokens consumes tokens 0..P-1.

What the readers guarantee (``load_trace`` and the three formats): the file must be a regular
file of at most ``TRACE_MAX_BYTES``, UTF-8; every malformed input (not JSON, nested too deep, a
number too long, a field missing or of the wrong type or range) is an OffloadError naming the
file, the line where there is one, and the field. The sizes a trace claims are checked before
anything is built from them: at most ``MAX_TRACE_LAYERS`` layers and ``MAX_TRACE_EXPERTS``
experts, layers x experts^2 at most ``MAX_TRACE_CELLS`` (the router-history table the simulator
keeps; DeepSeek-V3's 61 x 256^2 is 4M), and, in the shared decode JSONL, whose layers and expert
count come from the largest ids seen, at most ``SPARSE_FACTOR`` step slots per record (a few
records cannot claim a huge, empty layers x steps table). So ``stats`` and ``simulate`` do work
bounded by the file's size, whatever its header says.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from offload.errors import OffloadError, SettingError
from offload.files import AtomicFile, check_file

if TYPE_CHECKING:
    import torch

    from offload.config import ModelConfig

FORMAT = "offload-trace"
VERSION = 1
PHASES = ("prefill", "decode")
OUTCOMES = ("hit", "prefetched", "late", "miss", "cpu")  # cpu: a miss run on its RAM copy
RESIDENT_OUTCOMES = ("hit", "prefetched")  # the expert was in its slot when the layer ran
WEIGHT_DECIMALS = 4

# The shared traces, next to the repository (never copied into it).
SHARED_TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces"
MIXTRAL_DECODE = SHARED_TRACES / "mixtral-8x7b-instruct" / "humaneval_p0_p1_decode.jsonl"
MIXTRAL_ALIGNED = SHARED_TRACES / "mixtral-8x7b-instruct" / "humaneval_p0_aligned_prefill_decode.json"

Experts = tuple[int, ...]

# What a trace may claim (see the module docstring): far above any released MoE model.
TRACE_MAX_BYTES = 2**30
MAX_TRACE_LAYERS = 1024
MAX_TRACE_EXPERTS = 1024
MAX_TRACE_CELLS = 2**24
SPARSE_FACTOR = 64


# ---- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceHeader:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    experts_per_layer: int | None = None  # the engine's slots per layer when it recorded
    policy: str | None = None  # the engine's policy when it recorded
    source: str | None = None  # a converted trace: the file it came from
    source_layers: tuple[int, ...] | None = None  # ... the source layer of each layer here
    source_sequences: tuple[str, ...] | None = None  # ... the source sequences, concatenated in order

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, **asdict(self)}
        for key in ("source_layers", "source_sequences"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


@dataclass
class Step:
    """One token: per layer, the chosen experts (None: no record) and what the engine saw."""

    t: int
    phase: str
    experts: list[Experts | None]
    weights: list[tuple[float, ...] | None]
    predicted: list[Experts] | None = None  # per layer; None when the trace has no predictions
    outcome: list[tuple[str, ...]] | None = None  # per layer; None when not recorded


@dataclass
class TokenSequence:
    """Tokens that share one cache history (a generation, a problem)."""

    name: str
    steps: list[Step]
    aligned_layers: frozenset[int]  # layers whose entry at step i is really token i's
    problem: int | None = None  # the shared traces' problem id, when it has one

    def layer_requests(self, layer: int, phases: Iterable[str] = ("decode",)) -> list[Experts]:
        keep = set(phases)
        return [s.experts[layer] for s in self.steps if s.phase in keep and s.experts[layer] is not None]


@dataclass
class Trace:
    path: Path
    source: str  # "offload" | "jsonl" (the shared decode JSONL) | "aligned-json"
    header: TraceHeader
    sequences: list[TokenSequence]

    @property
    def num_layers(self) -> int:
        return self.header.num_layers

    @property
    def num_experts(self) -> int:
        return self.header.num_experts

    @property
    def top_k(self) -> int:
        return self.header.top_k

    @property
    def aligned(self) -> bool:
        """True when every layer's step i is token i in every sequence (cross-layer use is valid)."""
        everything = frozenset(range(self.num_layers))
        return all(s.aligned_layers == everything for s in self.sequences)

    def tokens(self, phases: Iterable[str] = ("decode",)) -> int:
        keep = set(phases)
        return sum(1 for s in self.sequences for step in s.steps if step.phase in keep)


# ---- the engine's writer -------------------------------------------------------------------


class TraceWriter:
    """Writes the engine's trace to ``path`` under the rule of ``offload.files`` (an
    ``AtomicFile``): an existing ``path`` is refused unless ``force`` (and then only a regular
    file is replaced), the lines go to a temporary sibling, and ``close()`` renames it into place:
    a crash or a failed write (a full disk) leaves no half-written trace, and a failure is one
    ``OutputError`` line naming the path.

    Use as a context manager; an exception inside the block discards the file."""

    def __init__(self, path: str | os.PathLike, header: TraceHeader | Mapping[str, Any], *, force: bool = False):
        self.path = Path(path)
        if not isinstance(header, TraceHeader):
            fields = {k: v for k, v in header.items() if k not in ("format", "version")}
            for key in ("source_layers", "source_sequences"):
                if fields.get(key) is not None:
                    fields[key] = tuple(fields[key])
            header = TraceHeader(**fields)
        self.header = header
        self._file = AtomicFile(self.path, force=force, what="trace")
        self._line(header.to_dict())
        self.tokens = 0

    def _line(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")  # an OutputError discards the file

    def write_token(
        self,
        t: int,
        phase: str,
        experts: Sequence[Sequence[int]],
        weights: Sequence[Sequence[float]],
        predicted: Sequence[Sequence[int]] | None = None,
        outcome: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """One token, all layers: ``experts[layer]`` its K ids, ``weights[layer]`` their gates,
        ``predicted[layer]`` the ids the predictor named before the layer ran, ``outcome[layer]``
        what each chosen expert was (hit, prefetched, late, miss). Lists or tensors' ``tolist()``."""
        h = self.header
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {PHASES}")
        if len(experts) != h.num_layers or len(weights) != h.num_layers:
            raise ValueError(f"expected {h.num_layers} layers of experts and weights")
        if any(len(row) != h.top_k for row in experts):
            raise ValueError(f"expected {h.top_k} experts per layer")
        if predicted is not None and len(predicted) != h.num_layers:
            raise ValueError(f"expected {h.num_layers} layers of predictions")
        record: dict[str, Any] = {
            "t": int(t),
            "phase": phase,
            "experts": [[int(e) for e in row] for row in experts],
            "weights": [[round(float(w), WEIGHT_DECIMALS) for w in row] for row in weights],
            "predicted": [[int(e) for e in row] for row in predicted] if predicted is not None else [],
        }
        if outcome is not None:
            if len(outcome) != h.num_layers:
                raise ValueError(f"expected {h.num_layers} layers of outcomes")
            record["outcome"] = [[str(o) for o in row] for row in outcome]
        self._line(record)
        self.tokens += 1

    def close(self) -> Path:
        """Make the trace appear under its name (once; after a discard, nothing happens)."""
        if not self._file.closed:
            self._file.commit()
        return self.path

    def discard(self) -> None:
        self._file.discard()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


# ---- readers -----------------------------------------------------------------------------------


class _Where:
    """Builds one-line errors that name the file and line."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, line: int | None, what: str) -> OffloadError:
        at = f"{self.path}:{line}" if line is not None else f"{self.path}"
        return OffloadError(f"{at}: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_text(x: Any) -> bool:
    """A str that is valid Unicode (JSON's "\\ud800" escapes make lone surrogates, which cannot be printed)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _expert_row(row: Any, top_k: int, num_experts: int) -> Experts | str:
    """The row as a tuple, or the reason it is wrong."""
    if not isinstance(row, list) or len(row) != top_k:
        return f"expected a list of {top_k} expert ids"
    if not all(_is_int(e) and 0 <= e < num_experts for e in row):
        return f"expert ids must be integers in [0, {num_experts})"
    if len(set(row)) != len(row):
        return "an expert is chosen twice"
    return tuple(row)


def _weight_row(row: Any, top_k: int) -> tuple[float, ...] | str:
    if not isinstance(row, list) or len(row) != top_k or not all(_is_number(w) for w in row):
        return f"expected a list of {top_k} gate weights"
    return tuple(float(w) for w in row)


def _read_text(path: Path) -> str:
    """The trace file's text: a regular file of at most TRACE_MAX_BYTES, UTF-8."""
    try:
        if path.is_dir():
            raise OffloadError(f"{path}: is a folder, expected a trace file")
        if not path.is_file():
            if path.exists() or path.is_symlink():
                raise OffloadError(f"{path}: not a regular file, expected a trace file")
            raise OffloadError(f"{path}: no such trace file")
        with open(path, "rb") as f:
            data = f.read(TRACE_MAX_BYTES + 1)
    except OSError as exc:
        raise OffloadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # an embedded NUL in the path
        raise OffloadError(f"{path}: cannot read ({exc})") from None
    if len(data) > TRACE_MAX_BYTES:
        raise OffloadError(f"{path}: larger than {TRACE_MAX_BYTES} bytes, more than a trace is read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OffloadError(f"{path}: not a text file (byte {exc.start} is not UTF-8; expected JSON Lines or JSON)") from None


def _json(text: str) -> Any:
    """json.loads; ValueError (with a short reason) for anything it refuses, RecursionError included."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValueError(str(exc)) from None


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace: the engine's JSONL, the shared decode JSONL, or the shared aligned JSON."""
    path = Path(path)
    where = _Where(path)
    text = _read_text(path)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise where.error(None, "empty file, expected a trace")
    try:
        head = _json(lines[first])
    except ValueError:
        head = None
    if isinstance(head, dict) and head.get("format") == FORMAT:
        return _load_offload(where, lines)
    if isinstance(head, dict) and "problem_id" in head and "layer" in head:
        return _load_decode_jsonl(where, lines)
    try:
        whole = _json(text)
    except ValueError as exc:
        if head is None:  # neither JSON Lines nor one JSON document
            raise where.error(first + 1, f"not JSON ({exc})") from None
        whole = None  # JSON Lines, but not of a kind read here
    if isinstance(whole, dict) and "decode" in whole and "num_layers" in whole:
        return _load_aligned_json(where, whole)
    raise where.error(
        first + 1,
        f"not a trace: expected a header with \"format\": \"{FORMAT}\", the shared decode JSONL "
        "or the shared aligned JSON",
    )


def _check_shape(where: _Where, line: int | None, what: str, layers: Any, experts: Any, top_k: Any) -> None:
    """The sizes a trace claims: positive integers within the limits of the module docstring."""
    for key, value in (("num_layers", layers), ("num_experts", experts), ("top_k", top_k)):
        if not _is_int(value) or value < 1:
            raise where.error(line, f"{what}{key!r} must be a positive integer")
    if layers > MAX_TRACE_LAYERS:
        raise where.error(line, f"{what}'num_layers' {layers}: more than the {MAX_TRACE_LAYERS} layers a trace may have")
    if experts > MAX_TRACE_EXPERTS:
        raise where.error(line, f"{what}'num_experts' {experts}: more than the {MAX_TRACE_EXPERTS} experts a trace may have")
    if top_k > experts:
        raise where.error(line, f"{what}top_k {top_k} exceeds num_experts {experts}")
    if layers * experts * experts > MAX_TRACE_CELLS:
        raise where.error(
            line, f"{what}{layers} layers x {experts} experts: layers x experts^2 is more than the {MAX_TRACE_CELLS} "
            "a trace may have (the simulator's router-history table)"
        )


def _parse_header(where: _Where, obj: dict) -> TraceHeader:
    version = obj.get("version")
    if not _is_int(version) or version < 1:
        raise where.error(1, "header: \"version\" must be a positive integer")
    if version > VERSION:
        raise where.error(1, f"trace format version {version} is newer than this reader's ({VERSION})")
    _check_shape(where, 1, "header: ", obj.get("num_layers"), obj.get("num_experts"), obj.get("top_k"))
    if not _is_text(obj.get("model")):
        raise where.error(1, "header: \"model\" must be a string")
    slots = obj.get("experts_per_layer")
    if slots is not None and (not _is_int(slots) or not 1 <= slots <= obj["num_experts"]):
        raise where.error(1, f"header: \"experts_per_layer\" must be an integer in [1, {obj['num_experts']}] or null")
    policy = obj.get("policy")
    if policy is not None and not _is_text(policy):
        raise where.error(1, "header: \"policy\" must be a string or null")
    source = obj.get("source")  # the optional fields of a converted trace
    if source is not None and not _is_text(source):
        raise where.error(1, "header: \"source\" must be a string or null")
    layers = obj.get("source_layers")
    if layers is not None:
        if (
            not isinstance(layers, list)
            or len(layers) != obj["num_layers"]
            or not all(_is_int(x) and x >= 0 for x in layers)
        ):
            raise where.error(
                1, f"header: \"source_layers\" must be a list of {obj['num_layers']} layer numbers or null"
            )
        layers = tuple(layers)
    names = obj.get("source_sequences")
    if names is not None:
        if not isinstance(names, list) or not all(_is_text(x) for x in names):
            raise where.error(1, "header: \"source_sequences\" must be a list of names or null")
        names = tuple(names)
    return TraceHeader(
        obj["model"], obj["num_layers"], obj["num_experts"], obj["top_k"], slots, policy, source, layers, names
    )


def _json_lines(where: _Where, lines: list[str]):
    """(line number, object) for each non-blank line, each a JSON object."""
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = _json(raw)
        except ValueError as exc:
            raise where.error(n, f"not JSON ({exc}); a truncated or damaged trace") from None
        if not isinstance(obj, dict):
            raise where.error(n, "expected a JSON object")
        yield n, obj


def _load_offload(where: _Where, lines: list[str]) -> Trace:
    header: TraceHeader | None = None
    steps: list[Step] = []
    for n, obj in _json_lines(where, lines):
        if header is None:
            header = _parse_header(where, obj)
            continue
        steps.append(_parse_token(where, n, obj, header))
    assert header is not None
    everything = frozenset(range(header.num_layers))
    return Trace(where.path, "offload", header, [TokenSequence(where.path.stem, steps, everything)])


def _parse_token(where: _Where, n: int, obj: dict, h: TraceHeader) -> Step:
    def fail(what: str) -> OffloadError:
        return where.error(n, what)

    t, phase = obj.get("t"), obj.get("phase")
    if not _is_int(t):
        raise fail("\"t\" must be an integer token index")
    if phase not in PHASES:
        raise fail(f"\"phase\" must be one of {', '.join(PHASES)}")

    def per_layer(key: str) -> list:
        value = obj.get(key)
        if not isinstance(value, list) or len(value) != h.num_layers:
            raise fail(f"{key!r} must be a list of {h.num_layers} layers")
        return value

    experts, weights = [], []
    for layer, (row, wrow) in enumerate(zip(per_layer("experts"), per_layer("weights"))):
        e = _expert_row(row, h.top_k, h.num_experts)
        if isinstance(e, str):
            raise fail(f"experts of layer {layer}: {e}")
        w = _weight_row(wrow, h.top_k)
        if isinstance(w, str):
            raise fail(f"weights of layer {layer}: {w}")
        experts.append(e)
        weights.append(w)
    predicted = None
    raw_predicted = obj.get("predicted", [])
    if raw_predicted:
        predicted = []
        for layer, row in enumerate(per_layer("predicted")):
            if not isinstance(row, list) or not all(_is_int(e) and 0 <= e < h.num_experts for e in row):
                raise fail(f"predicted of layer {layer}: expected a list of expert ids in [0, {h.num_experts})")
            predicted.append(tuple(row))
    elif not isinstance(raw_predicted, list):
        raise fail("\"predicted\" must be a list")
    outcome = None
    if "outcome" in obj:
        outcome = []
        for layer, row in enumerate(per_layer("outcome")):
            if not isinstance(row, list) or len(row) != h.top_k or not all(o in OUTCOMES for o in row):
                raise fail(f"outcome of layer {layer}: expected {h.top_k} of {', '.join(OUTCOMES)}")
            outcome.append(tuple(row))
    return Step(t, phase, experts, weights, predicted, outcome)


def _load_decode_jsonl(where: _Where, lines: list[str]) -> Trace:
    """The shared decode JSONL: one record per (problem, layer, step), steps renumbered per layer."""
    # problem -> layer -> [(token_idx, experts, weights)]
    problems: dict[int, dict[int, list[tuple[int, Experts, tuple[float, ...], int]]]] = {}
    top_k: int | None = None
    max_expert = 0
    records = 0
    for n, obj in _json_lines(where, lines):
        for key in ("problem_id", "layer", "token_idx"):
            if not _is_int(obj.get(key)) or obj[key] < 0:
                raise where.error(n, f"{key!r} must be a non-negative integer")
        if obj["layer"] >= MAX_TRACE_LAYERS:
            raise where.error(n, f"'layer' {obj['layer']}: a trace may have at most {MAX_TRACE_LAYERS} layers")
        row = obj.get("experts")
        if top_k is None:
            if not isinstance(row, list) or not row or len(row) > MAX_TRACE_EXPERTS:
                raise where.error(n, "\"experts\": expected a non-empty list of expert ids")
            top_k = len(row)  # the first record sets top-k
        e = _expert_row(row, top_k, MAX_TRACE_EXPERTS)  # the number of experts: the largest id seen, plus one
        if isinstance(e, str):
            raise where.error(n, f"\"experts\": {e}")
        records += 1
        w = _weight_row(obj.get("gating_probs"), len(e))
        if isinstance(w, str):
            raise where.error(n, f"\"gating_probs\": {w}")
        max_expert = max(max_expert, *e)
        problems.setdefault(obj["problem_id"], {}).setdefault(obj["layer"], []).append((obj["token_idx"], e, w, n))
    if not problems:
        raise where.error(None, "no records")
    num_layers = 1 + max(layer for layers in problems.values() for layer in layers)
    num_experts = max(max_expert + 1, top_k)
    _check_shape(where, None, "records: ", num_layers, num_experts, top_k)
    cells = num_layers * sum(max(len(r) for r in layers.values()) for layers in problems.values())
    if cells > SPARSE_FACTOR * records + 4096:
        raise where.error(
            None, f"{records} records claim {num_layers} layers x {cells // num_layers} steps; a trace this sparse "
            f"(more than {SPARSE_FACTOR} empty slots per record) is refused"
        )
    sequences = []
    for pid in sorted(problems):
        layers = problems[pid]
        for layer, records in layers.items():
            records.sort(key=lambda r: r[0])
            for (a, *_), (b, *_, n) in zip(records, records[1:]):
                if a == b:
                    raise where.error(n, f"problem {pid} layer {layer}: token_idx {a} appears twice")
        length = max(len(r) for r in layers.values())
        # A layer that lost a record is shorter: its records still come in order, but its i-th
        # record is not the i-th token's. Layers of full length line up (README: "no drop").
        aligned = frozenset(layer for layer in range(num_layers) if len(layers.get(layer, ())) == length)
        steps = []
        for i in range(length):
            experts: list[Experts | None] = []
            weights: list[tuple[float, ...] | None] = []
            for layer in range(num_layers):
                records = layers.get(layer, [])
                experts.append(records[i][1] if i < len(records) else None)
                weights.append(records[i][2] if i < len(records) else None)
            steps.append(Step(i, "decode", experts, weights))
        sequences.append(TokenSequence(f"problem {pid}", steps, aligned, pid))
    assert top_k is not None
    header = TraceHeader(f"shared decode trace ({where.path.name})", num_layers, num_experts, top_k)
    return Trace(where.path, "jsonl", header, sequences)


def _load_aligned_json(where: _Where, obj: dict) -> Trace:
    _check_shape(where, None, "", obj.get("num_layers"), obj.get("num_experts"), obj.get("top_k"))
    model = obj.get("model", where.path.name)
    if not _is_text(model):
        raise where.error(None, "\"model\" must be a string")
    header = TraceHeader(model, obj["num_layers"], obj["num_experts"], obj["top_k"])
    steps: list[Step] = []
    for phase in PHASES:
        rows = obj.get(phase, [])
        if not isinstance(rows, list):
            raise where.error(None, f"{phase!r} must be a list of tokens")
        for i, row in enumerate(rows):
            at = f"{phase}[{i}]"
            if not isinstance(row, list) or len(row) != header.num_layers:
                raise where.error(None, f"{at}: expected {header.num_layers} layers")
            experts: list[Experts | None] = []
            weights: list[tuple[float, ...] | None] = []
            for layer, entry in enumerate(row):
                if entry is None:
                    experts.append(None)
                    weights.append(None)
                    continue
                if not isinstance(entry, dict):
                    raise where.error(None, f"{at}[{layer}]: expected {{\"experts\", \"gating_probs\"}} or null")
                e = _expert_row(entry.get("experts"), header.top_k, header.num_experts)
                if isinstance(e, str):
                    raise where.error(None, f"{at}[{layer}] experts: {e}")
                w = _weight_row(entry.get("gating_probs"), header.top_k)
                if isinstance(w, str):
                    raise where.error(None, f"{at}[{layer}] gating_probs: {w}")
                experts.append(e)
                weights.append(w)
            steps.append(Step(len(steps), phase, experts, weights))
    problem = obj.get("problem_id") if _is_int(obj.get("problem_id")) else None
    name = f"problem {problem}" if problem is not None else where.path.stem
    sequence = TokenSequence(name, steps, frozenset(range(header.num_layers)), problem)
    return Trace(where.path, "aligned-json", header, [sequence])


# ---- converting the shared traces ----------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    """What ``convert_trace`` wrote: one token sequence in the engine's format."""

    path: Path
    tokens: int
    source_layers: tuple[int, ...]  # the source layer of output layer 0, 1, ...
    source_num_layers: int
    sequences: tuple[str, ...]  # the source sequences, concatenated in this order

    @property
    def concatenated(self) -> bool:
        return len(self.sequences) > 1


def complete_layers(sequence: TokenSequence) -> list[int]:
    """The layers of ``sequence`` that line up across layers and have a record at every step."""
    return [
        layer
        for layer in sorted(sequence.aligned_layers)
        if all(step.experts[layer] is not None for step in sequence.steps)
    ]


def convert_trace(
    src: str | os.PathLike, out: str | os.PathLike, *, problem: int | None = None, force: bool = False
) -> Converted:
    """Write the shared trace ``src`` (the decode JSONL or the aligned JSON) to ``out`` in the
    engine's format, one token sequence: the problem ``problem``, or, when None, every problem
    of ``src`` concatenated in order. Only layers that line up at every kept step are written
    (``complete_layers``; with several problems, those complete in all of them): output layer j
    is the j-th such source layer, and the header names them (``source_layers``). An existing
    ``out`` is refused unless ``force`` (and then only a regular file is replaced); the file
    appears whole or not at all (``TraceWriter``, ``offload.files``)."""
    src, out = Path(src), Path(out)
    trace = load_trace(src)
    if trace.source == "offload":
        raise OffloadError(f"{src}: already in the engine's trace format; nothing to convert")
    sequences = trace.sequences
    if problem is not None:
        sequences = [s for s in trace.sequences if s.problem == problem]
        if not sequences:
            held = ", ".join(str(s.problem) for s in trace.sequences if s.problem is not None) or "none"
            raise SettingError(f"--problem {problem}: {src} holds no such problem (problems: {held})")
    sequences = [s for s in sequences if s.steps]
    if not sequences:
        raise OffloadError(f"{src}: no tokens to convert")
    kept = set(range(trace.num_layers))
    for seq in sequences:
        kept &= set(complete_layers(seq))
    layers = sorted(kept)
    if not layers:
        names = ", ".join(s.name for s in sequences)
        hint = "; convert one problem at a time with --problem ID" if len(sequences) > 1 else ""
        raise OffloadError(f"{src}: no layer has a record at every step of {names}{hint}")
    check_file(out, force, "trace")  # refused before anything is written; TraceWriter checks again
    if out.resolve() == src.resolve():
        raise OffloadError(f"{out}: is the source trace itself; write the conversion elsewhere")
    header = TraceHeader(
        trace.header.model, len(layers), trace.num_experts, trace.top_k,
        source=str(src), source_layers=tuple(layers), source_sequences=tuple(s.name for s in sequences),
    )
    t = 0
    with TraceWriter(out, header, force=force) as writer:
        for seq in sequences:
            for step in seq.steps:
                writer.write_token(
                    t, step.phase, [step.experts[layer] for layer in layers], [step.weights[layer] for layer in layers]
                )
                t += 1
    return Converted(out, t, tuple(layers), trace.num_layers, tuple(s.name for s in sequences))


# ---- replay: a trace as the model's routing ------------------------------------------------


class ReplayRouting:
    """The experts and gate weights of an engine trace as the model's routing (``--replay``):
    ``MixtralModel.routing_source``. Sequence position p takes the trace's token p (file order,
    whatever phase it was recorded in), layer l the trace's layer l (a trace of more layers than
    the model gives its first ones). Gate weights, rounded to 4 decimals in the file, are
    renormalised per token to sum to 1 in fp32 where the model's family renormalises its top-k
    (``norm_topk_prob``: Mixtral); elsewhere (Qwen2-MoE, OLMoE) they are taken as recorded.

    The whole trace is on the device from the start, layer-major, so ``route`` only slices."""

    def __init__(self, path: str | os.PathLike, experts: torch.Tensor, weights: torch.Tensor):
        self.path = Path(path)
        self.experts = experts  # [L, N, K] int64
        self.weights = weights  # [L, N, K] fp32, rows sum to 1 where the family renormalises
        self.tokens = int(experts.shape[1])

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: ModelConfig, device: torch.device | str) -> ReplayRouting:
        """Read an engine trace and check it against the model (``config``) in one line each:
        at least the model's layers, its expert count and its top-k."""
        return cls.from_trace(load_trace(path), config, device)

    @classmethod
    def from_trace(cls, trace: Trace, config: ModelConfig, device: torch.device | str) -> ReplayRouting:
        import torch

        path = trace.path
        if trace.source != "offload":
            raise OffloadError(
                f"{path}: --replay reads the engine's trace format; convert this shared trace first: "
                f"offload trace convert {path} OUT"
            )
        L, E, K = config.num_moe_layers, config.num_local_experts, config.num_experts_per_tok
        h = trace.header
        problems = []
        if h.num_layers < L:
            problems.append(f"{h.num_layers} layers, fewer than the model's {L}")
        if h.num_experts != E:
            problems.append(f"{h.num_experts} experts per layer, the model has {E}")
        if h.top_k != K:
            problems.append(f"top-{h.top_k} routing, the model routes top-{K}")
        if problems:
            raise SettingError(f"{path}: cannot replay on this model: the trace has {'; '.join(problems)}")
        steps = [step for seq in trace.sequences for step in seq.steps]
        if not steps:
            raise SettingError(f"{path}: the trace holds no tokens to replay")
        for i, step in enumerate(steps):
            if step.t != i:
                raise SettingError(f"{path}: token {i} of the file says t={step.t}; expected 0, 1, 2, ... in order")
        experts = torch.tensor([[step.experts[layer] for step in steps] for layer in range(L)], dtype=torch.int64)
        weights = torch.tensor([[step.weights[layer] for step in steps] for layer in range(L)], dtype=torch.float32)
        # experts, weights [L, N, K]
        sums = weights.sum(dim=-1, keepdim=True)  # [L, N, 1]
        bad = (weights < 0).any(dim=-1, keepdim=True) | ~(sums > 0)
        if bad.any():
            layer, token, _ = (int(x) for x in bad.nonzero()[0])
            raise SettingError(
                f"{path}: token {token} layer {layer}: gate weights must be >= 0 with a positive sum, "
                f"got {steps[token].weights[layer]}"
            )
        if config.norm_topk_prob:
            weights = weights / sums
        return cls(path, experts.to(device), weights.to(device))

    def route(self, layer: int, start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [T, K] int64 and weights [T, K] fp32 of positions start .. start+T-1 (views)."""
        end = start + tokens
        if end > self.tokens:
            raise OffloadError(
                f"{self.path}: the replayed trace holds {self.tokens} tokens (positions 0..{self.tokens - 1}); "
                f"position {end - 1} asked for"
            )
        return self.experts[layer, start:end], self.weights[layer, start:end]

    def check_request(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, before anything runs, a request whose positions the trace does not hold: a
        prompt of P tokens and N new tokens take P + N - 1 positions (the last token is not run)."""
        needed = prompt_tokens + max_new_tokens - 1 if max_new_tokens > 0 else 0
        if needed <= self.tokens:
            return
        if prompt_tokens > self.tokens:
            raise SettingError(
                f"--replay {self.path}: the trace holds {self.tokens} tokens and the prompt alone takes "
                f"{prompt_tokens}; shorten the prompt"
            )
        raise SettingError(
            f"--replay {self.path}: the trace holds {self.tokens} tokens; a {prompt_tokens}-token prompt and "
            f"{max_new_tokens} new tokens need {needed}: lower -n/--max-tokens to {self.tokens - prompt_tokens + 1} "
            "or less"
        )


# ---- the simulator -------------------------------------------------------------------------


@dataclass
class SimResult:
    policy: str
    experts_per_layer: int
    tokens: int  # steps replayed (all sequences)
    uses: int  # expert uses: K per layer per step with a record
    hits: int  # uses found resident (a prefetch in time included)
    demand_loads: int  # misses
    prefetch_loads: int = 0
    prefetch_used: int = 0  # prefetched experts that their layer used at that token
    prefetching: bool = False
    layer_uses: list[int] = field(default_factory=list)
    layer_hits: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def loads(self) -> int:
        return self.demand_loads + self.prefetch_loads

    @property
    def experts_loaded_per_token(self) -> float:
        return self.loads / self.tokens if self.tokens else 0.0

    @property
    def prefetch_precision(self) -> float | None:
        if not self.prefetching:
            return None
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0

    @property
    def prefetch_recall(self) -> float | None:
        """Expert uses that a prefetch served (prefetched for that token and used) / all uses."""
        if not self.prefetching:
            return None
        return self.prefetch_used / self.uses if self.uses else 0.0

    def layer_hit_rates(self) -> list[float]:
        return [h / u if u else 0.0 for h, u in zip(self.layer_hits, self.layer_uses)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "experts_per_layer": self.experts_per_layer,
            "hit_rate": self.hit_rate,
            "experts_loaded_per_token": self.experts_loaded_per_token,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "tokens": self.tokens,
            "uses": self.uses,
            "hits": self.hits,
            "demand_loads": self.demand_loads,
            "prefetch_loads": self.prefetch_loads,
            "prefetch_used": self.prefetch_used,
        }


DEMAND_POLICIES = ("lru", "lfu", "belady")


def policy_names() -> list[str]:
    from offload.experts.predict import PREFETCH_POLICIES

    return [*DEMAND_POLICIES, *PREFETCH_POLICIES]


def simulate(
    trace: Trace,
    experts_per_layer: int,
    policy: str = "lru",
    *,
    prefill: bool = False,
) -> SimResult:
    """Replay ``trace`` through per-layer caches of ``experts_per_layer`` slots under ``policy``:
    "lru", "lfu" (offload.experts.policy, as the engine's cache runs them), "belady" (demand
    loading, evict the expert whose next use is farthest: the bound for demand loading only; a
    prefetching policy loads before the ask and can beat it), or a prefetching policy of
    offload.experts.predict (e.g. "history")."""
    from offload.experts.predict import PREFETCH_POLICIES

    if not trace.top_k <= experts_per_layer <= trace.num_experts:
        raise OffloadError(
            f"experts per layer must be in [{trace.top_k}, {trace.num_experts}] (top-k to all), got {experts_per_layer}"
        )
    phases = PHASES if prefill else ("decode",)
    if policy in ("lru", "lfu"):
        return _simulate_demand(trace, experts_per_layer, policy, phases)
    if policy == "belady":
        return _simulate_belady(trace, experts_per_layer, phases)
    if policy in PREFETCH_POLICIES:
        return _simulate_prefetch(trace, experts_per_layer, policy, phases)
    raise OffloadError(f"policy {policy!r}: choose one of {', '.join(policy_names())}")


def _new_result(trace: Trace, policy: str, k: int, phases: Sequence[str]) -> SimResult:
    n = trace.num_layers
    return SimResult(policy, k, trace.tokens(phases), 0, 0, 0, layer_uses=[0] * n, layer_hits=[0] * n)


def _simulate_demand(trace: Trace, k: int, name: str, phases: Sequence[str]) -> SimResult:
    """LRU / LFU with the engine's own policy classes and ExpertCache.get's order of events."""
    from offload.experts.policy import make_policy

    result = _new_result(trace, name, k, phases)
    for seq in trace.sequences:
        policy = make_policy(name, trace.num_layers, trace.num_experts)  # fresh per sequence
        for layer in range(trace.num_layers):
            resident: set[int] = set()
            hits = uses = 0
            for request in seq.layer_requests(layer, phases):
                uses += len(request)
                hits += _serve(resident, request, k, layer, policy)
            _count(result, layer, uses, hits)
    return result


def _simulate_belady(trace: Trace, k: int, phases: Sequence[str]) -> SimResult:
    """Demand loading; on a miss with a full cache evict the resident expert (not asked for by this
    request) whose next request is farthest away, never-again first; ties by expert id."""
    result = _new_result(trace, "belady", k, phases)
    for seq in trace.sequences:
        for layer in range(trace.num_layers):
            requests = seq.layer_requests(layer, phases)
            # next_use[i][e]: the first request after i that asks for e (len(requests): never)
            never = len(requests)
            next_use: list[dict[int, int]] = [{} for _ in requests]
            upcoming: dict[int, int] = {}
            for i in range(len(requests) - 1, -1, -1):
                next_use[i] = dict(upcoming)
                for e in requests[i]:
                    upcoming[e] = i
            resident: set[int] = set()
            hits = uses = 0
            for i, request in enumerate(requests):
                uses += len(request)
                hits += _serve(resident, request, k, layer, _Farthest(next_use[i], never))
            _count(result, layer, uses, hits)
    return result


def _serve(resident: set[int], request: Sequence[int], k: int, layer: int, policy) -> int:
    """One layer's request against a cache of ``k`` experts, as ``ExpertCache.get`` serves it:
    the experts in ascending id (the engine's MoE block asks for them so, whatever the router's
    order), each in turn used, then a hit or a load; a load into a full cache evicts the policy's
    victim among the experts this request does not ask for. Returns the hits."""
    hits = 0
    for expert in sorted(request):
        policy.use(layer, expert)
        if expert in resident:
            hits += 1
            continue
        if len(resident) == k:
            resident.remove(policy.victim(layer, (e for e in resident if e not in request)))
        resident.add(expert)
    return hits


class _Farthest:
    """Belady's victim: the expert whose next request is farthest away (never again first),
    ties by expert id; ``next_use`` maps expert -> index of its next request."""

    def __init__(self, next_use: dict[int, int], never: int):
        self.next_use, self.never = next_use, never

    def use(self, layer: int, expert: int) -> None:
        pass

    def victim(self, layer: int, candidates) -> int:
        return max(candidates, key=lambda e: (self.next_use.get(e, self.never), -e))


def _count(result: SimResult, layer: int, uses: int, hits: int) -> None:
    result.uses += uses
    result.hits += hits
    result.demand_loads += uses - hits
    result.layer_uses[layer] += uses
    result.layer_hits[layer] += hits


def _simulate_prefetch(trace: Trace, k: int, name: str, phases: Sequence[str]) -> SimResult:
    """Token by token, layer by layer, as the engine runs: before layer L (right after layer L-1's
    routing, or at the token's start for layer 0) prefetch into L's cache the experts whose score
    clears the threshold, at most m, evicting the lowest-scored; then serve L's request (a miss
    evicts the lowest-scored expert that the request does not ask for); then tell the predictor."""
    from offload.experts.predict import PREFETCH_POLICIES, ScoreEviction, select_prefetch

    spec = PREFETCH_POLICIES[name]
    predictor = spec.make(trace.num_layers, trace.num_experts, trace.top_k)
    result = _new_result(trace, name, k, phases)
    result.prefetching = spec.max_prefetch > 0
    keep = set(phases)
    n = trace.num_layers
    set_aligned = getattr(predictor, "set_aligned_layers", None)
    if set_aligned is None and not trace.aligned:
        raise OffloadError(
            f"{trace.path}: layers do not line up, and predictor {predictor.name!r} cannot be told which do"
        )
    for seq in trace.sequences:
        predictor.reset()
        if set_aligned is not None:
            set_aligned(seq.aligned_layers)
        resident: list[set[int]] = [set() for _ in range(n)]
        evict = ScoreEviction(predictor, n, trace.num_experts)
        for step in seq.steps:
            if step.phase not in keep:
                continue
            predictor.begin_token()
            for layer in range(n):
                request = step.experts[layer]
                if request is None:  # the layer ran, but the trace does not say how: skip it
                    continue
                cache = resident[layer]
                scores = predictor.scores(layer)
                fetched = select_prefetch(scores, cache, k, spec.threshold, spec.max_prefetch, evict.last_use[layer])
                result.prefetch_loads += len(fetched)
                result.prefetch_used += sum(1 for e in request if e in fetched)
                predictor.observe(layer, request)  # from now on its scores rate the next token's layer
                _count(result, layer, len(request), _serve(cache, request, k, layer, evict))
    return result


def prediction_quality(steps: Sequence[Step], layer: int) -> tuple[float | None, float | None]:
    """(prediction recall, prediction precision) of the predictions a trace recorded for
    ``layer`` (``offload stats``; not ``SimResult.prefetch_recall``): the share of the
    experts the layer chose that had been predicted before it ran, and the share of predicted
    experts it then chose. None where nothing was chosen or predicted."""
    chosen = predicted = both = 0
    for step in steps:
        if not step.predicted or step.experts[layer] is None:
            continue
        guess = set(step.predicted[layer])
        picks = set(step.experts[layer])
        if not guess:
            continue
        chosen += len(picks)
        predicted += len(guess)
        both += len(picks & guess)
    return (both / chosen if chosen else None, both / predicted if predicted else None)
