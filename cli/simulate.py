"""`offload simulate TRACE` and `offload stats TRACE`: replay router traces, show where experts go.

Argument parsing and rich output only; the replay is ``offload.trace.simulate`` and the reading
``offload.trace.load_trace``. TRACE is an engine trace (JSON Lines, ``offload-trace``), the shared
decode JSONL, or the shared aligned JSON of real Mixtral-8x7B routing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.common import user_errors
from offload.errors import SettingError
from offload.trace import (
    OUTCOMES,
    PHASES,
    RESIDENT_OUTCOMES,
    Trace,
    load_trace,
    policy_names,
    prediction_quality,
    simulate,
)

stdout = Console(highlight=False, soft_wrap=True, markup=False)

DEFAULT_STATS_SLOTS = 4


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SettingError(f"{option} {text!r}: expected a comma list of integers, e.g. 2,3,4") from None
    if not values:
        raise SettingError(f"{option} {text!r}: expected at least one integer")
    return sorted(set(values))


def _policies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = policy_names()
    for name in names:
        if name not in known:
            raise SettingError(f"--policy {name!r}: choose among {', '.join(known)}")
    if not names:
        raise SettingError("--policy: name at least one policy")
    names = list(dict.fromkeys(n for n in names if n != "belady"))
    return names + ["belady"]  # the bound, always last


def _describe(trace: Trace, prefill: bool) -> str:
    phases = PHASES if prefill else ("decode",)
    h = trace.header
    line = (
        f"{trace.path.name}: {h.model}; {h.num_layers} layers, {h.num_experts} experts, top-{h.top_k}; "
        f"{len(trace.sequences)} sequence(s), {trace.tokens(phases)} {'tokens' if prefill else 'decode steps'}"
    )
    if not trace.aligned:
        pairs = sum(
            sum(1 for layer in range(1, h.num_layers) if {layer - 1, layer} <= s.aligned_layers)
            for s in trace.sequences
        )
        line += (
            f". Layers do not line up across layers here; cross-layer prediction uses only the {pairs} "
            f"pairs of consecutive layers that do"
        )
    return line


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def simulate_command(
    trace: Path = typer.Argument(..., help="A router trace: engine JSONL, shared decode JSONL or aligned JSON."),
    experts_per_layer: str = typer.Option(
        "2,3,4,5,6", "--experts-per-layer", "-k", help="Cache capacities to replay, a comma list (top-k .. all)."
    ),
    policy: str = typer.Option(
        "lru,lfu,history", "--policy", help="Policies, a comma list; the Belady bound is always added."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of rows, one per (policy, capacity)."),
    prefill: bool = typer.Option(False, "--prefill", help="Replay prefill tokens too (default: decode steps only)."),
) -> None:
    """Replay a router trace through per-layer expert caches: hit rate, prefetch precision and
    recall, and experts loaded per token for each policy and capacity, with the Belady bound."""
    with user_errors():
        capacities = _int_list(experts_per_layer, "--experts-per-layer")
        names = _policies(policy)
        loaded = load_trace(trace)
        rows = [simulate(loaded, k, name, prefill=prefill) for k in capacities for name in names]
    if as_json:
        print(json.dumps([r.to_dict() for r in rows]))
        return
    stdout.print(_describe(loaded, prefill), style="dim")
    for k in capacities:
        table = Table(title=f"{k} experts per layer", title_justify="left", show_edge=False, pad_edge=False)
        for name in ("policy", "hit rate", "precision", "recall", "loaded/token", "vs lru"):
            table.add_column(name, justify="left" if name == "policy" else "right")
        at_k = [r for r in rows if r.experts_per_layer == k]
        lru = next((r for r in at_k if r.policy == "lru"), None)
        for r in at_k:
            ratio = (
                f"{r.experts_loaded_per_token / lru.experts_loaded_per_token:.2f}x"
                if lru is not None and lru.experts_loaded_per_token
                else "-"
            )
            bound = r.policy == "belady"
            table.add_row(
                "belady (bound)" if bound else r.policy,
                f"{r.hit_rate:.3f}",
                _fmt(r.prefetch_precision),
                _fmt(r.prefetch_recall),
                f"{r.experts_loaded_per_token:.2f}",
                ratio,
                style="dim" if bound else None,
            )
        stdout.print()
        stdout.print(table)


def _shade(share: float, full: float) -> str:
    """A background from dark (unused) to bright (a share of ``full`` or more)."""
    level = min(1.0, share / full)
    r, g, b = (int(30 + level * (255 - 30)), int(30 + level * (200 - 30)), int(60 + level * (40 - 60)))
    ink = "black" if level > 0.55 else "white"
    return f"{ink} on rgb({r},{g},{b})"


def stats_command(
    trace: Path = typer.Argument(..., help="A router trace: engine JSONL, shared decode JSONL or aligned JSON."),
    prefill: bool = typer.Option(False, "--prefill", help="Count prefill tokens too (default: decode steps only)."),
) -> None:
    """Per-layer hit rates (recorded outcomes, or an LRU replay when the trace has none) and a
    layers x experts heat map of each expert's share of its layer's uses."""
    with user_errors():
        loaded = load_trace(trace)
    phases = PHASES if prefill else ("decode",)
    h = loaded.header
    steps = [s for seq in loaded.sequences for s in seq.steps if s.phase in phases]
    stdout.print(_describe(loaded, prefill), style="dim")

    recorded = [s for s in steps if s.outcome is not None]
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("uses", justify="right")
    table.add_column("hit rate", justify="right")
    if recorded:
        title = f"recorded outcomes ({len(recorded)} tokens; hit rate counts hit + prefetched)"
        for name in (*OUTCOMES, "predicted recall", "precision"):
            table.add_column(name, justify="right")
        counts = [Counter(o for s in recorded for o in s.outcome[layer]) for layer in range(h.num_layers)]
        total: Counter = Counter()
        for layer, c in enumerate(counts):
            total.update(c)
            recall, precision = prediction_quality(recorded, layer)
            table.add_row(str(layer), *_outcome_cells(c), _fmt(recall), _fmt(precision))
        table.add_row("all", *_outcome_cells(total), "", "", style="bold")
    else:
        k = min(max(h.experts_per_layer or DEFAULT_STATS_SLOTS, h.top_k), h.num_experts)
        title = f"LRU replay, {k} experts per layer (the trace records no outcomes)"
        result = simulate(loaded, k, "lru", prefill=prefill)
        for layer, (uses, hits) in enumerate(zip(result.layer_uses, result.layer_hits)):
            table.add_row(str(layer), str(uses), _fmt(hits / uses if uses else None))
        table.add_row("all", str(result.uses), _fmt(result.hit_rate), style="bold")
    table.title, table.title_justify = title, "left"
    stdout.print()
    stdout.print(table)

    uniform = 1 / h.num_experts
    heat = Table(
        title=f"share of each layer's uses, per expert (%; uniform {100 * uniform:.3g}, brightest at twice that)",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        padding=(0, 0),
    )
    heat.add_column("layer", justify="right")
    for e in range(h.num_experts):
        heat.add_column(f" {e:>2} ", justify="center")
    for layer in range(h.num_layers):
        uses = Counter(e for s in steps if s.experts[layer] is not None for e in s.experts[layer])
        n = sum(uses.values())
        shares = [uses[e] / n if n else 0.0 for e in range(h.num_experts)]
        cells = [Text(f" {100 * x:>2.0f} ", style=_shade(x, 2 * uniform)) for x in shares]
        heat.add_row(f"{layer} ", *cells)
    stdout.print()
    stdout.print(heat)


def _outcome_cells(c: Counter) -> list[str]:
    uses = sum(c[o] for o in OUTCOMES)
    resident = sum(c[o] for o in RESIDENT_OUTCOMES)
    return [str(uses), _fmt(resident / uses if uses else None), *(str(c[o]) for o in OUTCOMES)]
