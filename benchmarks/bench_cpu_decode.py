"""CPU-only decode of true-shape Mixtral-8x7B packs against the machine's bandwidth bound.

What it measures: in one process, for each weight format of ``--formats`` (default bf16, nf4
and nf4-cpu), a synthetic pack of Mixtral-8x7B's first ``--layers`` layers (default 2;
``offload.synth.synthesize``, vocabulary 4096, seed 0; experts in the format, attention in the
same 4-bit format for the 4-bit rows, bf16 for bf16, unless ``--attn-bits 16``) is written under
``--dir`` (or reused there when it is already a pack of that name), loaded with every expert
resident in RAM (``Engine.load(..., device="cpu")``, no budget), and timed:

- decode: after a prefill of ``--prompt`` tokens, ``--tokens`` greedy steps (argmax fed back),
  tokens/s; the repetitions interleave the formats (forwards, then reversed) so a slow spell
  of a shared machine lands on all of them; medians are reported;
- the machine's read bandwidth (``benchmarks.benchlib.Bandwidth``: a streaming read of 1 GiB
  with torch's threads), timed once per repetition between the formats;
- the bandwidth bound: read bandwidth / weight bytes one token reads (every dense tensor of the
  pack but the embedding table, of which one row, plus top-k expert records per layer); and
  the measured tok/s as a share of that bound.

The 4-bit rows name the kernel that runs them: nf4 on offload's CPU kernel
(``offload.kernels.cpu4``, the path this CPU takes), nf4-cpu on bitsandbytes' fused CPU kernel
where it works (AVX-512 bf16 CPUs; elsewhere it unpacks and dequantizes on every call).

What it does not measure: load time, prefill speed, the expert cache (all experts are
resident), KV-cache reads (a short context), or real weights (random weights: only speed means
anything). Nothing here asserts a speed: benchmarks are not tests.

    python benchmarks/bench_cpu_decode.py --dir /tmp/packs
    python benchmarks/bench_cpu_decode.py --dir /tmp/packs --layers 4 --formats nf4,nf4-cpu --reps 5 --json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import Bandwidth, run, say  # noqa: E402
from offload import quant  # noqa: E402
from offload.checkpoint import read_header  # noqa: E402
from offload.engine import Engine  # noqa: E402
from offload.pack import Pack, is_pack  # noqa: E402
from offload.plan import BUILTIN_MODELS  # noqa: E402
from offload.synth import synthesize  # noqa: E402

MIB = 1 << 20
VOCAB = 4096  # the synthetic tokenizer's size (a preset's 32000 would make lm_head the biggest read)
DEFAULT_FORMATS = ("bf16", "nf4", "nf4-cpu")
FOUR_BIT = {"nf4", "nf4-dq", "fp4", "fp4-dq", "nf4-cpu", "fp4-cpu"}
BANDWIDTH_MIB = 1024


def pack_for(directory: Path, fmt: str, layers: int, attn_bits: int) -> Path:
    """The synthetic pack of ``fmt`` under ``directory``: reused when present, else written."""
    attn = fmt if fmt in FOUR_BIT and attn_bits == 4 else None
    path = directory / f"mixtral-{layers}l-{fmt}-attn{attn or 'bf16'}"
    if is_pack(path):
        return path
    say(f"writing {path.name} ...")
    config = dict(BUILTIN_MODELS["mixtral-8x7b"][1], vocab_size=VOCAB)
    return synthesize(config, path, layers=layers, expert_format=fmt, attn_format=attn, target="cpu", seed=0)


def bytes_per_token(path: Path) -> tuple[int, int]:
    """(weight bytes one decode token reads, of which the experts'): every dense tensor but the
    embedding table (one row of it), plus top-k expert records per layer."""
    with Pack(path) as pack:
        config, record = pack.config, pack.layout.nbytes
        experts = config.num_hidden_layers * config.num_experts_per_tok * record
    dense = 0
    for name, entry in read_header(path / "dense.safetensors").items():
        size = entry.end - entry.start
        dense += size // entry.shape[0] if name.endswith("embed_tokens.weight") else size
    return dense + experts, experts


def decode_seconds(engine: Engine, prompt: list[int], tokens: int) -> float:
    engine.reset()
    logits = engine.prefill(prompt)  # [vocab]
    start = time.perf_counter()
    for _ in range(tokens):
        logits = engine.decode(int(logits.argmax()))
    return time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        quant.get_format(fmt)  # SettingError naming a bad one
    kernels = quant.select_kernels("cpu").description
    with contextlib.ExitStack() as stack:
        directory = Path(args.dir) if args.dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cpu-decode-")))
        directory.mkdir(parents=True, exist_ok=True)
        packs = {fmt: pack_for(directory, fmt, args.layers, args.attn_bits) for fmt in formats}
        bandwidth = Bandwidth(args.bandwidth_mib * MIB, torch.device("cpu"))
        engines = {}
        for fmt, path in packs.items():
            say(f"loading {path.name} ...")
            engines[fmt] = Engine.load(path, device="cpu")
        prompt = [1] + [3 + (i * 37) % (VOCAB - 3) for i in range(args.prompt - 1)]
        times: dict[str, list[float]] = {fmt: [] for fmt in formats}
        bandwidth.read()  # warm-up
        for engine in engines.values():
            decode_seconds(engine, prompt, min(4, args.tokens))  # untimed warm-up
        for rep in range(args.reps):
            say(f"repetition {rep + 1}/{args.reps}")
            for fmt in formats if rep % 2 == 0 else formats[::-1]:
                times[fmt].append(decode_seconds(engines[fmt], prompt, args.tokens))
                bandwidth.measure()
        for engine in engines.values():
            engine.close()
        sizes = {fmt: bytes_per_token(path) for fmt, path in packs.items()}  # before a temporary --dir goes
    gbps = bandwidth.gb_per_s()
    rows = {}
    for fmt in formats:
        total, experts = sizes[fmt]
        tok_s = args.tokens / statistics.median(times[fmt])
        bound = gbps * 1e9 / total
        rows[fmt] = {"tokens_per_s": tok_s, "bytes_per_token": total, "expert_bytes_per_token": experts,
                     "bound_tokens_per_s": bound, "share_of_bound": tok_s / bound,
                     "runs_tokens_per_s": [args.tokens / t for t in times[fmt]]}
    return {
        "machine": f"{torch.get_num_threads()} threads, {cpu_model()}",
        "kernels": kernels,
        "layers": args.layers, "tokens": args.tokens, "prompt": args.prompt, "reps": args.reps,
        "read_bandwidth_gb_per_s": gbps, "bandwidth_method": bandwidth.method,
        "formats": rows,
    }


def cpu_model() -> str:
    from offload.kernels.cpu4 import _cpu_model

    return _cpu_model()


def print_report(r: dict) -> None:
    print(f"machine: CPU, {r['machine']}, torch {torch.__version__}; {r['reps']} reps, medians, interleaved")
    print(f"compute: {r['kernels']}")
    print(f"read bandwidth: {r['read_bandwidth_gb_per_s']:.1f} GB/s ({r['bandwidth_method']})")
    print(f"model: Mixtral-8x7B's shapes, first {r['layers']} layers, vocabulary {VOCAB}; decode of "
          f"{r['tokens']} tokens after a {r['prompt']}-token prompt, every expert resident in RAM")
    print()
    print(f"{'format':10} {'MiB/token':>10} {'experts':>8} {'tok/s':>8} {'bound':>8} {'share':>6} {'vs bf16':>8}")
    base = r["formats"].get("bf16", {}).get("tokens_per_s")
    for fmt, row in r["formats"].items():
        ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{fmt:10} {row['bytes_per_token'] / MIB:10.1f} {row['expert_bytes_per_token'] / MIB:8.1f} "
              f"{row['tokens_per_s']:8.2f} {row['bound_tokens_per_s']:8.2f} {row['share_of_bound']:6.2f} {ratio:>8}")
    print()
    print("MiB/token: weight bytes one decode token reads (experts: of which top-k expert records); "
          "bound: read bandwidth / those bytes; share: tok/s over the bound")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated weight formats")
    parser.add_argument("--layers", type=int, default=2, help="layers of Mixtral-8x7B in each pack")
    parser.add_argument("--attn-bits", type=int, choices=(4, 16), default=4,
                        help="4: attention in the 4-bit rows' own format; 16: bf16 attention everywhere")
    parser.add_argument("--dir", default=None, help="where the packs are kept (reused when present); default a temporary directory")
    parser.add_argument("--tokens", type=int, default=24, help="decode steps timed per repetition")
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens before the decode")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--bandwidth-mib", type=int, default=BANDWIDTH_MIB)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for flag in ("layers", "tokens", "prompt", "reps", "bandwidth_mib"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(run(None, parse_args, bench, print_report))
