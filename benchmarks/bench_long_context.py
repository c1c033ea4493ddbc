"""Long prompts: prefill memory as the prompt grows, chunk sizes, decode cost per position, KV bytes.

On a tiny Mixtral with a 32k context (``--model``, default a synthetic pack written by
``offload.synth`` to a temporary folder: hidden 64, 3 layers, 4 query and 2 KV heads of 16, 8
experts top-2, vocabulary 4096, rope_theta 1e6, fp32), in one run:

1. memory: for each prompt length (``--lengths``, default 1k .. 32k) and KV width (16, 8), a
   child process loads the engine with that context, runs a 256-token warm-up prompt, resets the
   kernel's peak-RSS mark (``/proc/self/clear_refs``), prefills the prompt at the default chunk
   and reads the peak (``VmHWM``): growth over the RSS before the prompt, against the stated
   bound, the memory plan's reserve for one chunk (``offload.plan.runtime_reserve``'s terms
   that are not CUDA's own: attention over the chunk with its mask, expert activations, hidden
   states, logits, the allocator margin). The KV cache and rotary tables are allocated at load
   and are not part of the growth; their bytes are printed beside it.
2. chunks: prefill tokens/s of one prompt (``--chunk-prompts``, default 8k and 32k) in chunks of
   256 and 1024 and unchunked (one pass of the whole prompt), repetitions interleaved; the ratio
   of each to unchunked.
3. decode: ms per decode token (median of ``--decode-steps``) with S = 1k .. 32k positions held
   (the last less the steps, which must fit in the model's context), 16-bit and 8-bit KV timed in
   alternation (one sequence each, extended from length to length and cut back to it after the
   steps); a least-squares line
   ms = a + b * S and its worst relative residual (linear growth: small residuals), and 8-bit
   over 16-bit.
4. kv: KV cache bytes at 32k, 16-bit and 8-bit: this model, Mixtral-8x7B, and Mixtral-8x7B with
   a 4096-token sliding window (a ring: ``offload.model.kv_capacity``).
5. mask: one 256-token chunk's SDPA alone against S = 256 (the first chunk) and ``--mask-keys``
   keys, median times: with the mask the engine gives it on this device (``prefill_mask``:
   ``is_causal`` for the first chunk; for a later one an additive [T, S] mask made once per pass
   on a CPU, the lower-right causal bias on CUDA), with a bool mask made in the call (the
   engine's way before), and with no mask (the floor), at this model's head shape and at
   Mixtral's (32 query heads, 8 KV heads of 128).

It prints the machine (lscpu's "Model name"). Nothing here asserts a speed: benchmarks are not
tests. What it does not measure: a GPU (run it there too: ``torch.cuda.max_memory_allocated``
replaces RSS on CUDA), a trained model's routing, or the expert cache (every expert resident).

    python benchmarks/bench_long_context.py
    python benchmarks/bench_long_context.py --parts chunks,decode --lengths 1024,4096 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_synth import cpu_model  # noqa: E402
from benchmarks.benchlib import run, say, timed  # noqa: E402
from offload.device import is_cuda, resolve_device  # noqa: E402
from offload.engine import Engine  # noqa: E402
from offload.model import kv_cache_nbytes  # noqa: E402
from offload.plan import PREFILL_CHUNK_TOKENS  # noqa: E402

PARTS = ("memory", "chunks", "decode", "kv", "mask")
TINY_32K = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 4096, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
CUDA_ONLY_TERMS = ("CUDA context", "cuBLAS workspaces")  # not a chunk's; a CPU has neither
MIXTRAL_ATTENTION = (32, 8, 128)  # query heads, KV heads, head dim


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def load(args: argparse.Namespace, context: int, kv_bits: int = 16) -> Engine:
    return Engine.load(args.model, device=args.device, dtype=args.dtype, context_length=context, kv_bits=kv_bits)


# ---- 1. memory ---------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: the peak memory growth of one prefill of ``args.child_memory`` tokens."""
    n = args.child_memory
    engine = load(args, n, args.kv_bits)
    vocab = engine.config.vocab_size
    engine.prefill(prompt_ids(min(256, n), vocab, seed=1))  # warm-up: kernels, allocator pools
    engine.reset()
    ids = prompt_ids(n, vocab)
    device = engine.device
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark starts again from now
        before = rss_bytes()
    start = time.perf_counter()
    engine.prefill(ids)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if is_cuda(device) else peak_rss_bytes()
    return {"tokens": n, "kv_bits": args.kv_bits, "growth": peak - before, "before": before,
            "kv_bytes": engine.model.cache.nbytes, "chunk": engine.prefill_chunk, "seconds": seconds,
            "measure": "torch.cuda.max_memory_allocated" if is_cuda(device) else "VmHWM - VmRSS"}


