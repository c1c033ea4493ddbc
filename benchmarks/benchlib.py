"""What the benchmark scripts share: progress lines on stderr, and how a run ends."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable


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
