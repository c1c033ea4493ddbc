"""`offload synth` against the disk: does a synthetic pack get written at disk speed?

What it measures, in one process, in the folder given (``--dir``, default the current one):

1. disk: ``--gib`` GiB (default 2) of random bytes written to one file there with ``pwrite`` in
   64 MiB pieces (one random buffer, made before the clock starts, written again and again),
   then ``fsync``: bytes / seconds, the fsync included;
2. synth: ``offload.synth.synthesize`` of ``--preset`` (default mixtral-8x7b) with its first
   ``--layers`` layers (default 2) and ``--expert-bits`` (default 4: the portable nf4;
   ``--for`` as the command's) into a fresh pack
   there: the pack's bytes on disk / seconds, every fsync and the rename included. The one-time
   import of bitsandbytes is made before the clock starts; the per-format samples synth
   quantizes are made again on every repetition (they are part of its work).

The two alternate ``--reps`` times (disk, synth, disk, synth...) so a slow spell of a shared
machine lands on both; each figure is the median, and the ratio is synth over disk. The goal is
a ratio of at least 0.5. Each file is removed after its repetition.

What it does not measure: reading the pack back, the engine, or a disk apart from the page
cache's writeback (on a VM, "the disk" is what the guest sees). Nothing here asserts a speed:
benchmarks are not tests.

    python benchmarks/bench_synth.py --dir /mnt/nvme
    python benchmarks/bench_synth.py --layers 4 --expert-bits 8 --reps 3 --json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import run, say  # noqa: E402
from offload import quant, synth  # noqa: E402
from offload.pack import TARGETS  # noqa: E402
from offload.plan import BUILTIN_MODELS  # noqa: E402

PIECE = 64 * 2**20  # bytes of one pwrite in the disk test
GOAL = 0.5  # synth / disk


def cpu_model() -> str:
    """lscpu's "Model name" (the processor as the OS names it), else platform's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def disk_write(path: Path, nbytes: int, buffer: memoryview) -> float:
    """Seconds to write ``nbytes`` to a new file at ``path`` and fsync it."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < nbytes:
            piece = buffer[: min(PIECE, nbytes - offset)]
            offset += os.pwrite(fd, piece, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def synth_write(out: Path, args: argparse.Namespace) -> tuple[int, float]:
    """(bytes of the pack, seconds) of one synthesize call."""
    synth._recipe.cache_clear()  # the samples are part of the work
    start = time.perf_counter()
    synth.synthesize(args.preset, out, layers=args.layers, expert_bits=args.expert_bits, target=args.target)
    seconds = time.perf_counter() - start
    return sum(f.stat().st_size for f in out.iterdir()), seconds


def bench(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir).resolve()
    work = Path(tempfile.mkdtemp(prefix=".bench-synth-", dir=folder))
    nbytes = int(args.gib * 2**30)
    random_piece = memoryview(np.random.default_rng(0).bytes(PIECE))
    quant._bnb()  # the one-time import, off the clock
    disk, made = [], []
    fmt = None
    try:
        for rep in range(args.reps):
            path = work / "disk.bin"
            seconds = disk_write(path, nbytes, random_piece)
            path.unlink()
            disk.append(nbytes / seconds)
            say(f"rep {rep + 1}/{args.reps}: disk {nbytes / seconds / 1e9:.3f} GB/s")
            out = work / "pack"
            written, seconds = synth_write(out, args)
            if fmt is None:
                from offload.pack import Pack

                with Pack(out) as pack:
                    fmt = pack.layout.fmt.name
            shutil.rmtree(out)
            made.append(written / seconds)
            say(f"rep {rep + 1}/{args.reps}: synth {written / seconds / 1e9:.3f} GB/s ({written / 1e9:.2f} GB, {seconds:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    disk_gbps, synth_gbps = statistics.median(disk) / 1e9, statistics.median(made) / 1e9
    return {
        "machine": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "folder": str(folder),
        "disk_bytes": nbytes,
        "pack_bytes": written,
        "preset": args.preset,
        "layers": args.layers,
        "expert_bits": args.expert_bits,
        "expert_format": fmt,
        "reps": args.reps,
        "disk_gbps": disk_gbps,
        "disk_gbps_all": [d / 1e9 for d in disk],
        "synth_gbps": synth_gbps,
        "synth_gbps_all": [m / 1e9 for m in made],
        "ratio": synth_gbps / disk_gbps,
        "goal": GOAL,
    }


def print_report(r: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.2f}" for x in r["load_average"])
    print(f"machine: {r['machine']} ({r['cpus']} CPUs, load average {load} at the end), torch {r['torch']}")
    print(f"folder: {r['folder']}; median of {r['reps']} interleaved repetitions")
    print(f"disk:  {r['disk_gbps']:.3f} GB/s  ({r['disk_bytes'] / 2**30:.1f} GiB random bytes, pwrite + fsync; "
          f"all: {', '.join(f'{x:.3f}' for x in r['disk_gbps_all'])})")
    print(f"synth: {r['synth_gbps']:.3f} GB/s  ({r['preset']} --layers {r['layers']} --expert-bits {r['expert_bits']} "
          f"-> {r['expert_format']}, {r['pack_bytes'] / 1e9:.2f} GB; all: {', '.join(f'{x:.3f}' for x in r['synth_gbps_all'])})")
    verdict = "meets" if r["ratio"] >= r["goal"] else "misses"
    print(f"synth / disk: {r['ratio']:.2f}x ({verdict} the goal of {r['goal']}x)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=".", help="the folder to write in (default: the current one)")
    parser.add_argument("--gib", type=float, default=2.0, help="GiB of the disk test (default 2)")
    parser.add_argument("--preset", default="mixtral-8x7b", choices=list(BUILTIN_MODELS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--expert-bits", type=int, default=4)
    parser.add_argument("--for", dest="target", default="auto", choices=list(TARGETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(None, parse_args, bench, print_report))
