"""Expert moves for many small experts: record loads/s, and decode through the cache at 128 experts.

Two parts, in one process, each a ratio against a baseline run beside it.

Moves (``--part moves``). Host -> device loads of expert records through the cache's own copy
path (``offload.device.Transfers``; on CUDA from pinned RAM over the real link, on a CPU a
memmove within RAM), for two record sizes taken from ``RecordLayout`` in nf4: a Qwen3-30B-A3B
expert (D 2048, I 768: 2.53 MiB) in groups of its top-8, and a Mixtral-8x7B expert (D 4096,
I 14336: 94.5 MiB) in groups of its top-2, and a 64 KiB probe in groups of 8 (its loads/s show
the fixed cost of a load, which batching pays once per group). Each group is loaded three
ways, interleaved:

- one copy each: a ``Transfers.copy`` and a ``wait`` per record (the cache before batching);
- batched, scattered: one ``Transfers.copy_runs`` load of one copy per record (the records at
  rows that are not neighbours, as random routing leaves them), one wait;
- batched, one run: the group's records in consecutive rows into consecutive slots, one copy.

Groups cycle through a pool of records larger than the last-level cache (``--pool-mib``), so
no copy reads bytes still in the CPU's cache; one timing is a sweep over the whole pool. It
prints records/s and GB/s (medians) and the ratios: each way against one copy each, and small
records' GB/s against large ones'.

Decode (``--part decode``). MoE decode through ``ExpertCache`` on Qwen3-30B-A3B's expert shape
(128 experts of D 2048, I 768 per layer, top-8; ``--layers`` layers, bf16 records, synthetic
finite values), experts only: per token and layer ``offload.model.moe_decode`` on a random
hidden state with routing drawn from a seeded generator (``--routing``: uniform, or Zipf-skewed
over a shuffled ranking with exponent ``--zipf``). Attention and the dense weights are left out
(they do not touch the cache). The RAM tier holds every record and every miss is copied into a
slot (``cpu_experts="off"``: the link's path, as on a GPU; on a CPU device the engine would
compute such misses in place instead). For 25 %, 50 % and 100 % of each layer's experts in
slots, one cache is warmed up (every layer's experts asked for once, so every slot is full,
then ``--warmup`` tokens), then ``--reps`` runs of ``--tokens`` tokens are interleaved:
all-resident (a provider over every record's views, no cache), the cache with batched moves,
the cache with one copy per miss (``batch_moves=False``; the same cache, switched, on the next
tokens of the seeded routing, so neither run finds the other's experts fresh in its slots). It
prints tokens/s, the ratio to all-resident, hit rate, loads and copies per token and the stall
share (time waiting for loads / decode time), and checks once per budget that the outputs
equal the all-resident ones. Copies per token fall below loads per token only where a call's
misses sit in neighbouring RAM rows (consecutive expert ids): rare under either routing here.

What it does not measure: disk reads (the RAM tier holds all), prefetching, attention, prompts,
a trained model's routing, a 4-bit model's CPU compute (bf16 here: CPU 4-bit kernels are slow
without AVX-512, see FACTS). Nothing here asserts a speed.

    python benchmarks/bench_small_experts.py
    python benchmarks/bench_small_experts.py --part moves --reps 15 --json
    python benchmarks/bench_small_experts.py --part decode --layers 2 --routing uniform
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_synth import cpu_model  # noqa: E402
from benchmarks.benchlib import say, timed  # noqa: E402
from offload.config import ModelConfig  # noqa: E402
from offload.device import Transfers, device_name, empty_host_buffer, resolve_device, synchronize  # noqa: E402
from offload.experts.cache import ExpertCache  # noqa: E402
from offload.experts.record import RecordLayout  # noqa: E402
from offload.model import moe_decode  # noqa: E402

MB = 1e6
MiB = 2**20
BUDGETS = (0.25, 0.5, 1.0)  # share of each layer's experts in device slots
SEED = 0


def shape_config(hidden: int, intermediate: int, experts: int, top_k: int, layers: int) -> ModelConfig:
    """A Mixtral-architecture config of the given expert shape (only the experts matter here)."""
    return ModelConfig.from_dict({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 256,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "sliding_window": None, "tie_word_embeddings": False,
    })


QWEN3_30B = dict(hidden=2048, intermediate=768, experts=128, top_k=8)  # Qwen3-30B-A3B's experts
MIXTRAL_8X7B = dict(hidden=4096, intermediate=14336, experts=8, top_k=2)


# ---- moves ------------------------------------------------------------------------------------

def moves_of(name: str, nbytes: int, k: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One record size: groups of ``k`` records loaded the three ways, interleaved."""
    rows = max(2 * k, math.ceil(args.pool_mib * MiB / nbytes) // k * k)  # whole groups, pool >= LLC
    rows = min(rows, 4096)  # the probe: enough groups, not millions
    say(f"moves: {name}, {nbytes / MiB:.2f} MiB, groups of {k}, pool of {rows} records")
    host = empty_host_buffer(nbytes, rows, device)  # [rows, record bytes], pinned on CUDA
    host.copy_(torch.randint(0, 256, (rows, nbytes), dtype=torch.uint8))
    slots = torch.zeros((rows, nbytes), dtype=torch.uint8, device=device)  # [rows, record bytes]
    transfers = Transfers(device, nbytes)
    groups = rows // k
    # scattered: group g's records at rows g, g + groups, ... (never neighbours), into slots alike
    scattered = [[g + i * groups for i in range(k)] for g in range(groups)]

    def one_each(g: int) -> None:
        for r in scattered[g]:
            transfers.wait(transfers.copy(slots[r], host[r], needed_now=True))

    def batched_scattered(g: int) -> None:
        pairs = [(slots[r : r + 1], host[r : r + 1]) for r in scattered[g]]  # [1, record bytes] each
        transfers.wait(transfers.copy_runs(pairs, needed_now=True))

    def batched_run(g: int) -> None:
        first = g * k
        transfers.wait(transfers.copy_runs([(slots[first : first + k], host[first : first + k])], needed_now=True))

    def sweep(fn) -> None:  # every group once: the whole pool
        for g in range(groups):
            fn(g)

    ways = {"one copy each": one_each, "batched, scattered": batched_scattered, "batched, one run": batched_run}
    for fn in ways.values():  # warm up: every page touched
        sweep(fn)
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(args.reps):
        for way, fn in ways.items():
            times[way].append(timed(lambda fn=fn: sweep(fn), device))
    check = scattered[0][1]
    transfers.wait(transfers.copy(slots[check], host[check], needed_now=True))
    assert torch.equal(slots[check].cpu(), host[check])
    transfers.close()
    out = {}
    for way, ts in times.items():
        t = statistics.median(ts) / groups  # seconds per group
        out[way] = {
            "seconds_per_group": t, "loads_per_s": k / t, "gb_per_s": k * nbytes / t / 1e9,
            "copies_per_group": 1 if way == "batched, one run" else k,
        }
    base = out["one copy each"]["loads_per_s"]
    for row in out.values():
        row["ratio_to_one_copy_each"] = row["loads_per_s"] / base
    return {"record": name, "record_bytes": nbytes, "group": k, "pool_records": rows, "ways": out}


def bench_moves(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    sizes = [
        (name, RecordLayout.for_config(shape_config(**shape, layers=1), "nf4").nbytes, shape["top_k"])
        for name, shape in (("Qwen3-30B-A3B expert", QWEN3_30B), ("Mixtral-8x7B expert", MIXTRAL_8X7B))
    ]
    sizes.append(("64 KiB probe", 64 * 1024, 8))  # bytes count for little: the fixed cost of a load
    out = []
    for size in sizes:
        out.append(moves_of(*size, args, device))
        gc.collect()
    small, large, _ = out
    ratios = {way: small["ways"][way]["gb_per_s"] / large["ways"][way]["gb_per_s"] for way in small["ways"]}
    return {"records": out, "small_over_large_gb_per_s": ratios}


# ---- decode -----------------------------------------------------------------------------------

class Records:
    """Every expert's bf16 record in RAM, finite synthetic values (sign and mantissa random, the
    exponent fixed: magnitudes in [2^-7, 2^-6)); a ``RecordSource``."""

    def __init__(self, layout: RecordLayout, layers: int, experts: int, seed: int = SEED):
        self.layout = layout
        g = torch.Generator().manual_seed(seed)
        self.data = torch.empty((layers, experts, layout.nbytes), dtype=torch.uint8)  # [L, E, record bytes]
        words = self.data.view(torch.int16)  # [L, E, record bytes / 2]
        for layer in range(layers):
            raw = torch.randint(-(2**15), 2**15, words[layer].shape, dtype=torch.int16, generator=g)
            words[layer].copy_((raw & -32641) | 0x3C00)  # keep sign (0x8000) and mantissa (0x7F), exponent 2^-7

    def read_record(self, layer: int, expert: int, out: torch.Tensor) -> torch.Tensor:
        out[: self.layout.nbytes].copy_(self.data[layer, expert])
        return out[: self.layout.nbytes]


class Resident:
    """The all-resident provider: every expert's views over its record (on the device)."""

    def __init__(self, records: Records, layout: RecordLayout, device: torch.device):
        self.data = records.data if device.type == "cpu" else records.data.to(device)
        L, E = self.data.shape[:2]
        self.max_experts_per_call = E
        self.views = [[layout.views(self.data[layer, e]) for e in range(E)] for layer in range(L)]

    def get(self, layer, experts, tokens=1):
        return [self.views[layer][e] for e in experts]


def routing(kind: str, tokens: int, layers: int, experts: int, top_k: int, zipf: float, seed: int) -> list:
    """[token][layer] -> top_k distinct experts, seeded: uniform, or Zipf(``zipf``) over a
    shuffled ranking per layer (some experts popular, as trained routers make them)."""
    rng = random.Random(seed)
    rankings = [rng.sample(range(experts), experts) for _ in range(layers)]
    weights = [1.0 / (r + 1) ** zipf for r in range(experts)]
    out = []
    for _ in range(tokens):
        step = []
        for layer in range(layers):
            if kind == "uniform":
                step.append(rng.sample(range(experts), top_k))
                continue
            picked: list[int] = []
            while len(picked) < top_k:
                e = rankings[layer][rng.choices(range(experts), weights=weights)[0]]
                if e not in picked:
                    picked.append(e)
            step.append(picked)
        out.append(step)
    return out


def decode_run(provider, plan, inputs, layers: int, device: torch.device) -> list[torch.Tensor]:
    """Run every token of ``plan`` through every layer's MoE; the last layer's outputs."""
    outs = []
    for (x, gates), step in zip(inputs, plan):
        for layer in range(layers):
            y = moe_decode(x, step[layer], gates, provider, layer)  # [1, D]
        outs.append(y)
    synchronize(device)
    return outs


def decode_budget(kind: str, slots: int, records: Records, resident: Resident, layout: RecordLayout,
                  plan: list, inputs: list, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One routing and slot budget: a warmed-up cache against all-resident, interleaved."""
    L, E, K = args.layers, QWEN3_30B["experts"], QWEN3_30B["top_k"]
    say(f"decode: {kind} routing, {slots} of {E} experts per layer in slots")
    cache = ExpertCache(records, layout, L, E, K, device, slots, L * E, policy="lru", cpu_experts="off")
    # warm up: every slot filled (each layer's experts asked for in shuffled groups of top-k, so
    # the 100 % cache holds them all), pages touched; the numbers checked once
    rng = random.Random(SEED + 3)
    for layer in range(L):
        order = rng.sample(range(E), E)
        for i in range(0, E, K):
            cache.get(layer, sorted(order[i : i + K]))
    warm = plan[: args.warmup]
    want = decode_run(resident, warm, inputs, L, device)
    got = decode_run(cache, warm, inputs, L, device)
    exact = all(torch.equal(a, b) for a, b in zip(want, got))
    providers = {"all resident": resident, "batched": cache, "one copy each": cache}
    times: dict[str, list[float]] = {way: [] for way in providers}
    counts: dict[str, list] = {"batched": [], "one copy each": []}
    ins = inputs[args.warmup :]
    for rep in range(args.reps):
        # the two cache runs decode different tokens (a second pass over the same tokens would
        # find their experts fresh in the slots); all-resident decodes the batched run's
        start = args.warmup + 2 * rep * args.tokens
        chunks = {"all resident": start, "batched": start, "one copy each": start + args.tokens}
        order = list(providers)
        for way in order if rep % 2 == 0 else order[::-1]:
            cache.batch_moves = way == "batched"
            before = cache.stats.copy()
            provider, chunk = providers[way], plan[chunks[way] : chunks[way] + args.tokens]
            run = lambda provider=provider, chunk=chunk: decode_run(provider, chunk, ins, L, device)  # noqa: E731
            times[way].append(timed(run, device))
            if way in counts:
                counts[way].append(cache.stats.since(before).total())
    cache.close()
    row: dict[str, Any] = {"routing": kind, "experts_in_slots": slots, "exact": exact}
    base = statistics.median(times["all resident"])
    for way, ts in times.items():
        t = statistics.median(ts)
        rates = [args.tokens / x for x in ts]
        entry = {"tok_per_s": args.tokens / t, "tok_per_s_std": statistics.pstdev(rates), "ratio_to_resident": base / t}
        if way in counts:
            n, c = args.tokens * len(counts[way]), counts[way]
            entry.update(
                hit_rate=sum(s.hits for s in c) / max(1, sum(s.requests for s in c)),
                loads_per_token=sum(s.host_loads + s.disk_loads for s in c) / n,
                copies_per_token=sum(s.copies for s in c) / n,
                stall_share=sum(s.stall_seconds for s in c) / sum(ts),
            )
        row[way] = entry
    row["batched_over_one_copy_each"] = row["batched"]["tok_per_s"] / row["one copy each"]["tok_per_s"]
    return row


def bench_decode(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    E, K, L = QWEN3_30B["experts"], QWEN3_30B["top_k"], args.layers
    config = shape_config(**QWEN3_30B, layers=L)
    layout = RecordLayout.for_config(config, "bfloat16")
    say(f"decode: {L} layers x {E} experts of {layout.nbytes / MiB:.2f} MiB (bf16), top-{K}; making records")
    records = Records(layout, L, E)
    resident = Resident(records, layout, device)
    g = torch.Generator().manual_seed(SEED + 1)
    inputs = [
        (torch.randn(1, config.hidden_size, generator=g).to(device, torch.bfloat16),  # x [1, D]
         torch.softmax(torch.randn(1, K, generator=g), -1).to(device))  # gates [1, K] fp32
        for _ in range(args.warmup + args.tokens)
    ]
    rows = []
    for kind in args.routing:
        plan = routing(kind, args.warmup + 2 * args.tokens * args.reps, L, E, K, args.zipf, SEED + 2)
        for share in BUDGETS:
            slots = max(K, round(share * E))
            rows.append(decode_budget(kind, slots, records, resident, layout, plan, inputs, args, device))
            gc.collect()
    return {
        "layers": L, "experts": E, "top_k": K, "record_bytes": layout.nbytes, "tokens": args.tokens,
        "reps": args.reps, "zipf": args.zipf, "rows": rows,
    }


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("moves", "decode", "both"), default="both")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reps", type=int, default=4, help="interleaved repetitions (median reported)")
    parser.add_argument("--pool-mib", type=float, default=512.0, help="moves: records cycled through, MiB")
    parser.add_argument("--layers", type=int, default=3, help="decode: layers of 128 experts")
    parser.add_argument("--tokens", type=int, default=20, help="decode: tokens per timed run")
    parser.add_argument("--warmup", type=int, default=8, help="decode: tokens before timing")
    parser.add_argument("--routing", type=lambda s: s.split(","), default=["uniform", "zipf"],
                        help="decode: comma-separated, from uniform and zipf")
    parser.add_argument("--zipf", type=float, default=1.0, help="decode: Zipf exponent of the skewed routing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not set(args.routing) <= {"uniform", "zipf"}:
        parser.error(f"--routing {','.join(args.routing)}: choose from uniform, zipf")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    result: dict[str, Any] = {
        "machine": cpu_model(), "device": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    started = time.perf_counter()
    if args.part in ("moves", "both"):
        result["moves"] = bench_moves(args, device)
        result["moves"]["seconds"] = time.perf_counter() - started
    if args.part in ("decode", "both"):
        begun = time.perf_counter()
        result["decode"] = bench_decode(args, device)
        result["decode"]["seconds"] = time.perf_counter() - begun
    result["seconds"] = time.perf_counter() - started
    return result


def print_report(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}; device: {r['device']}; torch {r['torch']}, {r['threads']} threads; "
          f"{r['seconds']:.0f} s")
    if "moves" in r:
        print("\nhost -> device record loads through offload.device.Transfers "
              f"(medians; {r['moves']['seconds']:.0f} s)")
        print(f"{'record':<22} {'MiB':>7} {'group':>5}  {'way':<20} {'copies':>6} {'loads/s':>9} {'GB/s':>7} "
              f"{'x one each':>10}")
        for rec in r["moves"]["records"]:
            for way, w in rec["ways"].items():
                print(f"{rec['record']:<22} {rec['record_bytes'] / MiB:7.2f} {rec['group']:>5}  {way:<20} "
                      f"{w['copies_per_group']:>6} {w['loads_per_s']:9.0f} {w['gb_per_s']:7.2f} "
                      f"{w['ratio_to_one_copy_each']:10.2f}")
        ratios = ", ".join(f"{way} {x:.2f}" for way, x in r["moves"]["small_over_large_gb_per_s"].items())
        print(f"small records' GB/s / large records' GB/s: {ratios}")
    if "decode" in r:
        d = r["decode"]
        print(f"\nMoE decode through the cache (experts only): {d['layers']} layers x {d['experts']} experts "
              f"of {d['record_bytes'] / MiB:.2f} MiB bf16, top-{d['top_k']}, LRU, misses copied from RAM; "
              f"{d['tokens']} tokens x {d['reps']} reps (median); zipf exponent {d['zipf']:g}; {d['seconds']:.0f} s")
        print(f"{'routing':<8} {'slots':>5}  {'way':<14} {'tok/s':>12} {'x resident':>10} {'hit':>5} "
              f"{'loads/tok':>9} {'copies/tok':>10} {'stall':>6}")
        for row in d["rows"]:
            for way in ("all resident", "batched", "one copy each"):
                e = row[way]
                extra = (f"{e['hit_rate']:5.2f} {e['loads_per_token']:9.1f} {e['copies_per_token']:10.1f} "
                         f"{e['stall_share']:6.0%}" if "hit_rate" in e else "")
                print(f"{row['routing']:<8} {row['experts_in_slots']:>5}  {way:<14} "
                      f"{e['tok_per_s']:6.1f} ± {e['tok_per_s_std']:4.1f} {e['ratio_to_resident']:10.2f} {extra}")
            print(f"{'':<8} {'':>5}  batched / one copy each: {row['batched_over_one_copy_each']:.2f}x; "
                  f"outputs equal all-resident: {'yes' if row['exact'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.benchlib import run

    return run(argv, parse_args, bench, print_report)


if __name__ == "__main__":
    sys.exit(main())
