"""What every command shares: the stderr console, one-line errors, and the progress bar."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from offload.engine import DEFAULT_DTYPE, DTYPES, Engine
from offload.errors import OffloadError
from offload.quant import FORMATS

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

USER_ERROR_EXIT = 2

ProgressFn = Callable[[int, int, str], None]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn engine errors into one clear line on stderr and exit code 2."""
    try:
        yield
    except OffloadError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(USER_ERROR_EXIT) from None


@contextmanager
def progress_bar(verb: str, name: str) -> Iterator[Optional[ProgressFn]]:
    """A transient progress bar on stderr when it is a terminal; yields the callback (or None)."""
    if not stderr.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(f"{verb} {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(name, total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{name}: {what}")

        yield progress


# Options every engine command takes (generate, chat), declared once.
DTYPE_OPTION = typer.Option(
    None,
    "--dtype",
    help=f"Compute dtype: {'|'.join(DTYPES)} (default {DEFAULT_DTYPE}; for a pack, the pack's own dtype).",
)
DEVICE_OPTION = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu or cuda[:N].")
CONTEXT_OPTION = typer.Option(None, "--context", help="Context length to allocate (default: min(model maximum, 4096)).")
VRAM_OPTION = typer.Option(
    None, "--vram", help="Device memory budget (e.g. 6GiB): dense weights, KV cache, then expert slots."
)
RAM_OPTION = typer.Option(
    None, "--ram", help="RAM budget for experts (e.g. 16GiB); 0 reads every miss from disk. Default: all."
)
EXPERTS_PER_LAYER_OPTION = typer.Option(
    None, "--experts-per-layer", help="Expert slots per layer on the device (top-k .. all), instead of --vram."
)
POLICY_OPTION = typer.Option(
    "auto",
    "--policy",
    help="Expert cache policy: lru, lfu, lookahead (LRU + gate look-ahead prefetch), history "
    "(router-history prefetch and eviction), combined (both), or auto: combined on CUDA, lru on CPU.",
)
EXPERT_FORMAT_OPTION = typer.Option(
    None,
    "--expert-format",
    help=f"Quantize experts: {'|'.join(FORMATS)} (default: unquantized, in the compute dtype; "
    "a pack keeps the format it was converted with).",
)
EXPERT_BITS_OPTION = typer.Option(
    None, "--expert-bits", help="Expert weights in 4 (nf4), 8 (int8) or 16 bits (unquantized)."
)
ATTN_BITS_OPTION = typer.Option(None, "--attn-bits", help="Attention projections in 4, 8 or 16 bits (default 16).")


def load_engine(model: Path, **settings) -> Engine:
    """``Engine.load`` with a progress bar on stderr when it is a terminal."""
    with progress_bar("loading", Path(model).name) as progress:
        return Engine.load(model, progress=progress, **settings)

PROFILE_OPTION = typer.Option(
    None,
    "--profile",
    help="A machine profile: a shipped name (see profiles/) or a TOML path; flags given explicitly win.",
)


def engine_options(profile: Optional[str], **flags) -> dict:
    """``load_engine``'s settings: a profile's plan, overridden by every flag the user gave (a
    flag at its default, None or "auto", counts as not given)."""
    from offload.profile import engine_kwargs, load_profile

    settings = engine_kwargs(load_profile(profile)) if profile else {}
    if "context_length" in settings:  # a machine's context is a ceiling: a model may allow less
        settings["max_context"] = settings.pop("context_length")
    settings.setdefault("device", "auto")
    settings.setdefault("context_length", None)
    for key, value in flags.items():
        if value is not None and value != "auto":
            settings[key] = value
        else:
            settings.setdefault(key, value)
    return settings
