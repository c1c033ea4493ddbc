"""Prefill and decode speed of this engine against transformers, on the same checkpoint files.

What it measures: in one process, on one device and dtype, it writes a synthetic Mixtral
checkpoint (``tests.model_builder.write_tiny_mixtral``, hub layout) into a temporary directory,
loads it with ``offload.Engine`` and with transformers' ``MixtralForCausalLM``, and times for each
(after one untimed warm-up) ``--reps`` repetitions of:

- prefill: one forward pass over a fixed, seeded prompt of ``--prompt-tokens`` ids (BOS first),
  filling the KV cache; reported as prompt tokens/s;
- decode: ``--gen-tokens`` greedy steps, each feeding the argmax of the previous logits back
  with the cache; reported as generated tokens/s (the argmax is inside the timed loop for both).

It prints mean ± std over the repetitions, the ratio offload / transformers, the decode
bandwidth implied by the weights one token reads (dense weights plus the K active experts of
each layer; KV cache reads are not counted), and whether the two greedy token streams agree
(they should in float32; in bfloat16 rounding can flip a router choice, so a difference there
is reported, not treated as a failure).

What it does not measure: memory, load time as users see it (the checkpoint is fresh in the page
cache), sampling, tokenization, batching, long contexts, or real weights (the weights are random,
so only speed and agreement mean anything). Transformers runs with its defaults (a growing
``DynamicCache``; its attention and experts implementations are printed). Nothing here asserts
a speed: benchmarks are not tests.

    python benchmarks/bench_engine.py --shape small --dtype float32
    python benchmarks/bench_engine.py --shape medium --json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: tests.model_builder lives at the root
    sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import run, say  # noqa: E402
from offload.device import DEVICE_CHOICES, device_name, resolve_device, synchronize  # noqa: E402
from offload.engine import Engine, parse_dtype  # noqa: E402
from tests.model_builder import TinyShape, write_tiny_mixtral  # noqa: E402

BOS_ID = 1
FIRST_ORDINARY_ID = 3  # after <unk> 0, <s> 1, </s> 2
PROMPT_SEED = 1234
WEIGHT_SEED = 0
WARMUP_DECODE_STEPS = 8
NOISY = 0.15  # std / mean above which the table says the numbers are noisy

# Sizes on top of TinyShape's defaults (vocab 512, the tokenizer builder's size, is kept).
# medium keeps Mixtral's head dim (128) and 4 query heads per KV head; ~1.3 GB in float32.
SHAPES: dict[str, TinyShape] = {
    "tiny": TinyShape("tiny"),
    "small": TinyShape("small", {
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    }),
    "medium": TinyShape("medium", {
        "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 6,
        "num_attention_heads": 8, "num_key_value_heads": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    }),
}


# ---- what one engine looks like to the timer ------------------------------------------------------

@dataclass
class Runner:
    """Prefill ids -> logits [V]; decode one token -> logits [V]. Each prefill starts a new sequence."""

    name: str
    prefill: Callable[[list[int]], torch.Tensor]
    decode: Callable[[int], torch.Tensor]
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Timings:
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # greedy tokens of each repetition
    load_seconds: float = 0.0


def offload_runner(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Runner:
    engine = Engine.load(model_dir, device=str(device), dtype=dtype)
    return Runner("offload", engine.prefill, engine.decode)


def cache_of(out) -> object:
    """The KV cache of a transformers output: 5.x takes it as ``cache=`` and, from some 5.x on,
    returns it as ``.cache`` too (``.past_key_values`` still works there, with a warning)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def transformers_runner(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Runner:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    state: dict[str, object] = {"past": None}

    @torch.inference_mode()
    def prefill(ids: list[int]) -> torch.Tensor:
        out = model(torch.tensor([ids], device=device), use_cache=True)
        state["past"] = cache_of(out)
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(token: int) -> torch.Tensor:
        out = model(torch.tensor([[token]], device=device), cache=state["past"], use_cache=True)
        state["past"] = cache_of(out)
        return out.logits[0, -1]

    notes = {
        "attention": str(getattr(model.config, "_attn_implementation", "?")),
        "experts": str(getattr(model.config, "_experts_implementation", None) or "default"),
    }
    return Runner("transformers", prefill, decode, notes)


# ---- timing -------------------------------------------------------------------------------------

def greedy_run(runner: Runner, ids: list[int], steps: int, device: torch.device) -> tuple[float, float, list[int]]:
    """One timed prefill then ``steps`` greedy decode steps: (prefill s, decode s, tokens fed)."""
    synchronize(device)
    start = time.perf_counter()
    logits = runner.prefill(ids)
    synchronize(device)
    prefill_s = time.perf_counter() - start

    tokens: list[int] = []
    start = time.perf_counter()
    token = int(logits.argmax())
    for _ in range(steps):
        tokens.append(token)
        token = int(runner.decode(token).argmax())
    synchronize(device)
    return prefill_s, time.perf_counter() - start, tokens


def load(make: Callable[[], Runner], device: torch.device) -> tuple[Runner, float]:
    start = time.perf_counter()
    runner = make()
    synchronize(device)
    return runner, time.perf_counter() - start


def measure(
    runners: list[Runner], ids: list[int], steps: int, reps: int, device: torch.device
) -> dict[str, Timings]:
    """Warm each runner up once, then interleave their repetitions (A B, B A, A B, ...) so that
    a slow spell of the machine (another process, a clock change) lands on both, not on one."""
    timings = {r.name: Timings() for r in runners}
    for runner in runners:
        greedy_run(runner, ids, min(steps, WARMUP_DECODE_STEPS), device)  # untimed
    for rep in range(reps):
        for runner in runners if rep % 2 == 0 else runners[::-1]:
            prefill_s, decode_s, tokens = greedy_run(runner, ids, steps, device)
            t = timings[runner.name]
            t.prefill_seconds.append(prefill_s)
            t.decode_seconds.append(decode_s)
            t.tokens.append(tokens)
    return timings


# ---- numbers ------------------------------------------------------------------------------------

def rates(count: int, seconds: list[float]) -> dict[str, float | list[float]]:
    runs = [count / s for s in seconds]
    return {
        "mean": statistics.fmean(runs),
        "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
        "median": statistics.median(runs),
        "runs": runs,
    }


def active_bytes_per_token(config: dict, dtype: torch.dtype) -> int:
    """Weight bytes one decode step reads: dense weights, K of E experts per layer, lm_head."""
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, G = config["num_attention_heads"], config["num_key_value_heads"]
    Dh = config.get("head_dim") or D // H
    E, K = config["num_local_experts"], config["num_experts_per_tok"]
    attention = D * H * Dh * 2 + D * G * Dh * 2  # q, o, k, v
    per_layer = attention + E * D + 2 * D + K * 3 * D * I  # router, two norms, active experts
    params = config["num_hidden_layers"] * per_layer + D + V * D + D  # final norm, lm_head, one embedding row
    return params * torch.empty((), dtype=dtype).element_size()


def greedy_agreement(ours: list[int], theirs: list[int]) -> dict[str, int | bool | None]:
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {"agree": first is None, "compared": len(ours), "first_difference": first}


def stable(timings: Timings) -> bool:
    """Every repetition produced the same greedy tokens (a determinism check, not a speed one)."""
    return all(t == timings.tokens[0] for t in timings.tokens)


# ---- output -------------------------------------------------------------------------------------

def agreement_line(result: dict) -> str:
    g, dtype = result["greedy"], result["dtype"]
    if g["agree"]:
        return f"greedy tokens: {g['compared']}/{g['compared']} agree between offload and transformers"
    step = g["first_difference"]
    if dtype == "float32":
        why = "UNEXPECTED in float32: check tests/test_equivalence.py"
    else:
        why = f"expected possible in {dtype}: rounding can flip a router choice, and the streams part"
    return f"greedy tokens: differ from step {step} of {g['compared']} ({why})"


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    shape = result["shape"]
    c = shape["config"]
    console.print(f"{result['machine']} · torch {result['torch']} · transformers {result['transformers']}")
    console.print(
        f"shape {shape['name']}: D {c['hidden_size']}, I {c['intermediate_size']}, "
        f"L {c['num_hidden_layers']}, E {c['num_local_experts']} top-{c['num_experts_per_tok']}, "
        f"heads {c['num_attention_heads']}/{c['num_key_value_heads']} KV, V {c['vocab_size']} "
        f"({shape['checkpoint_bytes'] / 1e6:.0f} MB on disk) · {result['dtype']} · {result['reps']} reps"
    )
    table = Table()
    table.add_column("engine", no_wrap=True)
    table.add_column(f"pp{result['prompt_tokens']} tok/s", justify="right", no_wrap=True)
    table.add_column(f"tg{result['gen_tokens']} tok/s", justify="right", no_wrap=True)
    table.add_column("decode GB/s", justify="right", no_wrap=True)
    table.add_column("load s", justify="right", no_wrap=True)
    notes = []
    for name, e in result["engines"].items():
        p, d = e["prefill_tokens_per_s"], e["decode_tokens_per_s"]
        table.add_row(
            name,
            f"{p['mean']:.1f} ± {p['std']:.1f}",
            f"{d['mean']:.1f} ± {d['std']:.1f}",
            f"{e['decode_gb_per_s']:.2f}",
            f"{e['load_seconds']:.2f}",
        )
        if e["notes"]:
            notes.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in e["notes"].items()))
        if not e["deterministic"]:
            notes.append(f"{name}: the repetitions produced different greedy tokens")
    console.print(table)
    noisy = [
        name for name, e in result["engines"].items()
        for rate in (e["prefill_tokens_per_s"], e["decode_tokens_per_s"])
        if rate["std"] > NOISY * rate["mean"]
    ]
    if noisy:
        notes.append(
            f"noisy: std above {NOISY:.0%} of the mean for {', '.join(sorted(set(noisy)))}; "
            "something else may share the machine (--json lists every repetition)"
        )
    for line in notes:
        console.print(line)
    console.print("decode GB/s: weights one token reads (dense + active experts) × tok/s; KV cache not counted")
    console.print(agreement_line(result))
    r = result["ratio"]
    console.print(f"offload / transformers: prefill {r['prefill']:.2f}x, decode {r['decode']:.2f}x")


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: torch's own choice); 1 is steadier on a shared machine",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    for flag in ("prompt_tokens", "gen_tokens", "reps", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def run_engines(
    model_dir: Path, ids: list[int], args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Timings], dict[str, dict[str, str]]]:
    """Load both engines from ``model_dir`` and time them; their weights are freed on return."""
    runners, loaded = [], {}
    for make in (offload_runner, transformers_runner):
        runner, seconds = load(lambda make=make: make(model_dir, device, dtype), device)
        runners.append(runner)
        loaded[runner.name] = seconds
        say(f"{runner.name}: loaded in {seconds:.2f} s")
    say(f"warm-up, then {args.reps} × (pp{args.prompt_tokens} + tg{args.gen_tokens}) each, interleaved ...")
    timings = measure(runners, ids, args.gen_tokens, args.reps, device)
    for name, t in timings.items():
        t.load_seconds = loaded[name]
    return timings, {r.name: r.notes for r in runners}


