"""`offload simulate TRACE` and `offload stats TRACE`: replay router traces, show where experts go.

Argument parsing and rich output only; the replay is ``offload.trace.simulate`` and the reading
``offload.trace.load_trace``. Words: "prefetch recall" (simulate) is the share of expert uses a
prefetch served; "prediction recall" (stats) the share of a layer's chosen experts that the
recorded predictions named before it ran; belady is the bound for demand loading only. TRACE is an engine trace (JSON Lines, ``offload-trace``), the shared
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
TABLE_WIDTH = 112  # simulate's table, printed at least this wide (unwrapped) even on a narrow console


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


BELADY_LABEL = "belady (demand-loading bound)"
BELADY_CAPTION = (
    "belady (demand-loading bound): the fewest misses of a cache that loads an expert only when a layer asks for it "
    "(Belady's offline optimum); a prefetching policy (history, transition) loads ahead of the ask and can beat it. "
    "prefetch precision: prefetched experts the layer then used / experts prefetched; prefetch recall: expert uses "
    "served by a prefetch / all uses."
)


def simulate_command(
    trace: Path = typer.Argument(..., help="A router trace: engine JSONL, shared decode JSONL or aligned JSON."),
    experts_per_layer: str = typer.Option(
        "2,3,4,5,6", "--experts-per-layer", "-k", help="Cache capacities to replay, a comma list (top-k .. all)."
    ),
    policy: str = typer.Option(
        "lru,lfu,history", "--policy", help="Policies, a comma list; belady (the demand-loading bound) is always added."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of rows, one per (policy, capacity)."),
    prefill: bool = typer.Option(False, "--prefill", help="Replay prefill tokens too (default: decode steps only)."),
) -> None:
    """Replay a router trace through per-layer expert caches: hit rate, prefetch precision and
    prefetch recall, and experts loaded per token for each policy and capacity, with belady, the
    bound for demand loading (prefetching policies can beat it)."""
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
        for name in ("policy", "hit rate", "prefetch precision", "prefetch recall", "loaded/token", "vs lru"):
            table.add_column(name, justify="left" if name == "policy" else "right", no_wrap=True)
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
                BELADY_LABEL if bound else r.policy,
                f"{r.hit_rate:.3f}",
                _fmt(r.prefetch_precision),
                _fmt(r.prefetch_recall),
                f"{r.experts_loaded_per_token:.2f}",
                ratio,
                style="dim" if bound else None,
            )
        stdout.print()
        wide = stdout if stdout.width >= TABLE_WIDTH else Console(
            highlight=False, soft_wrap=True, markup=False, width=TABLE_WIDTH, file=stdout.file
        )
        wide.print(table)
    stdout.print()
    stdout.print(BELADY_CAPTION, style="dim")


def _shade(share: float, full: float) -> str:
    """A background from dark (unused) to bright (a share of ``full`` or more)."""
    level = min(1.0, share / full)
    r, g, b = (int(30 + level * (255 - 30)), int(30 + level * (200 - 30)), int(60 + level * (40 - 60)))
    ink = "black" if level > 0.55 else "white"
    return f"{ink} on rgb({r},{g},{b})"


PREDICTION_CAPTION = (
    "prediction recall: experts a layer chose that had been predicted for it before it ran / experts it chose; "
    "prediction precision: predicted experts it then chose / experts predicted (the predictions the trace recorded)."
)


def stats_data(loaded: Trace, prefill: bool, slots: int | None) -> dict:
    """What ``offload stats`` shows, as plain data: the trace, the recorded outcomes (None when
    the trace has none), an LRU replay at ``slots`` experts per layer (None when outcomes are
    recorded and no ``slots`` was asked for; without either, the trace's own count or
    ``DEFAULT_STATS_SLOTS``) and each expert's share of its layer's uses."""
    phases = PHASES if prefill else ("decode",)
    h = loaded.header
    steps = [s for seq in loaded.sequences for s in seq.steps if s.phase in phases]
    data: dict = {
        "trace": str(loaded.path), "model": h.model, "num_layers": h.num_layers, "num_experts": h.num_experts,
        "top_k": h.top_k, "phases": list(phases), "tokens": loaded.tokens(phases), "recorded": None, "replay": None,
    }
    recorded = [s for s in steps if s.outcome is not None]
    if recorded:
        layers, total = [], Counter()
        for layer in range(h.num_layers):
            c = Counter(o for s in recorded for o in s.outcome[layer])
            total.update(c)
            recall, precision = prediction_quality(recorded, layer)
            layers.append(dict(_outcome_data(c), layer=layer, prediction_recall=recall, prediction_precision=precision))
        data["recorded"] = {"tokens": len(recorded), "layers": layers, "all": _outcome_data(total)}
    if slots is not None or not recorded:
        k = slots if slots is not None else min(max(h.experts_per_layer or DEFAULT_STATS_SLOTS, h.top_k), h.num_experts)
        result = simulate(loaded, k, "lru", prefill=prefill)
        data["replay"] = {
            "policy": "lru", "experts_per_layer": k, "uses": result.uses, "hit_rate": result.hit_rate,
            "layers": [
                {"layer": layer, "uses": uses, "hit_rate": hits / uses if uses else None}
                for layer, (uses, hits) in enumerate(zip(result.layer_uses, result.layer_hits))
            ],
        }
    shares = []
    for layer in range(h.num_layers):
        uses = Counter(e for s in steps if s.experts[layer] is not None for e in s.experts[layer])
        n = sum(uses.values())
        shares.append([uses[e] / n if n else 0.0 for e in range(h.num_experts)])
    data["shares"] = shares
    return data


def _outcome_data(c: Counter) -> dict:
    uses = sum(c[o] for o in OUTCOMES)
    resident = sum(c[o] for o in RESIDENT_OUTCOMES)
    return {"uses": uses, "hit_rate": resident / uses if uses else None, **{o: c[o] for o in OUTCOMES}}


def stats_command(
    trace: Path = typer.Argument(..., help="A router trace: engine JSONL, shared decode JSONL or aligned JSON."),
    prefill: bool = typer.Option(False, "--prefill", help="Count prefill tokens too (default: decode steps only)."),
    experts_per_layer: int | None = typer.Option(
        None, "--experts-per-layer", "-k",
        help="Replay LRU with this many experts per layer (top-k .. all), beside any recorded outcomes. "
        f"Default: only when the trace records none, at its own count or {DEFAULT_STATS_SLOTS}.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Per-layer hit rates (recorded outcomes, and an LRU replay with -k or when the trace has
    none), prediction recall and precision, and a layers x experts heat map of each expert's
    share of its layer's uses."""
    with user_errors():
        loaded = load_trace(trace)
        data = stats_data(loaded, prefill, experts_per_layer)
    if as_json:
        print(json.dumps(data))
        return
    h = loaded.header
    stdout.print(_describe(loaded, prefill), style="dim")

    recorded = data["recorded"]
    if recorded:
        table = Table(show_edge=False, pad_edge=False, title_justify="left",
                      title=f"recorded outcomes ({recorded['tokens']} tokens; hit rate counts hit + prefetched)")
        for name in ("layer", "uses", "hit rate", *OUTCOMES, "prediction recall", "prediction precision"):
            table.add_column(name, justify="right")
        for row in recorded["layers"]:
            table.add_row(str(row["layer"]), *_outcome_cells(row), _fmt(row["prediction_recall"]),
                          _fmt(row["prediction_precision"]))
        table.add_row("all", *_outcome_cells(recorded["all"]), "", "", style="bold")
        stdout.print()
        stdout.print(table)
        stdout.print(PREDICTION_CAPTION, style="dim")
    replay = data["replay"]
    if replay:
        why = "" if recorded else " (the trace records no outcomes)"
        table = Table(show_edge=False, pad_edge=False, title_justify="left",
                      title=f"LRU replay, {replay['experts_per_layer']} experts per layer{why}")
        for name in ("layer", "uses", "hit rate"):
            table.add_column(name, justify="right")
        for row in replay["layers"]:
            table.add_row(str(row["layer"]), str(row["uses"]), _fmt(row["hit_rate"]))
        table.add_row("all", str(replay["uses"]), _fmt(replay["hit_rate"]), style="bold")
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
    for layer, shares in enumerate(data["shares"]):
        cells = [Text(f" {100 * x:>2.0f} ", style=_shade(x, 2 * uniform)) for x in shares]
        heat.add_row(f"{layer} ", *cells)
    stdout.print()
    stdout.print(heat)


def _outcome_cells(row: dict) -> list[str]:
    return [str(row["uses"]), _fmt(row["hit_rate"]), *(str(row[o]) for o in OUTCOMES)]