def chunk_bound(engine: Engine, context: int, chunk: int, kv_bits: int) -> dict[str, int] | None:
    """The memory plan's reserve for one prefill chunk at ``context``, its CUDA-only terms left
    out; None where the plan cannot say (an older ``runtime_reserve``)."""
    from offload import plan

    try:
        reserve = plan.runtime_reserve(engine.config, engine.dtype, str(engine.dtype).removeprefix("torch."),
                                       str(engine.dtype).removeprefix("torch."), "cuda", context=context,
                                       prefill_tokens=chunk, kv_bits=kv_bits)
    except TypeError:
        return None
    return {t.name: t.nbytes for t in reserve.terms if t.name not in CUDA_ONLY_TERMS}


def bench_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    probe = load(args, max(args.lengths))
    for n in args.lengths:
        for bits in (16, 8):
            say(f"memory: prefill of {n} tokens, {bits}-bit KV, in a child process")
            cmd = [sys.executable, __file__, "--child-memory", str(n), "--kv-bits", str(bits), "--model",
                   str(args.model), "--dtype", args.dtype, "--device", args.device]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            terms = chunk_bound(probe, n, row["chunk"], bits)
            row["bound"] = None if terms is None else sum(terms.values())
            row["bound_terms"] = terms
            rows.append(row)
    probe.close()
    return rows


# ---- 2. chunks ---------------------------------------------------------------------------------


