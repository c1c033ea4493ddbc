"""Expert cache policies on a model whose routers learned: in-time rate, loads, stall, tokens/s.

What it measures: the bundled demo model (or ``--model``) with a share of its experts on the
device, decoding the same prompt under each policy (and each prefetch depth), interleaved over
``--reps`` repetitions in one process. Per policy: the share of expert uses resident in time
(hits, prefetched ones included, minus those whose load was still in flight) during decode,
experts loaded per token (demand loads plus prefetches), prefetch precision, MiB moved per token, the stall share
of decode time, and decode tokens/s as a ratio to LRU's in the same process. Every run's tokens
are checked against the all-resident run. What it is not: a test (nothing is asserted but
exactness) nor a trace simulator (``offload simulate`` replays recorded routing).

    python benchmarks/bench_policies.py                       # demo model, 4 of 8, RAM holds all
    python benchmarks/bench_policies.py --ram 0 --depths 1,2  # every miss read from the pack
    python benchmarks/bench_policies.py --device cuda         # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchlib import run, say  # noqa: E402
from offload.demo import DEMO_MODEL_DIR  # noqa: E402
from offload.device import device_name, synchronize  # noqa: E402
from offload.engine import Engine  # noqa: E402

VALID_TEXT = Path(__file__).resolve().parent / "data" / "python-docs-valid.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts-per-layer", type=int, default=None, help="default: half the experts")
    p.add_argument("--ram", default=None, help="RAM budget for experts (default: all; 0: every miss reads disk)")
    p.add_argument("--policies", default="lru,lfu,history,lookahead,combined")
    p.add_argument("--depths", default="1", help="prefetch depths to try for lookahead and combined")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def greedy(engine: Engine, ids: list[int], n: int):
    """Prompt, then ``n`` greedy tokens: (tokens, decode seconds, the cache's decode-only counters)."""
    cache = engine.cache
    logits = engine.prefill(ids)
    after_prompt = cache.stats.copy() if cache is not None else None
    tokens = []
    synchronize(engine.device)
    start = time.perf_counter()
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        logits = engine.decode(tokens[-1])
    synchronize(engine.device)
    seconds = time.perf_counter() - start
    return tokens, seconds, cache.stats.since(after_prompt).total() if cache is not None else None


def bench(args: argparse.Namespace) -> dict:
    ref = Engine.load(args.model, device=args.device, dtype=args.dtype)
    half = args.experts_per_layer or max(ref.config.num_experts_per_tok, ref.config.num_local_experts // 2)
    ids = ref.tokenizer.encode(VALID_TEXT.read_text(encoding="utf-8")[:4000], bos=True)[: args.prompt_tokens]
    want, _, _ = greedy(ref, ids, args.tokens)
    del ref
    runs = []
    for policy in args.policies.split(","):
        depths = [int(d) for d in args.depths.split(",")] if policy in ("lookahead", "combined", "auto") else [1]
        for depth in depths:
            engine = Engine.load(
                args.model, device=args.device, dtype=args.dtype, experts_per_layer=half, ram=args.ram,
                policy=policy, prefetch_depth=depth,
            )
            runs.append({"policy": policy, "depth": depth, "engine": engine, "tok_s": [], "stall": []})
    for rep in range(args.reps):  # interleaved: every policy sees the same machine noise
        for r in runs:
            say(f"[rep {rep + 1}/{args.reps}] {r['policy']} depth {r['depth']}")
            tokens, seconds, stats = greedy(r["engine"], ids, args.tokens)
            if tokens != want:
                raise AssertionError(f"{r['policy']} depth {r['depth']}: tokens differ from the all-resident run")
            r["tok_s"].append(args.tokens / seconds)
            r["stall"].append(stats.stall_seconds / seconds)
            r["stats"] = stats  # the last repetition's counters (the cache and history stay warm)
    lru = [statistics.median(r["tok_s"]) for r in runs if r["policy"] == "lru"]
    rows = []
    for r in runs:
        s = r["stats"]
        tok_s = statistics.median(r["tok_s"])
        rows.append({
            "policy": r["policy"],
            "prefetch_depth": r["depth"],
            "in_time": (s.hits - s.late) / s.requests,
            "loads_per_token": (s.host_loads + s.disk_loads) / args.tokens,
            "prefetch_precision": s.prefetch_used / s.prefetches if s.prefetches else None,
            "mib_per_token": s.bytes_moved / 2**20 / args.tokens,
            "stall_share": statistics.median(r["stall"]),
            "decode_tok_s": tok_s,
            "x_lru": tok_s / lru[0] if lru else None,
        })
        r["engine"].close()
    model = Path(args.model)
    return {
        "machine": device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "model": model.parent.name if model.name == "model" else model.name,
        "experts_per_layer": half,
        "ram": args.ram,
        "prompt_tokens": len(ids),
        "tokens": args.tokens,
        "reps": args.reps,
        "rows": rows,
    }


def print_report(result: dict) -> None:
    print(f"{result['model']} on {result['machine']} (torch {result['torch']}): {result['experts_per_layer']} "
          f"experts per layer on the device, RAM {result['ram'] or 'all'}, {result['prompt_tokens']}-token "
          f"prompt + {result['tokens']} greedy tokens (counters: decode only), median of {result['reps']} interleaved runs, tokens exact")
    print("| policy | depth | in time | loads/token | precision | MiB/token | stall % | decode tok/s | x lru |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        precision = f"{r['prefetch_precision']:.2f}" if r["prefetch_precision"] is not None else "-"
        x = f"{r['x_lru']:.2f}" if r["x_lru"] is not None else "-"
        print(f"| {r['policy']} | {r['prefetch_depth']} | {r['in_time']:.3f} | {r['loads_per_token']:.2f} | "
              f"{precision} | {r['mib_per_token']:.2f} | {100 * r['stall_share']:.1f} | {r['decode_tok_s']:.1f} | {x} |")


if __name__ == "__main__":
    sys.exit(run(None, parse_args, bench, print_report))
