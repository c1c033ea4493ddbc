"""`offload bench [MODEL]`: llama-bench style throughput for every combination of settings.

Argument parsing and output only; the measuring is ``offload.bench``. Every engine setting
(--prefetch-depth excepted), --profile and -p/-n take a comma list; the command runs the
Cartesian product, one load per combination, and prints one row per test (ppN, tgN) with tokens
per second as mean ± std over -r repetitions: a markdown table (-o md, default), a JSON list of
rows (-o json) or CSV (-o csv).
``-pg PP,TG`` (repeatable) adds llama-bench's combined test, a prompt of PP then TG decode
passes timed as one ((PP + TG) / seconds; given alone, without -p or -n, only those run), and
``-d N`` (a comma list) runs every test at a depth of N tokens already in the KV cache (prefilled,
not timed; rows say `` @ dN``). The table shows llama-bench's size (bytes of the weight files),
params, the weight formats that ran (experts/attention) and threads, and a ``build:`` line
after it; JSON and CSV add ``model_bytes``, ``model_params``, ``expert_format``,
``attn_format``, ``threads``, ``offload_version``, ``n_depth``, ``t_s_min``, ``t_s_max`` and
``t_s_spread`` (std / mean). ``-b/--batch-size`` (llama-bench's) sets the prompt tokens per forward
pass (the prefill chunk) and ``--kv-bits`` the KV cache's width, comma lists like the other settings,
columns when given; JSON and CSV add what ran (``batch_size_used``, ``kv_bits_used``). A row whose spread exceeds ``--spread-warn`` (default 10%) gets one
warning line on stderr, naming them all.
A progress line per combination goes to stderr. --replay TRACE (a comma list too) takes every
request's routing from a router trace; the trace then bounds the lengths as the model's context
does. -p and -n left at their defaults (512, 128) are fitted first: a default -p that does not fit
the model (or the trace) shrinks, saying so in one dim line on stderr; lengths given that do not
fit are refused, naming the flags and the limit (``offload.bench.fit_lengths``).

Each combination runs under a machine profile (``cli.common.choose_profile``): the ones --profile
names, their plans as written, or, without --profile, the best shipped profile for the
combination's device fitted to the model ("cpu-only (auto)"). Flags given win over the profile;
the settings columns show the flags as given (prefetch depth: the one that ran), the profile
column the plan under them, and the *_used columns (JSON, CSV) what the engine resolved.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

import typer

from cli.common import (
    PREFETCH_DEPTH_OPTION,
    ProfileChoice,
    choose_profile,
    engine_options,
    load_engine,
    local_model,
    model_label,
    stderr,
    user_errors,
)
from offload.bench import (
    DEFAULT_GEN_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    BenchConfig,
    BenchResult,
    LengthLimits,
    context_needed,
    fit_lengths,
    measure,
    sweep,
)
from offload.config import ModelConfig
from offload.demo import DEMO_MODEL_DIR
from offload.engine import DEFAULT_DTYPE, DTYPES
from offload.errors import SettingError
from offload.trace import ReplayRouting

OUTPUTS = ("md", "json", "csv")
# settings columns of the markdown table, shown only when they vary (or are given)
SETTING_COLUMNS = (
    ("vram", "vram"), ("ram", "ram"), ("experts_per_layer", "experts/layer"), ("policy", "policy"),
    ("prefetch_depth", "prefetch depth"), ("expert_bits", "expert bits"), ("attn_bits", "attn bits"),
    ("dtype", "dtype"), ("device", "device"), ("replay", "replay"), ("cpu_experts", "cpu experts"),
    ("kv_bits", "kv bits"), ("batch_size", "batch size"),
)
# columns of JSON rows and CSV, in order
FIELDS = (
    "model", "machine", "profile", "vram", "ram", "experts_per_layer", "policy", "prefetch_depth", "expert_bits",
    "attn_bits", "dtype", "device", "replay", "cpu_experts", "kv_bits", "batch_size", "policy_used", "dtype_used",
    "device_used", "kv_bits_used", "batch_size_used", "slots_per_layer", "host_experts",
    "n_prompt", "n_gen", "n_depth", "reps", "test", "t_s_mean", "t_s_std", "t_s_min", "t_s_max", "t_s_spread",
    "hit_rate", "cpu_share", "stall_share", "bytes_per_token",
    "model_bytes", "model_params", "expert_format", "attn_format", "threads", "offload_version",
)
DEFAULT_SPREAD_WARN = 0.10  # std / mean above which a result is called noisy


def _lengths(text: Optional[str], flag: str) -> Optional[list[int]]:
    """A comma list of token counts; None (not given) stays None."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise SettingError(f"{flag} {text!r}: expected a token count or a comma list of them, e.g. 512") from None
    if any(v < 0 for v in values):
        raise SettingError(f"{flag} {text!r}: token counts must be >= 0")
    return list(dict.fromkeys(values))


