"""One line of numbers after a request, the same for ``chat`` and ``generate``.

What it is: ``stats_line`` (the line, from a generation's statistics and what the caller knows:
load time, context, peak memory) and ``peak_memory`` (the figure and its label for a device).
What it is not: a printer (callers print the line, dim, on stderr) or a per-layer table
(``offload generate --stats`` and chat's ``/stats`` give those).

The line, fields left out when unknown::

    load 1.52 s | first token 0.041 s | prompt 24 tok (312 reused) 610.2 t/s | generation 64 tok 88.1 t/s
    | ctx 400/4096 | hit rate 0.812, 0.25 MiB/tok | peak RSS 512 MiB | stop: length
"""

from __future__ import annotations

import sys
from typing import Optional

import psutil
import torch

from offload.device import peak_memory_bytes
from offload.experts.cache import CacheStats
from offload.generation import GenerationStats

MIB = 2**20
SHOWN_STOPS = ("interrupted", "length", "context")  # eos and stop strings are the usual ends: not shown


def peak_memory(device: torch.device) -> tuple[str, int]:
    """(label, bytes): the peak allocated on a CUDA device; on a CPU the process's peak resident
    set where the OS reports one (``peak RSS``), else its resident set now (``RSS``)."""
    peak = peak_memory_bytes(device)
    if peak is not None:
        return "peak", peak
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return "peak RSS", maxrss if sys.platform == "darwin" else maxrss * 1024
    except (ImportError, OSError, ValueError):
        return "RSS", psutil.Process().memory_info().rss


def _prompt_part(stats: GenerationStats) -> str:
    reused = f" ({stats.reused_tokens} reused)" if stats.reused_tokens else ""
    return f"prompt {stats.prompt_tokens} tok{reused} {stats.prompt_tokens_per_s:.1f} t/s"


def _cache_part(stats: GenerationStats, cache_stats: Optional[CacheStats]) -> str:
    if cache_stats is None:
        return "experts resident"
    total = cache_stats.total()
    moved = total.bytes_moved / max(1, stats.generated_tokens) / MIB
    on_cpu = f" ({total.cpu_runs / total.requests:.0%} of uses run on the CPU in place)" if total.cpu_runs else ""
    return f"hit rate {total.hit_rate:.3f}{on_cpu}, {moved:.2f} MiB/tok"


def stats_line(
    stats: GenerationStats,
    cache_stats: Optional[CacheStats] = None,
    *,
    load_seconds: Optional[float] = None,
    context_length: Optional[int] = None,
    context_used: Optional[int] = None,
    peak: Optional[tuple[str, int]] = None,
) -> str:
    """The line for one request: ``load_seconds`` when the model was loaded for it (the first
    reply of a chat), time to first token, prompt tokens prefilled (and reused) and their rate,
    tokens generated and their rate, ``ctx USED/LENGTH`` (used: ``stats.context_tokens`` unless
    given), the expert cache's hit rate and MiB moved per generated token (``cache_stats``; None:
    every expert resident), ``peak`` memory (``peak_memory(device)``), and the stop reason when it
    is not the usual one. A pure function of its arguments."""
    parts = []
    if load_seconds is not None:
        parts.append(f"load {load_seconds:.2f} s")
    if stats.generated_tokens:
        parts.append(f"first token {stats.first_token_seconds:.3f} s")
    parts.append(_prompt_part(stats))
    parts.append(f"generation {stats.generated_tokens} tok {stats.generation_tokens_per_s:.1f} t/s")
    if context_length is not None:
        used = stats.context_tokens if context_used is None else context_used
        parts.append(f"ctx {used}/{context_length}")
    parts.append(_cache_part(stats, cache_stats))
    if peak is not None:
        label, nbytes = peak
        parts.append(f"{label} {nbytes / MIB:.0f} MiB")
    if stats.stop_reason in SHOWN_STOPS:
        parts.append(f"stop: {stats.stop_reason}")
    return " | ".join(parts)
