"""`offload trace convert SRC OUT`: the shared research traces in the engine's trace format.

Argument parsing and one summary line only; the conversion is ``offload.trace.convert_trace``
(which layers are kept, how problems are joined). It is not a recorder (``generate --trace``)
nor a simulator (``offload simulate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import user_errors
from offload.trace import convert_trace

trace_app = typer.Typer(
    help="Router traces: convert the shared Mixtral traces into the engine's format (for --replay).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@trace_app.callback()
def trace_main() -> None:
    """Router traces: convert the shared Mixtral traces into the engine's format (for --replay)."""


def _ranges(layers: tuple[int, ...]) -> str:
    """0,1,2,3,5,7,8 -> "0-3,5,7-8"."""
    parts: list[str] = []
    start = prev = None
    for x in (*layers, None):
        if x is not None and prev is not None and x == prev + 1:
            prev = x
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = x
    return ",".join(parts)


@trace_app.command("convert")
def convert_command(
    src: Path = typer.Argument(..., metavar="SRC", help="A shared trace: the decode JSONL or the aligned JSON."),
    out: Path = typer.Argument(..., metavar="OUT", help="The engine trace (JSON Lines) to write."),
    problem: Optional[int] = typer.Option(
        None, "--problem", help="Convert this problem alone. Default: every problem, concatenated in order."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (a regular file only)."),
) -> None:
    """Write SRC as one engine trace, keeping only the layers that have a record at every step
    (in every problem, when problems are concatenated); the header names the layers kept."""
    with user_errors():
        done = convert_trace(src, out, problem=problem, force=force)
    what = done.sequences[0]
    if done.concatenated:
        what = f"{' + '.join(done.sequences)} (concatenated in order into one sequence; layers complete in all)"
    print(
        f"wrote {done.path}: {done.tokens} tokens of {what}; {len(done.source_layers)} of "
        f"{done.source_num_layers} layers kept (source layers {_ranges(done.source_layers)})"
    )