def bench_chunks(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    engine = load(args, max(args.chunk_prompts))
    for n in args.chunk_prompts:
        ids = prompt_ids(n, engine.config.vocab_size, seed=2)
        ways = {"256": 256, "1024": 1024, "unchunked": n}
        times: dict[str, list[float]] = {w: [] for w in ways}
        for rep in range(args.reps):
            for way, chunk in ways.items():
                say(f"chunks: {n} tokens, {way}, repetition {rep + 1} of {args.reps}")
                engine.prefill_chunk = chunk
                times[way].append(timed(lambda ids=ids: engine.prefill(ids), engine.device))
        base = n / statistics.median(times["unchunked"])
        for way in ways:
            tps = n / statistics.median(times[way])
            rows.append({"tokens": n, "way": way, "tokens_per_s": tps, "ratio_to_unchunked": tps / base,
                         "seconds_all": times[way]})
    engine.prefill_chunk = PREFILL_CHUNK_TOKENS
    engine.close()
    return rows


# ---- 3. decode ---------------------------------------------------------------------------------


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; (a, b, the largest |residual| / y)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Both KV widths loaded at once and timed in alternation, step by step, so that a slow
    spell of a shared machine lands on both."""
    from offload.config import ModelConfig

    limit = ModelConfig.from_dir(args.model).max_position_embeddings
    context = min(limit, max(args.lengths) + args.decode_steps + 1)
    lengths = [min(S, context - args.decode_steps - 1) for S in args.lengths]  # the last steps fit
    engines = {bits: load(args, context, bits) for bits in (16, 8)}
    ids = prompt_ids(max(lengths), engines[16].config.vocab_size, seed=3)
    times: dict[int, list[list[float]]] = {bits: [] for bits in engines}
    held = 0
    for S in lengths:
        say(f"decode: {S} positions held, 16-bit and 8-bit KV")
        tokens = {bits: int(e.extend(ids[held:S]).argmax()) for bits, e in engines.items()}
        steps: dict[int, list[float]] = {bits: [] for bits in engines}
        for _ in range(args.decode_steps):
            for bits, e in engines.items():
                steps[bits].append(timed(lambda e=e, t=tokens[bits]: e.decode(t), e.device))
        for bits, e in engines.items():
            times[bits].append(steps[bits])
            e.truncate(S)  # back to the prompt: the next length extends it
        held = S
    out: dict[str, Any] = {"steps": args.decode_steps}
    for bits, e in engines.items():
        rows = [{"positions": S, "ms_per_token": 1e3 * statistics.median(t)} for S, t in zip(lengths, times[bits])]
        a, b, worst = linear_fit([r["positions"] for r in rows], [r["ms_per_token"] for r in rows])
        for r in rows:
            r["ratio_to_first"] = r["ms_per_token"] / rows[0]["ms_per_token"]
        out[str(bits)] = {"rows": rows, "fit_ms_at_0": a, "fit_ms_per_1k_positions": 1e3 * b,
                          "fit_worst_residual": worst, "kv_bytes": e.model.cache.nbytes}
        e.close()
    out["ratio_8_to_16"] = [r8["ms_per_token"] / r16["ms_per_token"]
                            for r8, r16 in zip(out["8"]["rows"], out["16"]["rows"])]
    return out


# ---- 4. kv -------------------------------------------------------------------------------------


def bench_kv(args: argparse.Namespace) -> list[dict[str, Any]]:
    import dataclasses

    from offload.config import ModelConfig
    from offload.plan import builtin_model

    context = 32768
    mixtral = builtin_model("mixtral-8x7b")[1]
    models = [
        ("this model", ModelConfig.from_dir(args.model), torch.float32 if args.dtype == "float32" else torch.bfloat16),
        ("Mixtral-8x7B", mixtral, torch.bfloat16),
        ("Mixtral-8x7B, 4096-token window", dataclasses.replace(mixtral, sliding_window=4096), torch.bfloat16),
    ]
    rows = []
    for name, config, dtype in models:
        b16 = kv_cache_nbytes(config, context, dtype, 16, PREFILL_CHUNK_TOKENS)
        b8 = kv_cache_nbytes(config, context, dtype, 8, PREFILL_CHUNK_TOKENS)
        rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "context": context,
                     "bytes_16": b16, "bytes_8": b8, "ratio_8_to_16": b8 / b16})
    return rows


# ---- 5. mask -----------------------------------------------------------------------------------


def bench_mask(args: argparse.Namespace, config) -> list[dict[str, Any]]:
    """One chunk's SDPA three ways: the mask the engine gives it (``offload.model.prefill_mask``,
    made once per pass and shared by every layer, so not timed here), a bool [T, S] mask made in
    the call (what the engine did before: per layer, and SDPA turns it into a float one), and no
    mask (the first chunk: ``is_causal``'s own triangle; a later chunk: no mask at all, a floor
    no mask strategy could beat on this device)."""
    from offload.model import prefill_mask

    device = resolve_device(args.device)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    T = PREFILL_CHUNK_TOKENS
    shapes = [("this model", config.num_attention_heads, config.num_key_value_heads, config.head_dim),
              ("Mixtral", *MIXTRAL_ATTENTION)]
    rows = []
    g = torch.Generator(device=device).manual_seed(0)

    def median_ms(fn) -> float:
        fn()
        return 1e3 * statistics.median(timed(fn, device) for _ in range(args.reps + 1))

    for name, H, G, Dh in shapes:
        q = torch.randn(1, H, T, Dh, generator=g, device=device, dtype=dtype)  # [1, H, T, Dh]
        for S in (T, *args.mask_keys):
            say(f"mask: {name}, a chunk of {T} against {S} keys")
            k = torch.randn(1, G, S, Dh, generator=g, device=device, dtype=dtype)  # [1, G, S, Dh]
            mask, causal = prefill_mask(S - T, T, 0, None, device, dtype)  # [T, S], or none

            def bool_mask(q=q, k=k, S=S):
                m = torch.arange(S, device=device)[None, :] <= torch.arange(S - T, S, device=device)[:, None]  # [T, S]
                return F.scaled_dot_product_attention(q, k, k, attn_mask=m, enable_gqa=True)

            def engine_way(q=q, k=k, mask=mask, causal=causal):
                return F.scaled_dot_product_attention(q, k, k, attn_mask=mask, is_causal=causal, enable_gqa=True)

            def floor(q=q, k=k, S=S):
                return F.scaled_dot_product_attention(q, k, k, is_causal=S == T, enable_gqa=True)

            engine_ms, floor_ms = median_ms(engine_way), median_ms(floor)
            way = "is_causal" if causal else "additive mask" if type(mask) is torch.Tensor else "lower-right bias"
            rows.append({"shape": name, "keys": S, "engine": way,
                         "bool_mask_ms": median_ms(bool_mask), "engine_ms": engine_ms, "floor_ms": floor_ms})
    return rows


# ---- the run -----------------------------------------------------------------------------------


def synthetic_model(folder: Path) -> Path:
    from offload.synth import synthesize

    say("writing the synthetic 32k-context model")
    return synthesize(dict(TINY_32K), folder / "tiny-32k", dtype=torch.float32)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.child_memory is not None:
        return child_memory(args)
    temp = None
    if args.model is None:
        temp = tempfile.TemporaryDirectory(prefix="bench-long-")
        args.model = synthetic_model(Path(temp.name))
    try:
        from offload.config import ModelConfig

        config = ModelConfig.from_dir(args.model)
        result: dict[str, Any] = {
            "machine": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": args.device, "dtype": args.dtype, "model": str(args.model) if temp is None else "synthetic tiny 32k",
            "shape": {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                      "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
                      "experts": config.num_local_experts, "top_k": config.num_experts_per_tok},
            "chunk": PREFILL_CHUNK_TOKENS,
        }
        if "kv" in args.parts:
            result["kv"] = bench_kv(args)
        if "mask" in args.parts:
            result["mask"] = bench_mask(args, config)
        if "memory" in args.parts:
            result["memory"] = bench_memory(args)
        if "chunks" in args.parts:
            result["chunks"] = bench_chunks(args)
        if "decode" in args.parts:
            result["decode"] = bench_decode(args)
        return result
    finally:
        if temp is not None:
            temp.cleanup()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_report(r: dict[str, Any]) -> None:
    if "growth" in r:  # a child's one line
        print(json.dumps(r))
        return
    s = r["shape"]
    print(f"machine: {r['machine']}, {r['threads']} threads, torch {r['torch']}, device {r['device']}, {r['dtype']}")
    print(f"model: {r['model']} (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV "
          f"of {s['head_dim']}, {s['experts']} experts top-{s['top_k']}); default chunk {r['chunk']}")
    if "kv" in r:
        print("\nKV cache bytes at 32k positions:")
        for row in r["kv"]:
            print(f"  {row['model']:<34} {row['dtype']:<9} 16-bit {mib(row['bytes_16']):>12}   8-bit "
                  f"{mib(row['bytes_8']):>12}   8/16 = {row['ratio_8_to_16']:.3f}")
    if "mask" in r:
        print("\nSDPA of one 256-token chunk against S keys, median ms (ratio to the floor: no mask, or is_causal at S = T):")
        for row in r["mask"]:
            f = row["floor_ms"]
            print(f"  {row['shape']:<11} S {row['keys']:>6}  bool mask made per call {row['bool_mask_ms']:9.2f} "
                  f"(x{row['bool_mask_ms'] / f:.2f})  engine ({row['engine']}) {row['engine_ms']:9.2f} "
                  f"(x{row['engine_ms'] / f:.2f})  floor {f:9.2f}")
    if "memory" in r:
        print("\nprefill memory growth (peak over the loaded engine), default chunk:")
        for row in r["memory"]:
            bound = "n/a" if row["bound"] is None else mib(row["bound"])
            within = "" if row["bound"] is None else ("  within" if row["growth"] <= row["bound"] else "  ABOVE")
            terms = row["bound_terms"] or {}
            attention = f", attention {mib(terms['attention'])}" if "attention" in terms else ""
            print(f"  {row['tokens']:>6} tokens  {row['kv_bits']:>2}-bit KV  growth {mib(row['growth']):>10}  bound "
                  f"{bound:>10}{within}{attention}   (KV cache {mib(row['kv_bytes'])}, "
                  f"{row['tokens'] / row['seconds']:.0f} tok/s, {row['measure']})")
        if r["memory"] and r["memory"][0]["bound_terms"]:
            names = ", ".join(f"{k} {mib(v)}" for k, v in r["memory"][-1]["bound_terms"].items())
            print(f"  bound: the plan's reserve for one chunk without CUDA's own terms; at the longest: {names}")
    if "chunks" in r:
        print("\nprefill tokens/s by chunk size (ratio to one unchunked pass of the whole prompt):")
        for row in r["chunks"]:
            print(f"  {row['tokens']:>6} tokens  {row['way']:>9}  {row['tokens_per_s']:9.0f} tok/s  "
                  f"x{row['ratio_to_unchunked']:.2f}")
    if "decode" in r:
        d = r["decode"]
        print("\ndecode ms per token by positions held:")
        for bits in ("16", "8"):
            rows = d[bits]["rows"]
            line = "  ".join(f"{row['positions']}: {row['ms_per_token']:.2f} (x{row['ratio_to_first']:.2f})" for row in rows)
            print(f"  {bits:>2}-bit KV  {line}")
            print(f"            fit: {d[bits]['fit_ms_at_0']:.2f} ms + {d[bits]['fit_ms_per_1k_positions']:.3f} ms "
                  f"per 1k positions, worst residual {100 * d[bits]['fit_worst_residual']:.1f} %")
        print("  8-bit / 16-bit: " + "  ".join(f"{x:.2f}" for x in d["ratio_8_to_16"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a model directory or pack (default: synthetic tiny 32k)")
    parser.add_argument("--parts", type=lambda t: t.split(","), default=list(PARTS), help=",".join(PARTS))
    parser.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--chunk-prompts", type=ints, default=[8192, 32768])
    parser.add_argument("--mask-keys", type=ints, default=[4096, 32768])
    parser.add_argument("--decode-steps", type=int, default=48)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kv-bits", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


if __name__ == "__main__":
    sys.exit(run(None, parse_args, bench, print_report))