def _pairs(prompts: list[int], gens: list[int]) -> list[tuple[int, int]]:
    """(prompt, gen) pairs to run; at least one is not (0, 0)."""
    pairs = [(p, n) for p in prompts for n in gens if (p, n) != (0, 0)]
    if not pairs:
        raise SettingError("-p 0 -n 0: nothing to measure")
    return pairs


def rows_of(
    results: list[BenchResult], depth_in_name: bool, extras: Optional[list[dict[str, Any]]] = None
) -> list[dict[str, Any]]:
    """Every test row, a pp row once per (configuration, profile, prompt length); ``extras``, one
    per result, adds the fields a BenchConfig does not hold (profile, prefetch_depth)."""
    rows, seen = [], set()
    for i, r in enumerate(results):
        extra = extras[i] if extras else {}
        for row in r.rows(depth_in_name):
            row.update(extra)
            key = (r.config, tuple(sorted(extra.items())), row["test"])
            if key in seen:
                continue
            seen.add(key)
            rows.append({k: row.get(k) for k in FIELDS})
    return rows


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """llama-bench's table: model, machine, profile, size, params, weights (experts/attention),
    threads, the settings that vary (or are given), test, t/s (mean ± std), cache columns; then a
    ``build:`` line (offload's and torch's versions) after a blank line, as llama-bench ends."""
    def shown(key: str) -> bool:
        values = {row[key] for row in rows}
        if key == "prefetch_depth":  # the profile's or the flag's, 1 unless either says otherwise
            return len(values) > 1 or values - {None, 1} != set()
        return len(values) > 1 or values - {None, "auto"} != set()

    varying = [(key, title) for key, title in SETTING_COLUMNS if shown(key)]
    header = ["model", "machine", "profile", "size", "params", "weights", "threads", *(t for _, t in varying), "test",
              "t/s", "hit rate", "on CPU %", "stall %", "MiB/token"]
    align = ["---", "---", "---", "---:", "---:", "---", "---:", *("---:" for _ in varying), "---:", "---:", "---:",
             "---:", "---:", "---:"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        mib = row["bytes_per_token"]
        cells = [
            model_label(str(row["model"])),
            str(row["machine"]),
            str(row["profile"]),
            _size(row.get("model_bytes")),
            _params(row.get("model_params")),
            f"{row.get('expert_format') or '-'}/{row.get('attn_format') or '-'}",
            "-" if row.get("threads") is None else str(row["threads"]),
            *("-" if row[key] is None else _cell(key, row[key]) for key, _ in varying),
            row["test"],
            f"{row['t_s_mean']:.2f} ± {row['t_s_std']:.2f}",
            "-" if row["hit_rate"] is None else f"{row['hit_rate']:.3f}",
            _pct(row["cpu_share"]),
            _pct(row["stall_share"]),
            "-" if mib is None else f"{mib / 2**20:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    versions = sorted({str(row.get("offload_version")) for row in rows if row.get("offload_version")})
    if versions:
        import torch

        lines += ["", f"build: offload {', '.join(versions)} (torch {torch.__version__})"]
    return "\n".join(lines)


def _size(n: Optional[int]) -> str:
    """llama-bench's size column: GiB, or MiB below one GiB."""
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params(n: Optional[int]) -> str:
    """llama-bench's params column: 46.70 B, 10.17 M."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def noisy_rows(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Rows whose spread (std / mean over the repetitions) exceeds ``threshold``."""
    return [row for row in rows if row.get("t_s_spread") is not None and row["t_s_spread"] > threshold]


def spread_warning(rows: list[dict[str, Any]], threshold: float) -> Optional[str]:
    """One line naming every noisy row, or None."""
    noisy = noisy_rows(rows, threshold)
    if not noisy:
        return None
    named = ", ".join(f"{row['test']} ({row['profile']}, {100 * row['t_s_spread']:.0f}%)" for row in noisy)
    return (f"warning: {len(noisy)} result(s) spread more than {100 * threshold:.0f}% of the mean (std/mean): "
            f"{named}; more -r, or a quieter machine")


def _cell(key: str, value: Any) -> str:
    """A settings cell: the replayed trace by its file name, the rest as given."""
    return Path(value).name if key == "replay" else str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def bench_command(
    model: Optional[Path] = typer.Argument(
        None, help="A checkpoint directory (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) or offload pack. Default: the bundled demo model."
    ),
    n_prompt: Optional[str] = typer.Option(
        None, "--n-prompt", "-p",
        help=f"Prompt tokens for ppN (comma list; 0 skips pp). Default {DEFAULT_PROMPT_TOKENS}, shortened to fit.",
    ),
    n_gen: Optional[str] = typer.Option(
        None, "--n-gen", "-n", help=f"Decode passes for tgN (comma list; 0 skips tg). Default {DEFAULT_GEN_TOKENS}."
    ),
    pg: Optional[list[str]] = typer.Option(
        None, "-pg", "--pg", metavar="PP,TG",
        help="A prompt of PP tokens then TG decode passes, timed together (repeatable); alone, only these run.",
    ),
    depth: Optional[str] = typer.Option(
        None, "--depth", "-d", help="Run every test with N tokens already in the KV cache (comma list). Default 0."
    ),
    reps: int = typer.Option(3, "--repetitions", "-r", help="Measured repetitions, after one warm-up."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Device memory budgets, e.g. 4GiB,8GiB."),
    ram: Optional[str] = typer.Option(None, "--ram", help="RAM budgets for experts, e.g. 0,16GiB."),
    experts_per_layer: Optional[str] = typer.Option(
        None, "--experts-per-layer", help="Expert slots per layer on the device, e.g. 2,4,8."
    ),
    policy: Optional[str] = typer.Option(
        None, "--policy", help="Expert cache policies: auto, lru, lfu, lookahead, history, combined (comma list)."
    ),
    expert_bits: Optional[str] = typer.Option(None, "--expert-bits", help="Expert widths: 4, 8, 16 (comma list)."),
    attn_bits: Optional[str] = typer.Option(None, "--attn-bits", help="Attention widths: 4, 8, 16 (comma list)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help=f"Compute dtypes: {'|'.join(DTYPES)} (comma list; default {DEFAULT_DTYPE})."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="Devices: auto, cpu, cuda[:N] (comma list)."),
    prefetch_depth: Optional[int] = PREFETCH_DEPTH_OPTION,
    replay: Optional[str] = typer.Option(
        None, "--replay", help="Router traces (offload-trace format; comma list) whose routing replaces the routers'.",
    ),
    cpu_experts: Optional[str] = typer.Option(
        None, "--cpu-experts", help="Where misses in RAM run: auto, off, all (comma list)."
    ),
    kv_bits: Optional[str] = typer.Option(
        None, "--kv-bits", help="KV cache widths: 16 (the compute dtype), 8 (int8 with scales) (comma list)."
    ),
    batch_size: Optional[str] = typer.Option(
        None, "--batch-size", "-b", help="Prompt tokens per forward pass for ppN, e.g. 64,256 (comma list). "
        "Default: the plan's (256, smaller when the card needs it).",
    ),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="Machine profiles: shipped names or TOML paths (comma list); flags given win. "
        "Default: the best shipped profile for each device, fitted to the model.",
    ),
    output: str = typer.Option("md", "--output", "-o", help="md (markdown table), json or csv."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt."),
    spread_warn: float = typer.Option(
        DEFAULT_SPREAD_WARN, "--spread-warn", help="Warn when a result's std/mean exceeds this share (0.1 = 10%)."
    ),
) -> None:
    """Measure prompt processing (ppN) and generation (tgN) speed, as llama-bench does."""
    with user_errors():
        if output not in OUTPUTS:
            raise SettingError(f"-o {output!r}: choose one of {', '.join(OUTPUTS)}")
        if reps < 1:
            raise SettingError(f"-r {reps}: at least one repetition")
        prompts, gens = _lengths(n_prompt, "-p"), _lengths(n_gen, "-n")
        combined = [_pg(text) for text in pg or ()]
        depths = _lengths(depth, "-d") or [0]
        only_pg = bool(combined) and prompts is None and gens is None
        if not only_pg:
            _pairs(prompts or [DEFAULT_PROMPT_TOKENS], gens or [DEFAULT_GEN_TOKENS])  # -p 0 -n 0 refused first
        configs = sweep({
            "vram": vram, "ram": ram, "experts_per_layer": experts_per_layer, "policy": policy,
            "expert_bits": expert_bits, "attn_bits": attn_bits, "dtype": dtype, "device": device,
            "replay": replay, "cpu_experts": cpu_experts, "kv_bits": kv_bits, "batch_size": batch_size,
        })
        model = model or DEMO_MODEL_DIR
        limits = _at_depth(_limits(model, configs), max(depths))
        tests: list[tuple[int, int, bool]] = []  # (prompt, gen, combined)
        if not only_pg:
            prompts, gens, note = fit_lengths(prompts, gens, limits)
            if note:
                stderr.print(note, style="dim", markup=False)
            tests += [(p, n, False) for p, n in _pairs(prompts, gens)]
        for p, n in dict.fromkeys(combined):
            why = limits.why(p, n)
            if why:
                raise SettingError(f"-pg {p},{n} {why}: lower -pg")
            tests.append((p, n, True))
        pairs = [(p, n) for p, n, _ in tests]
        context = max(context_needed(p, n, d) for p, n in pairs for d in depths)
        names = _profiles(profile)
        # every profile is chosen (and a bad one refused) before anything loads
        runs = [(choice, config) for config in configs for choice in _choices(names, model, config, context)]
        results: list[BenchResult] = []
        extras: list[dict[str, Any]] = []
        for i, (choice, config) in enumerate(runs, 1):
            settings = engine_options(
                choice, **dict(config.load_kwargs(), context_length=context, prefetch_depth=prefetch_depth)
            )
            engine = load_engine(model, **settings)
            given = ", ".join(f"{k}={v}" for k, v in config.settings().items() if v not in (None, "auto")) or "defaults"
            # after the load, so that a setting the engine refuses stays the one line on stderr
            stderr.print(f"[{i}/{len(runs)}] {model_label(str(model))}: {given}; profile {choice.text}",
                         style="dim", markup=False)
            extra = {"profile": choice.label, "prefetch_depth": settings.get("prefetch_depth", 1)}
            try:
                for d in depths:
                    for p, n, both in tests:
                        results.append(measure(engine, config, p, n, reps, seed, depth=d, combined=both))
                        extras.append(extra)
            finally:
                engine.close()
        plain_prompts = {p for p, _, both in tests if not both}
        rows = rows_of(results, depth_in_name=len(plain_prompts) > 1, extras=extras)
        warning = spread_warning(rows, spread_warn)
        if warning:
            stderr.print(warning, style="yellow", markup=False)
        if output == "json":
            print(json.dumps(rows, indent=2))
        elif output == "csv":
            print(to_csv(rows), end="")
        else:
            print(markdown(rows))


def _limits(model: Path, configs: list[BenchConfig]) -> LengthLimits:
    """The model's positions and the shortest replayed trace (each trace checked against the model
    before anything loads)."""
    config = ModelConfig.from_dir(local_model(model))
    limits = LengthLimits(config.max_position_embeddings, model_label(str(model)))
    traces = [c.replay for c in configs if c.replay is not None]
    for path in dict.fromkeys(traces):
        tokens = ReplayRouting.from_file(path, config, "cpu").tokens
        if limits.replay_tokens is None or tokens < limits.replay_tokens:
            limits = LengthLimits(limits.max_positions, limits.model, tokens, f"the replayed trace {Path(path).name}")
    return limits


def _pg(text: str) -> tuple[int, int]:
    """-pg PP,TG: two token counts, both at least 1."""
    parts = text.split(",")
    try:
        p, n = (int(part) for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        p = n = None
    if p is None or n is None:
        raise SettingError(f"-pg {text!r}: expected PP,TG, two token counts, e.g. 512,128")
    if p < 1 or n < 1:
        raise SettingError(f"-pg {text!r}: both token counts must be >= 1")
    return p, n


def _at_depth(limits: LengthLimits, depth: int) -> LengthLimits:
    """The room a test has with ``depth`` positions already taken (the model's, the trace's)."""
    if depth <= 0:
        return limits
    if depth + 2 > limits.max_positions:
        raise SettingError(
            f"-d {depth}: {limits.model} allows {limits.max_positions} positions (max_position_embeddings), "
            "and a depth leaves room for at least one more token and one decode pass"
        )
    if limits.replay_tokens is not None and depth + 1 > limits.replay_tokens:
        raise SettingError(f"-d {depth}: {limits.trace} holds {limits.replay_tokens} tokens")
    return LengthLimits(
        limits.max_positions - depth, f"{limits.model} at depth {depth}",
        None if limits.replay_tokens is None else limits.replay_tokens - depth, limits.trace,
    )


def _profiles(text: Optional[str]) -> list[Optional[str]]:
    """--profile's comma list; [None] (the automatic choice) when not given."""
    if text is None:
        return [None]
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise SettingError(f"--profile {text!r}: expected a comma list of profile names or paths, without empty items")
    return list(dict.fromkeys(names))


def _choices(names: list[Optional[str]], model: Path, config: BenchConfig, context: int) -> list[ProfileChoice]:
    """The profile choice for each name under ``config`` (the automatic one fits at ``context``)."""
    return [
        choose_profile(
            name, model, device=config.device, dtype=config.dtype, context_length=context,
            expert_bits=config.expert_bits, attn_bits=config.attn_bits, vram=config.vram, ram=config.ram,
            experts_per_layer=config.experts_per_layer, kv_bits=config.kv_bits, batch_size=config.batch_size,
        )
        for name in names
    ]