def bench(args: argparse.Namespace) -> dict:
    import transformers

    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    base = SHAPES[args.shape]
    context = args.prompt_tokens + args.gen_tokens + 1
    shape = TinyShape(base.name, {**base.overrides, "max_position_embeddings": max(512, context)})
    config = shape.config_kwargs()
    ids = [BOS_ID] + torch.randint(
        FIRST_ORDINARY_ID, config["vocab_size"], (args.prompt_tokens - 1,),
        generator=torch.Generator().manual_seed(PROMPT_SEED),
    ).tolist()

    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        say(f"writing the {shape.name} checkpoint (seed {WEIGHT_SEED}) to {tmp} ...")
        model_dir = write_tiny_mixtral(Path(tmp) / shape.name, shape, seed=WEIGHT_SEED, shard_size="1GB")
        checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        gc.collect()
        timings, notes = run_engines(model_dir, ids, args, device, dtype)
        gc.collect()  # the engines are gone: free their weights before the directory goes

    per_token = active_bytes_per_token(config, dtype)
    out_engines = {}
    for name, t in timings.items():
        decode = rates(args.gen_tokens, t.decode_seconds)
        out_engines[name] = {
            "prefill_tokens_per_s": rates(args.prompt_tokens, t.prefill_seconds),
            "decode_tokens_per_s": decode,
            "decode_gb_per_s": decode["mean"] * per_token / 1e9,
            "load_seconds": t.load_seconds,
            "deterministic": stable(t),
            "notes": notes[name],
        }
    ours, theirs = out_engines["offload"], out_engines["transformers"]
    return {
        "machine": device_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": {"name": shape.name, "config": config, "checkpoint_bytes": checkpoint_bytes,
                  "active_weight_bytes_per_token": per_token},
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "engines": out_engines,
        "ratio": {
            "prefill": ours["prefill_tokens_per_s"]["mean"] / theirs["prefill_tokens_per_s"]["mean"],
            "decode": ours["decode_tokens_per_s"]["mean"] / theirs["decode_tokens_per_s"]["mean"],
        },
        "greedy": greedy_agreement(timings["offload"].tokens[0], timings["transformers"].tokens[0]),
    }


def main(argv: list[str] | None = None) -> int:
    return run(argv, parse_args, bench, print_report)


if __name__ == "__main__":
    sys.exit(main())
