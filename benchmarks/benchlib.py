"""What the benchmark scripts share: progress lines on stderr, and how a run ends."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from offload.errors import OffloadError


def timed(fn: Callable[[], object], device) -> float:
    """Seconds of one ``fn()`` on ``device`` (a torch.device), queued work finished before and after."""
    import time

    from offload.device import synchronize

    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def say(message: str) -> None:
    """A progress or error line on stderr (stdout carries only the report)."""
    print(message, file=sys.stderr, flush=True)


def finish(result: dict[str, Any], as_json: bool, print_report: Callable[[dict[str, Any]], None]) -> int:
    """Print the result as one JSON object or as the readable report; exit code 0."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


def run(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], Any],
    bench: Callable[[Any], dict[str, Any]],
    print_report: Callable[[dict[str, Any]], None],
) -> int:
    """The usual main: parse, set torch's threads (``--threads``), measure, report; a bad
    setting is one line on stderr and exit code 2."""
    import torch

    args = parse_args(argv)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    try:
        result = bench(args)
    except OffloadError as e:
        say(f"error: {e}")
        return 2
    return finish(result, args.json, print_report)
