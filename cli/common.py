"""What every command shares: the stderr console, one-line errors, and the progress bar."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from offload.errors import OffloadError

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
