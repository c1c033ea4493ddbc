"""Check offload.estimate against offload bench: measured vs estimated decode tok/s on this CPU.

Given a pack (``offload synth`` makes a true-shape one) and an engine-format router trace
(``offload trace convert`` of the shared Mixtral traces), this script

1. measures this machine (before and after the bench, keeping the better figure of each, since
   a shared machine is noisy), the numbers a CPU estimate takes: memcpy GB/s of one expert record
   (the "link": on a CPU a slot is RAM and a load is a copy), a warm read of the pack's experts
   file (the "disk": the page cache), one expert's FFN at batch 1 from a real record of the pack
   (``Machine.expert_seconds``), and a batch-1 bf16 matmul's GB/s for the dense weights;
2. runs ``offload bench PACK --replay TRACE --policy lru --experts-per-layer K1,K2,... -o json
   --device cpu`` (one process, the budgets swept) and takes each budget's tgN tok/s and hit rate;
3. estimates each budget with ``offload.estimate.estimate_decode`` (LRU hit rates replayed on
   the same trace with ``offload.trace.simulate``, the RAM tier bench reports, the position in
   the middle of the decode), and prints measured, estimated and their ratio.

The issue's target: every ratio within 30% (0.77 to 1.30). Nothing is asserted; it prints.

    offload trace convert ../shared/traces/mixtral-8x7b-instruct/humaneval_p0_p1_decode.jsonl p1.jsonl --problem 1
    python -c "from offload.plan import BUILTIN_MODELS; from offload.synth import synthesize; \
        synthesize(dict(BUILTIN_MODELS['mixtral-8x7b'][1], vocab_size=4096), 'pack4', layers=4, expert_bits=4)"
    python benchmarks/check_estimate.py pack4 p1.jsonl [--slots 2,4,8] [-p 16] [-n 48] [-r 3]

(The vocabulary of 4096 is the synthetic pack's tokenizer's: with a preset's 32000, ``offload
bench`` samples ids its tokenizer cannot decode and stops. The shape is otherwise Mixtral-8x7B's,
which is what the estimate's hit rates and sizes look at. The trace's first layers are replayed
on the pack's, as ``--replay`` does, and the hit rates are simulated on those same layers.)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload.estimate import Machine, estimate_decode  # noqa: E402
from offload.loader import weight_formats  # noqa: E402
from offload.model import expert_ffn  # noqa: E402
from offload.pack import EXPERTS_FILE, Pack  # noqa: E402
from offload.plan import format_bytes, plan_memory  # noqa: E402


def median_seconds(fns, repeats: int) -> float:
    """The median time of one call, cycling through ``fns`` (each on its own buffers, so that
    no call finds the last one's bytes in the CPU's caches, as the engine's next expert doesn't)."""
    for fn in fns:
        fn()  # warm: pages touched, code paths loaded
    times = []
    for i in range(repeats * len(fns)):
        start = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_machine(pack: Pack, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """What this machine does with what the engine does, the way the engine does it: a slot load
    (``ctypes.memmove`` of one record between two buffers already touched, as the cache's CPU
    loads are), a read of the pack's experts file, one expert's FFN at batch 1 over real records
    of the pack (several, in turn), batch-1 bf16 matmuls of the dense weights' sizes (several,
    in turn), and the host work of a decode step per layer, from the bundled demo model (10M
    parameters: its step is nearly all host work)."""
    c, layout = pack.config, pack.layout
    n = layout.nbytes
    sources = [torch.empty(n, dtype=torch.uint8).fill_(i) for i in range(3)]
    slots = [torch.empty(n, dtype=torch.uint8).fill_(9) for _ in range(3)]
    copies = [lambda s=s, d=d: ctypes.memmove(d.data_ptr(), s.data_ptr(), n) for s, d in zip(sources, slots)]
    memcpy = n / median_seconds(copies, repeats) / 1e9
    del sources, slots
    experts_file = pack.path / EXPERTS_FILE
    chunk = min(experts_file.stat().st_size, 64 * n, 2**30)

    into = memoryview(bytearray(chunk))  # touched once, as a slot is

    def read() -> None:
        with open(experts_file, "rb", buffering=0) as f:
            f.readinto(into)

    disk = chunk / median_seconds([read], max(2, repeats // 4)) / 1e9
    records = []
    for expert in range(min(4, c.num_local_experts)):
        record = torch.empty(n, dtype=torch.uint8)
        pack.read_record(0, expert, record)
        records.append(layout.views(record))
    x = torch.randn(1, c.hidden_size).to(dtype)
    with torch.inference_mode():
        expert = median_seconds([lambda w=w: expert_ffn(x, w) for w in records], repeats)
        weights = [torch.randn(4 * c.hidden_size, c.hidden_size).to(dtype) for _ in range(4)]
        per_matrix = median_seconds([lambda w=w: F.linear(x, w) for w in weights], repeats)
        dense = weights[0].numel() * weights[0].element_size() / per_matrix / 1e9
    del records, weights
    from offload.demo import DEMO_MODEL_DIR
    from offload.engine import Engine

    demo = Engine.load(DEMO_MODEL_DIR, device="cpu")
    demo.prefill([demo.tokenizer.bos_id])
    step = median_seconds([lambda: demo.decode(5)], repeats)
    layer_overhead = step / demo.config.num_hidden_layers
    demo.close()
    return {"memcpy_gbps": memcpy, "read_gbps": disk, "expert_s": expert, "dense_gbps": dense,
            "layer_overhead_s": layer_overhead}


def run_bench(args, slots: list[int]) -> list[dict]:
    command = [
        sys.executable, "-m", "cli", "bench", str(args.pack), "--replay", str(args.trace), "--policy", "lru",
        "--experts-per-layer", ",".join(map(str, slots)), "-p", str(args.prompt), "-n", str(args.gen),
        "-r", str(args.reps), "--device", "cpu", "-o", "json",
    ]
    if args.ram is not None:
        command += ["--ram", args.ram]
    print("$", " ".join(command[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"offload bench failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return [row for row in json.loads(done.stdout) if str(row["test"]).startswith("tg")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pack", type=Path, help="an offload pack (offload synth for a true-shape one)")
    parser.add_argument("trace", type=Path, help="an engine-format router trace (offload trace convert)")
    parser.add_argument("--slots", default="2,4,8", help="experts per layer to measure (comma list)")
    parser.add_argument("-p", "--prompt", type=int, default=16, help="prompt tokens (replayed from the trace)")
    parser.add_argument("-n", "--gen", type=int, default=32, help="decoded tokens")
    parser.add_argument("-r", "--reps", type=int, default=2, help="bench repetitions")
    parser.add_argument("--ram", default=None, help="RAM budget for experts (bench's --ram; default: bench's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of each machine measurement")
    args = parser.parse_args()
    slots = [int(s) for s in args.slots.split(",")]

    pack = Pack(args.pack)
    try:
        dtype, layout, attn_format = weight_formats(pack, torch.device("cpu"), None, None, None, None)
        config = pack.config
        before = measure_machine(pack, dtype, args.repeats)
        rows = run_bench(args, slots)
        after = measure_machine(pack, dtype, args.repeats)  # a busy machine: the better of the two
    finally:
        pack.close()
    attn = attn_format or str(dtype).removeprefix("torch.")
    m = {k: (min if k.endswith("_s") else max)(before[k], after[k]) for k in before}
    print(
        f"this machine: memcpy {m['memcpy_gbps']:.1f} GB/s (the link), warm read {m['read_gbps']:.1f} GB/s (the disk), "
        f"one {layout.fmt.name} expert FFN {m['expert_s'] * 1e3:.2f} ms, dense matmul {m['dense_gbps']:.1f} GB/s, "
        f"host work {m['layer_overhead_s'] * 1e3:.2f} ms per layer; "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    machine = Machine(
        "cpu", mem_gbps=m["dense_gbps"], link_gbps=m["memcpy_gbps"], disk_gbps=m["read_gbps"], efficiency=1.0,
        expert_seconds=m["expert_s"], layer_overhead_s=m["layer_overhead_s"], source="measured on this machine",
    )
    position = args.prompt + args.gen // 2
    print()
    print(f"{config.num_hidden_layers} layers, {layout.fmt.name} experts of {format_bytes(layout.nbytes)}, "
          f"-p {args.prompt} -n {args.gen}, policy lru, routing replayed from {args.trace.name}")
    print()
    print("| experts/layer | RAM tier | measured tg tok/s | measured hit rate | estimated hit rate "
          "| estimated tok/s | measured / estimated |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for row in rows:
        k = int(row["experts_per_layer"])
        host = row.get("host_experts")
        ram = None if host is None else int(host) * layout.nbytes
        plan = plan_memory(config, layout.nbytes, dtype, position + args.gen, experts_per_layer=k, ram=ram)
        est = estimate_decode(config, plan, machine, dtype=dtype, expert_format=layout.fmt, attn_format=attn,
                              position=position, trace=args.trace)
        measured = float(row["t_s_mean"])
        ratio = measured / est.tokens_per_s
        ratios.append(ratio)
        hit = row.get("hit_rate")
        print(f"| {k} | {plan.host_experts}/{plan.experts_total} | {measured:.2f} | "
              f"{'-' if hit is None else f'{hit:.3f}'} | {est.hit_rate:.3f} | {est.tokens_per_s:.2f} | {ratio:.2f} |")
    print()
    inside = sum(0.77 <= r <= 1.30 for r in ratios)
    print(f"{inside} of {len(ratios)} within 30%; median ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
