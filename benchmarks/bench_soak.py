"""Soak: a long generation under eviction pressure with every miss read from the pack; is RSS flat?

Converts the bundled demo model into a pack (in a temporary folder), loads it with 2 of 8
experts per layer on the "device" (RAM here) and no RAM tier (``ram=0``: every miss is a read
of the pack), then generates ``--tokens`` tokens (default 2,000; sampled, seeded, past EOS) and
samples the process's resident set size (psutil) every ``--every`` tokens. It prints RSS after
the warm-up (``--warmup`` tokens, default 200: the caches, the allocator's pools and the page
cache of the pack settle) and at the end, their ratio, the largest RSS seen, the expert loads and
bytes read, and tok/s. The goal: RSS at the end within 5% of RSS after the warm-up.

    python benchmarks/bench_soak.py [--tokens 2000] [--policy auto] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.benchlib import run, say  # noqa: E402
from offload.demo import DEMO_MODEL_DIR  # noqa: E402
from offload.device import device_name  # noqa: E402
from offload.engine import Engine, GenerationSettings  # noqa: E402
from offload.pack import convert  # noqa: E402
from offload.sampling import SamplingSettings  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2, help="experts per layer on the device")
    parser.add_argument("--policy", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def soak(args: argparse.Namespace) -> dict:
    process = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        pack = convert(DEMO_MODEL_DIR, Path(tmp) / "demo-pack")
        engine = Engine.load(pack, device="cpu", experts_per_layer=args.slots, ram=0, policy=args.policy,
                             context_length=args.tokens + 16)
        ids = engine.tokenizer.encode("To open a file for reading, use", bos=True)
        sampling = SamplingSettings(temperature=0.8, top_p=0.95, seed=0)
        settings = GenerationSettings(max_new_tokens=args.tokens, ignore_eos=True, sampling=sampling)
        samples: list[tuple[int, int]] = []  # (tokens so far, RSS bytes)
        start = time.perf_counter()
        generation = engine.generate(ids, settings)
        for i, _ in enumerate(generation, 1):
            if i % args.every == 0 or i == args.warmup:
                samples.append((i, process.memory_info().rss))
        seconds = time.perf_counter() - start
        stats = generation.cache_stats.total()
        engine.close()
    settled = next(rss for n, rss in samples if n >= args.warmup)
    end = samples[-1][1]
    say(f"{args.tokens} tokens in {seconds:.1f} s")
    return {
        "machine": device_name(torch.device("cpu")),
        "tokens": args.tokens, "warmup": args.warmup, "slots": args.slots, "policy": engine.policy,
        "tok_s": args.tokens / seconds,
        "rss_after_warmup": settled, "rss_end": end, "rss_max": max(r for _, r in samples),
        "end_over_warmup": end / settled,
        "disk_loads": stats.disk_loads, "disk_bytes": stats.disk_bytes, "hit_rate": stats.hit_rate,
        "samples": samples,
    }


def print_report(r: dict) -> None:
    mib = 2**20
    print(f"machine: {r['machine']}; demo model pack, {r['slots']} of 8 experts per layer, ram 0 "
          f"(every miss read from the pack), policy {r['policy']}")
    print(f"{r['tokens']} tokens at {r['tok_s']:.1f} tok/s; hit rate {r['hit_rate']:.3f}, "
          f"{r['disk_loads']} pack reads ({r['disk_bytes'] / mib:.0f} MiB)")
    print(f"RSS after {r['warmup']} tokens {r['rss_after_warmup'] / mib:.1f} MiB, at the end "
          f"{r['rss_end'] / mib:.1f} MiB ({r['end_over_warmup']:.3f}x; goal within 5%), "
          f"largest {r['rss_max'] / mib:.1f} MiB")
    print("tokens: " + ", ".join(f"{n}: {rss / mib:.1f}" for n, rss in r["samples"]) + " (MiB)")


def main(argv: list[str] | None = None) -> int:
    return run(argv, parse_args, soak, print_report)


if __name__ == "__main__":
    sys.exit(main())
