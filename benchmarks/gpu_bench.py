"""True-size decode on a GPU: a synthetic 4-bit Mixtral-8x7B pack, real routing replayed, cards emulated.

For each emulated card (``--cards 12,24``: GiB of a consumer card) this loads the first N
layers of a synthetic pack (``offload synth``) with the expert slots that card would give the
full 32-layer model (``offload.plan.plan_model`` at that VRAM: its per-layer counts for the first
N layers), caps the process's device memory at the card's share for those N layers
(``torch.cuda.set_per_process_memory_fraction``), replays the recorded Mixtral-8x7B routing
(``--replay`` of a trace converted by ``offload trace convert``), and measures, over the decode
steps of the trace, per policy and ``--cpu-experts`` setting (``off``: every miss copied over
the link; ``auto``: the placement cost model, misses on the CPU kernel where it is sooner;
``all``: every miss on the CPU):

- decode tok/s of the N-layer model, and scaled to 32 layers (per-layer cost taken as uniform);
- stall share (time compute waited for loads / decode time) and MiB moved per token;
- the link: a plain pinned host-to-device copy of one record (GB/s), the bytes the cache moved
  per second of decode, the copy/compute overlap (1 - stall / (bytes moved / plain GB/s): the
  share of copy time hidden behind compute), and the transfer-bound limit (plain GB/s / bytes
  per token) with the measured tok/s as a share of it;
- peak device memory (``max_memory_allocated``) against the plan's device bytes;
- the tokens, checked equal to the all-resident run's (the cache never changes numbers; with
  CPU experts the CPU kernel rounds differently from the GPU's, so a greedy token may flip: the
  row says where the first difference is) and the share of expert uses run on the CPU;
- the timing model's estimate (``offload.estimate``) for the same plan, with the link measured
  here and the device's memory bandwidth as stated (``--mem-gbps``), beside the measurement.

It also runs on a CPU (``--device cpu``, no cap) so it can be tried without a GPU. Prints a
table, and with ``--json PATH`` writes every number there.

    python benchmarks/gpu_bench.py --pack PACK --trace TRACE [--cards 12,24] [--policies lru,history]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.benchlib import say, timed  # noqa: E402
from offload.device import device_name, empty_host_buffer, resolve_device
from offload.engine import Engine, GenerationSettings
from offload.errors import OffloadError
from offload.estimate import Machine, estimate_decode
from offload.pack import Pack
from offload.plan import builtin_model, format_bytes, plan_memory, plan_model
from offload.trace import load_trace

GiB = 1 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pack", required=True, type=Path, help="a synthetic Mixtral-8x7B pack (offload synth)")
    parser.add_argument("--trace", required=True, type=Path, help="an engine-format trace with >= the pack's layers")
    parser.add_argument("--cards", default="12,24", help="emulated cards, GiB (comma list)")
    parser.add_argument("--policies", default="lru,history", help="cache policies (comma list)")
    parser.add_argument("--cpu-experts", default="off,auto,all", help="--cpu-experts settings (comma list)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=0, help="decode steps (default: all the trace holds)")
    parser.add_argument("--reps", type=int, default=2, help="measured repetitions after one warm-up")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--mem-gbps", type=float, default=4800.0,
                        help="device memory bandwidth for the timing model (default: the H200's published 4.8 TB/s)")
    return parser.parse_args(argv)


def plain_copy_gbps(nbytes: int, device: torch.device, reps: int = 8) -> float:
    """A plain copy of one record from pinned host memory into the device (GB/s, median)."""
    host = empty_host_buffer(nbytes, 1, device)[0]
    host.fill_(1)
    slot = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy() -> None:
        slot.copy_(host, non_blocking=True)

    timed(copy, device)
    return statistics.median(nbytes / timed(copy, device) / 1e9 for _ in range(reps))


def card_vram(pack: Pack, card: int, context: int, device_type: str) -> tuple[int, tuple[int, ...]]:
    """The budget for the pack's N layers on ``device_type`` that gives them the slots ``card``
    bytes give the first N layers of the full 32-layer Mixtral-8x7B on a GPU (same formats), and
    those slot counts."""
    _, full = builtin_model("mixtral-8x7b")
    c = pack.config
    dtype = pack.dense_dtype
    fmt = pack.layout.fmt
    attn = pack.attn_format
    whole = plan_model("mixtral-8x7b", full, dtype, context, fmt, attn, vram=card).memory
    slots = whole.layer_slots[: c.num_hidden_layers]
    base = plan_memory(
        c, pack.layout.nbytes, dtype, context, experts_per_layer=c.num_experts_per_tok,
        device_type=device_type, expert_format=fmt, attn_format=attn,
    )
    vram = base.dense_bytes + base.kv_cache_bytes + base.reserve_bytes + sum(slots) * pack.layout.nbytes
    return vram, slots


def run_once(engine: Engine, tokens: int):
    """(tokens, decode seconds, the cache's statistics of the request or None): never the
    Generation itself, which would keep the engine alive."""
    settings = GenerationSettings(max_new_tokens=tokens + 1, ignore_eos=True)
    gen = engine.generate([engine.tokenizer.bos_id], settings).run()
    return gen.tokens, gen.stats.decode_seconds, gen.cache_stats


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    with Pack(args.pack) as pack:
        config, record = pack.config, pack.layout.nbytes
        fmt = pack.layout.fmt.name
    trace = load_trace(args.trace)
    steps = trace.tokens(("prefill", "decode"))
    tokens = args.tokens or steps - 1  # a 1-token prompt takes position 0; decode the rest
    L = config.num_hidden_layers
    context = tokens + 2
    gbps = plain_copy_gbps(record, device)
    say(f"{device_name(device)}; pack {args.pack} ({L} layers, {fmt} experts of {format_bytes(record)}); "
        f"plain pinned copy {gbps:.1f} GB/s; {tokens} decode steps replayed from {args.trace}")

    say("all resident (the reference tokens)")
    ram = L * config.num_local_experts * record  # every record in RAM, whatever the VM says is free
    ref = Engine.load(args.pack, device=str(device), replay=args.trace, context_length=context)
    try:
        want, _, _ = run_once(ref, tokens)
        _, ref_seconds, _ = run_once(ref, tokens)
    finally:
        ref.close()
    resident_tps = tokens / ref_seconds
    del ref  # nothing else may hold it (run_once returns no Generation): its slots go before the caps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    rows = []
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    for card_gib in [float(c) for c in args.cards.split(",")]:
        with Pack(args.pack) as pack:
            vram, slots = card_vram(pack, int(card_gib * GiB), context, device.type)
        for policy, cpu_experts in [(p, c) for p in args.policies.split(",") for c in args.cpu_experts.split(",")]:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.set_per_process_memory_fraction(min(1.0, vram / total), device)
            say(f"card {card_gib:g} GiB: {L} layers in {format_bytes(vram)}, slots {slots}, policy {policy}, "
                f"--cpu-experts {cpu_experts}")
            engine = None
            try:
                engine = Engine.load(args.pack, device=str(device), vram=vram, ram=ram, policy=policy,
                                     replay=args.trace, context_length=context, cpu_experts=cpu_experts)
                got, _, _ = run_once(engine, tokens)  # warm-up: the cache fills
                times, moved, stall, cpu_runs, uses = [], 0, 0.0, 0, 0
                for _ in range(args.reps):
                    got, seconds, stats = run_once(engine, tokens)
                    total_stats = stats.total()
                    times.append(seconds)
                    moved += total_stats.bytes_moved
                    stall += total_stats.stall_seconds
                    cpu_runs += total_stats.cpu_runs
                    uses += total_stats.hits + total_stats.misses
                    hit = total_stats.hit_rate
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                plan = engine.plan
            except Exception as exc:  # one configuration's failure (OOM, a kernel) keeps the other rows
                rows.append({"card_gib": card_gib, "policy": policy, "cpu_experts": cpu_experts, "error": f"{type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}"})
                say(f"  failed: {rows[-1]['error']}")
                continue
            finally:
                if engine is not None:
                    engine.close()
                del engine  # its slots go before the next load, under the next cap
                gc.collect()
            seconds = sum(times)
            steps_run = tokens * args.reps
            per_token = moved / steps_run
            tps = steps_run / seconds
            limit = gbps * 1e9 / per_token if per_token else float("inf")
            copy_seconds = moved / (gbps * 1e9)
            with Pack(args.pack) as pack:  # the timing model for the same plan, link as measured here
                machine = Machine(device.type, mem_gbps=args.mem_gbps, link_gbps=gbps, disk_gbps=3.5,
                                  source="gpu_bench: stated memory bandwidth, measured link")
                est = estimate_decode(config, plan, machine, dtype=pack.dense_dtype, expert_format=pack.layout.fmt,
                                      attn_format=pack.attn_format, position=tokens // 2, trace=args.trace)
            rows.append({
                "estimated_tok_s": est.tokens_per_s, "estimated_overlap_tok_s": est.overlap_tokens_per_s,
                "card_gib": card_gib, "policy": policy, "cpu_experts": cpu_experts, "layers": L,
                "cpu_share": cpu_runs / uses if uses else 0.0,
                "first_difference": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None), "slots": list(plan.layer_slots),
                "host_experts": plan.host_experts, "vram_budget": vram,
                "tok_s": tps, "tok_s_32_layers": tps * L / 32, "hit_rate": hit,
                "stall_share": stall / seconds, "mib_per_token": per_token / 2**20,
                "mib_per_token_32_layers": per_token / 2**20 * 32 / L,
                "link_gbps_used": moved / seconds / 1e9, "plain_gbps": gbps,
                "overlap": 1 - stall / copy_seconds if copy_seconds else None,
                "transfer_bound_tok_s": limit, "share_of_transfer_bound": tps / limit if per_token else None,
                "peak_bytes": peak, "plan_device_bytes": plan.device_bytes,
                "plan_without_reserve": plan.device_bytes - plan.reserve_bytes,
                "tokens_equal_resident": got == want,
            })
            say(f"  {tps:.2f} tok/s ({L} layers), hit {hit:.3f}, stall {stall / seconds:.1%}, "
                f"{per_token / 2**20:.1f} MiB/token, on CPU {cpu_runs / max(1, uses):.1%}, tokens equal: {got == want}")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {
        "machine": device_name(device), "torch": torch.__version__, "pack": str(args.pack), "format": fmt,
        "layers": L, "record_bytes": record, "trace": str(args.trace), "decode_steps": tokens,
        "plain_copy_gbps": gbps, "resident_tok_s": resident_tps, "rows": rows,
    }


def print_report(result: dict) -> None:
    print(f"machine: {result['machine']}, torch {result['torch']}; {result['layers']} layers of synthetic "
          f"Mixtral-8x7B ({result['format']}), {result['decode_steps']} decode steps of replayed routing; "
          f"plain pinned copy {result['plain_copy_gbps']:.1f} GB/s; all resident {result['resident_tok_s']:.2f} tok/s")
    print("| card | policy | CPU experts | on CPU | slots/layer | tok/s (N layers) | tok/s x N/32 | estimate | hit rate | stall % "
          "| MiB/token (32 layers) | link GB/s used | overlap | x transfer bound | peak / plan | exact |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['card_gib']:g} GiB | {r['policy']} | {r['cpu_experts']} | error: {r['error']} |")
            continue
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / r['plan_device_bytes']:.2f}"
        overlap = "-" if r["overlap"] is None else f"{r['overlap']:.2f}"
        share = "-" if r["share_of_transfer_bound"] is None else f"{r['share_of_transfer_bound']:.2f}"
        exact = "yes" if r["tokens_equal_resident"] else f"from token {r['first_difference']}"
        print(f"| {r['card_gib']:g} GiB | {r['policy']} | {r['cpu_experts']} | {100 * r['cpu_share']:.0f}% | "
              f"{min(r['slots'])}-{max(r['slots'])} | {r['tok_s']:.2f} | "
              f"{r['tok_s_32_layers']:.2f} | {r['estimated_tok_s']:.2f} | {r['hit_rate']:.3f} | {100 * r['stall_share']:.1f} | "
              f"{r['mib_per_token_32_layers']:.0f} | {r['link_gbps_used']:.1f} | {overlap} | {share} | {peak} | "
              f"{exact} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = measure(args)
    except OffloadError as exc:
        say(f"error: {exc}")
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
