"""The expert cache's benchmark: peak memory under a RAM budget, and decode speed under expert budgets.

Memory (``--part memory``). It writes a synthetic Mixtral checkpoint of random bf16 weights in
the Hugging Face hub layout (``write_synthetic_mixtral``: one safetensors shard per layer plus
the index, config.json and a 512-piece tokenizer; one layer in memory at a time) with 2.13 GiB
of experts (D 1024, I 3584, 13 layers, 8 experts top-2: 104 experts of 21 MiB), converts it to
an offload pack (bf16), and then, each in a fresh subprocess so that its resident set is only
the engine's, loads the pack on the CPU and generates (32 random prompt ids, 32 new tokens,
greedy, EOS ignored) three ways:

- budget: 2 experts per layer in "device" slots and RAM for a quarter of all experts' bytes;
- RAM all: the same slots, the RAM tier unbounded (``ram=None``: it holds every expert);
- resident: no budget, every expert loaded (the engine without the cache).

For each it prints the resident set before loading (Python, torch and the imports), the peak
(``getrusage`` ru_maxrss, and psutil sampled every 2 ms), what the engine should hold (dense
weights, KV cache, device slots, which on a CPU are RAM too, and the host tier) and the check
``peak - baseline <= dense + KV cache + device slots + host tier + margin`` (``--margin``,
256 MiB by default: activations, the allocator's slack, page tables, the tokenizer), with PASS
or FAIL beside it. It is a benchmark: it prints, and exits 0 either way.

Speed (``--part speed``). On a smaller synthetic model (D 512, I 1792, 8 layers, 8 experts,
336 MiB of experts; or ``--model DIR``, a checkpoint, converted to a pack first, or a pack) it
loads, in one process, the all-resident engine and cached engines with 25 %, 50 % and 100 % of
each layer's experts in device slots (``--experts-per-layer``), each with RAM holding every
expert (``ram=None``: misses copy from RAM) and with ``ram=0`` (misses read the pack), warms
each up (and checks every record's crc32 once, so that the one-time check is not timed), then
interleaves ``--reps`` repetitions of prefill + ``--gen-tokens`` sampled tokens (seeded, the same
tokens for every engine: the cache is bit-exact), forwards then reversed. It prints decode
tokens/s (mean ± std) and its ratio to the resident engine, and, from the cache statistics of
the decode steps only (``Generation.cache_stats`` minus a snapshot taken after the prefill):
hit rate, expert loads per token and stall share (seconds waiting for loads / decode seconds).

Routing matters more than anything else here, and random routers route almost uniformly and
without memory: each token picks its experts independently of the last. Then any policy holding
S of E experts hits S/E of the time, and the table prints that figure beside the measured hit
rate. The synthetic model comes close (random routers are not perfectly uniform: their hidden
states share a little between neighbouring tokens), so read its rows as the near-uniform case,
not as what a trained model gets. The routing line gives the measured keep rate (of the experts
token t+1 uses, the share token t used too; K/E when uniform) and the entropy of expert usage
(log2 E bits when even). ``--router-skew R`` spreads the synthetic routers' row norms over a
factor R, which makes some experts more popular than others (a skew in usage, not learned
routing); ``--model`` with a trained model (the bundled demo model, say) shows real routing.

The speed table also says how much of the machine's CPU time other processes (and the
hypervisor, as steal) took during the timed runs, and flags the timings above 5 %: on a small
shared machine one busy neighbour slows torch's multi-threaded decode several-fold.

What it does not measure: a cold disk (the pack was just written or read, so "disk" reads come
from the page cache: a lower bound on their cost), a GPU's memory (on CUDA the speed part runs,
the memory part still measures the CPU engine), prefetching, batching, long contexts, quality.
Nothing here asserts a speed.

    python benchmarks/bench_cache.py --part memory
    python benchmarks/bench_cache.py --part speed --reps 5
    python benchmarks/bench_cache.py --part speed --model offload/demo/model --json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: tests.tokenizer_builder lives at the root
    sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import finish, say  # noqa: E402
from offload.config import ModelConfig  # noqa: E402
from offload.device import DEVICE_CHOICES, device_name, resolve_device  # noqa: E402
from offload.engine import Engine, GenerationSettings  # noqa: E402
from offload.errors import OffloadError, SettingError  # noqa: E402
from offload.experts.record import RecordLayout  # noqa: E402
from offload.pack import Pack, convert, is_pack  # noqa: E402
from offload.plan import dense_bytes, format_bytes, parse_bytes  # noqa: E402
from offload.sampling import SamplingSettings  # noqa: E402

MiB = 1024**2
WEIGHT_SEED = 0
PROMPT_SEED = 1234
SAMPLING_SEED = 0
FIRST_ORDINARY_ID = 3  # after <unk> 0, <s> 1, </s> 2
RSS_INTERVAL_S = 0.002
WARMUP_TOKENS = 8
NOISY = 0.15  # std / mean above which the table says the numbers are noisy
OTHER_LOAD = 0.05  # share of the CPU time used elsewhere above which the timings are flagged

# The synthetic models. Vocabulary 512 is the tokenizer builder's size; head dim = D / 8 heads.
BASE_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
# 13 layers x 8 experts x 3 x 1024 x 3584 x 2 bytes = 104 x 21 MiB = 2184 MiB = 2.13 GiB of experts
# (12 layers would be 2016 MiB, just under 2 GiB). I / D = 3.5, as in Mixtral.
MEMORY_SHAPE = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 13}
# 8 layers x 8 experts x 5.25 MiB = 336 MiB of experts
SPEED_SHAPE = {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 8}

# Fixed text for the speed part's prompt (any tokenizer encodes it; repeated to --prompt-tokens).
PROMPT_TEXT = (
    "The argparse module makes it easy to write user-friendly command-line interfaces. "
    "The program defines what arguments it requires, and argparse will figure out how to "
    "parse those out of sys.argv. It also generates help and usage messages.\n"
)


# ---- the synthetic checkpoint ---------------------------------------------------------------------

def synthetic_config(shape: dict[str, Any], seed: int = WEIGHT_SEED, router_skew: float = 1.0) -> dict[str, Any]:
    """config.json of a synthetic model; ``benchmark_synthetic`` records how its weights were drawn."""
    return {**BASE_CONFIG, **shape, "benchmark_synthetic": {"seed": seed, "router_skew": router_skew}}


def expert_bytes_of(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of every expert of the model (record layout, without the file's padding)."""
    c = ModelConfig.from_dict(config)
    return c.num_hidden_layers * c.num_local_experts * RecordLayout.for_config(c, dtype).nbytes


def write_synthetic_mixtral(out_dir: Path, config: dict[str, Any]) -> Path:
    """Random bf16 weights for ``config`` (from ``synthetic_config``) in the Hugging Face hub layout.

    Shard 1 holds the embeddings, the final norm and lm_head, shard N + 1 layer N (attention,
    norms, router and its experts as ``block_sparse_moe.experts.E.w{1,2,3}``), plus
    ``model.safetensors.index.json``, config.json and a 512-piece tokenizer. Matrices are
    N(0, 1 / fan_in), norms are ones; one layer is in memory at a time. Without transformers.
    """
    from safetensors.torch import save_file

    from tests.tokenizer_builder import write_tokenizer

    c = ModelConfig.from_dict(config)
    D, I, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    H, G, Dh, E = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_local_experts
    synthetic = config.get("benchmark_synthetic", {})
    generator = torch.Generator().manual_seed(synthetic.get("seed", WEIGHT_SEED))
    bf16 = torch.bfloat16

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * cols**-0.5).to(bf16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=bf16)

    # router row e scaled by skew ** (e / (E - 1)): larger rows win the top-k more often
    skew = float(synthetic.get("router_skew", 1.0))
    router_scale = torch.tensor([skew ** (e / max(1, E - 1)) for e in range(E)])[:, None]  # [E, 1]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    shards = L + 1
    weight_map: dict[str, str] = {}
    total = 0

    def save(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update((t, name) for t in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    save(0, {
        "model.embed_tokens.weight": torch.randn(V, D, generator=generator).to(bf16),
        "model.norm.weight": ones(D),
        "lm_head.weight": matrix(V, D),
    })
    for layer in range(L):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.input_layernorm.weight": ones(D),
            f"{p}.post_attention_layernorm.weight": ones(D),
            f"{p}.self_attn.q_proj.weight": matrix(H * Dh, D),
            f"{p}.self_attn.k_proj.weight": matrix(G * Dh, D),
            f"{p}.self_attn.v_proj.weight": matrix(G * Dh, D),
            f"{p}.self_attn.o_proj.weight": matrix(D, H * Dh),
            f"{p}.block_sparse_moe.gate.weight": (matrix(E, D).float() * router_scale).to(bf16),
        }
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors[f"{q}.w1.weight"] = matrix(I, D)
            tensors[f"{q}.w3.weight"] = matrix(I, D)
            tensors[f"{q}.w2.weight"] = matrix(D, I)
        save(layer + 1, tensors)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out_dir, vocab_size=V)
    return out_dir


def _synthetic_config_in(path: Path) -> dict[str, Any] | None:
    """config.json of ``path`` when this benchmark wrote it (it names how weights were drawn)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "benchmark_synthetic" in config else None


class Workdir:
    """Where models and packs go: a new temporary directory, or ``--workdir``. Only what this run
    created (or reused) is removed at the end, and nothing with ``--keep``."""

    def __init__(self, root: str | None, keep: bool):
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="offload-bench-cache-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.owned: list[Path] = []

    def synthetic_pack(self, name: str, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """A pack of the synthetic model ``config``: reused when ``--workdir`` holds one from an
        earlier ``--keep`` run with the same config.json, else written and converted."""
        model_dir, pack_dir = self.root / f"{name}-model", self.root / f"{name}-pack"
        info: dict[str, Any] = {"model_dir": str(model_dir), "pack_dir": str(pack_dir)}
        if _synthetic_config_in(pack_dir) == config and is_pack(pack_dir):
            say(f"{name}: reusing {pack_dir}")
            self.owned.append(pack_dir)
            info["reused"] = True
            return pack_dir, info
        for path in (model_dir, pack_dir):
            if path.exists() and _synthetic_config_in(path) is None:
                raise SettingError(f"{path}: exists and is not a model of this benchmark; remove it")
        self.owned += [model_dir, pack_dir]
        for path in (model_dir, pack_dir):  # an earlier run's, of another shape or seed
            shutil.rmtree(path, ignore_errors=True)
        need = 2 * expert_bytes_of(config) + 512 * MiB
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise SettingError(
                f"{self.root}: {format_bytes(free)} free, the {name} checkpoint and its pack need about "
                f"{format_bytes(need)}; choose another --workdir"
            )
        experts = format_bytes(expert_bytes_of(config))
        say(f"{name}: writing a synthetic checkpoint ({experts} of experts) to {model_dir} ...")
        start = time.perf_counter()
        write_synthetic_mixtral(model_dir, config)
        info["write_seconds"] = time.perf_counter() - start
        say(f"{name}: converting to a bf16 pack ...")
        start = time.perf_counter()
        convert(model_dir, pack_dir, dtype=torch.bfloat16)
        info["convert_seconds"] = time.perf_counter() - start
        info["checkpoint_bytes"] = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        info["pack_bytes"] = sum(p.stat().st_size for p in pack_dir.iterdir())
        # writer + converter, this process: one layer and one expert at a time
        info["writer_peak_rss"] = peak_rss_of_process()
        shutil.rmtree(model_dir)  # the pack is all the engine reads
        return pack_dir, info

    def pack_of(self, model: Path) -> tuple[Path, dict[str, Any]]:
        """``model`` itself when it is a pack, else its pack (own dtype) in the work directory."""
        if is_pack(model):
            return model, {"pack_dir": str(model)}
        pack_dir = self.root / f"{model.name}-pack"
        self.owned.append(pack_dir)
        say(f"converting {model} to a pack in {pack_dir} ...")
        convert(model, pack_dir, force=True)
        return pack_dir, {"model_dir": str(model), "pack_dir": str(pack_dir), "converted": True}

    def close(self) -> None:
        if self.keep:
            say(f"kept {self.root}")
            return
        for path in self.owned:
            shutil.rmtree(path, ignore_errors=True)
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


# ---- memory: one load in a fresh process ------------------------------------------------------------

def peak_rss_of_process() -> int:
    """ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class RssSampler:
    """Samples this process's resident set every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, interval: float = RSS_INTERVAL_S):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure_load(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work: baseline RSS, then load ``spec['pack']`` and generate under the sampler."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    process = psutil.Process()
    warm = torch.ones(64, 64, dtype=torch.bfloat16)  # start torch's thread pool and allocator
    (warm @ warm).sum().item()
    del warm
    gc.collect()
    baseline = process.memory_info().rss
    budget = {k: spec[k] for k in ("ram", "experts_per_layer") if spec.get(k) is not None}
    with RssSampler(spec.get("interval", RSS_INTERVAL_S)) as sampler:
        start = time.perf_counter()
        engine = Engine.load(spec["pack"], device="cpu", **budget)
        load_seconds = time.perf_counter() - start
        after_load = process.memory_info().rss
        c = engine.config
        prompt = torch.randint(
            FIRST_ORDINARY_ID, c.vocab_size, (spec["prompt_tokens"],),
            generator=torch.Generator().manual_seed(PROMPT_SEED),
        ).tolist()
        settings = GenerationSettings(max_new_tokens=spec["gen_tokens"], ignore_eos=True)
        generation = engine.generate(prompt, settings).run()
    record = RecordLayout.for_config(c, engine.dtype).nbytes
    if engine.cache is not None:
        device_slots, host_tier = engine.cache.device_bytes, engine.cache.host_bytes
        plan = engine.plan.to_dict()
    else:  # resident: every expert is "on the device"
        device_slots, host_tier, plan = c.num_hidden_layers * c.num_local_experts * record, 0, None
    return {
        "budget": budget,
        "baseline_rss": baseline,
        "after_load_rss": after_load,
        "peak_rss_sampled": sampler.peak,
        "rss_samples": sampler.samples,
        "peak_rss_maxrss": peak_rss_of_process(),
        "dense_bytes": dense_bytes(c, engine.dtype),
        "kv_cache_bytes": engine.model.cache.nbytes,
        "context_length": engine.context_length,
        "device_slot_bytes": device_slots,
        "host_tier_bytes": host_tier,
        "expert_record_bytes": record,
        "plan": plan,
        "load_seconds": load_seconds,
        "generation": generation.stats.to_dict(),
        "cache": generation.cache_stats.to_dict() if generation.cache_stats is not None else None,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """``measure_load`` in a fresh Python process; its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_part(args: argparse.Namespace, work: Workdir) -> dict[str, Any]:
    margin = parse_bytes(args.margin, "--margin")
    config = synthetic_config(MEMORY_SHAPE)
    pack, info = work.synthetic_pack("memory", config)
    all_experts = expert_bytes_of(config)
    ram_budget = all_experts // 4
    common = {"pack": str(pack), "threads": args.threads, "prompt_tokens": 32, "gen_tokens": 32}
    runs = {
        "budget": {"ram": ram_budget, "experts_per_layer": 2},
        "ram_all": {"ram": None, "experts_per_layer": 2},
        "resident": {"ram": None, "experts_per_layer": None},
    }
    results: dict[str, Any] = {}
    for name, budget in runs.items():
        worst = all_experts if name != "budget" else ram_budget
        available = psutil.virtual_memory().available
        if available < worst + 1024 * MiB:
            say(f"memory/{name}: skipped, {format_bytes(available)} available")
            results[name] = {"skipped": f"{format_bytes(available)} of RAM available"}
            continue
        say(f"memory/{name}: loading {pack.name} in a fresh process ({budget}) ...")
        r = run_child({**common, **budget})
        r["expected"] = r["dense_bytes"] + r["kv_cache_bytes"] + r["device_slot_bytes"] + r["host_tier_bytes"]
        r["allowed"] = r["expected"] + margin
        r["peak_rss"] = max(r["peak_rss_maxrss"], r["peak_rss_sampled"])
        r["growth"] = r["peak_rss"] - r["baseline_rss"]
        r["pass"] = r["growth"] <= r["allowed"]
        results[name] = r
    c = ModelConfig.from_dict(config)
    return {
        "config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_local_experts", "num_experts_per_tok", "vocab_size")},
        "expert_bytes": RecordLayout.for_config(c, torch.bfloat16).nbytes,
        "all_experts_bytes": all_experts,
        "ram_budget": ram_budget,
        "margin": margin,
        "files": info,
        "runs": results,
    }


# ---- speed: cached engines against the resident one ---------------------------------------------

@dataclass
class Variant:
    name: str
    budget: dict[str, int | None]  # Engine.load's ram / experts_per_layer; empty = resident
    slots: int  # experts per layer on the device
    ram: str  # "all" | "0" | "-"


def variants(experts: int, per_layer: list[int]) -> list[Variant]:
    out = [Variant("resident", {}, experts, "-")]
    for slots in per_layer:
        if slots == experts:  # every expert gets a slot: no RAM tier whatever --ram says
            out.append(Variant(f"{slots}/{experts}", {"experts_per_layer": slots}, slots, "-"))
            continue
        out.append(Variant(f"{slots}/{experts} ram all", {"experts_per_layer": slots, "ram": None}, slots, "all"))
        out.append(Variant(f"{slots}/{experts} ram 0", {"experts_per_layer": slots, "ram": 0}, slots, "0"))
    return out


@dataclass
class Rep:
    decode_tokens_per_s: float
    decode_seconds: float
    decode_steps: int
    prefill_tokens_per_s: float
    tokens: list[int]
    cache: dict[str, Any] | None  # decode steps only


def generate_once(engine: Engine, prompt: list[int], tokens: int) -> Rep:
    """Prefill + ``tokens`` seeded samples; cache statistics of the decode steps only."""
    settings = GenerationSettings(
        max_new_tokens=tokens, ignore_eos=True,
        sampling=SamplingSettings(temperature=1.0, seed=SAMPLING_SEED),
    )
    generation = engine.generate(prompt, settings)
    events = iter(generation)
    next(events)  # the prefill ran and its token was sampled; decode starts now
    after_prefill = engine.cache.stats.copy() if engine.cache is not None else None
    for _ in events:
        pass
    decode = None
    if engine.cache is not None:  # generation.cache_stats covers prefill + decode
        decode = engine.cache.stats.since(after_prefill).to_dict()
    s = generation.stats
    return Rep(s.generation_tokens_per_s, s.decode_seconds, s.decode_steps, s.prompt_tokens_per_s,
               generation.tokens, decode)


def keep_rate(chosen: torch.Tensor) -> float:
    """chosen [T, K] -> share of token t+1's experts that token t also chose (as demo_quality.py)."""
    prev, nxt = chosen[:-1], chosen[1:]  # [T-1, K]
    return (nxt[:, :, None] == prev[:, None, :]).any(-1).float().mean().item()


def routing_profile(engine: Engine, prompt: list[int], tokens: int) -> dict[str, Any]:
    """How the resident engine routes the decode steps the timed runs make (same seed, same tokens)."""
    c = engine.config
    chosen: list[list[torch.Tensor]] = [[] for _ in range(c.num_hidden_layers)]

    def observe(layer: int, experts: torch.Tensor, _weights: torch.Tensor) -> None:
        if experts.shape[0] == 1:  # decode steps only
            chosen[layer].append(experts.cpu())

    engine.model.routing_observer = observe
    try:
        generate_once(engine, prompt, tokens)
    finally:
        engine.model.routing_observer = None
    keep, entropy = [], []
    for layer in chosen:
        if len(layer) < 2:
            return {}
        picks = torch.cat(layer)  # [T, K]
        keep.append(keep_rate(picks))
        share = torch.bincount(picks.reshape(-1), minlength=c.num_local_experts).double()
        share = share[share > 0] / share.sum()
        entropy.append(-(share * share.log2()).sum().item())
    return {
        "decode_steps": len(chosen[0]),
        "keep_rate": statistics.fmean(keep),
        "uniform_keep_rate": c.num_experts_per_tok / c.num_local_experts,
        "usage_entropy_bits": statistics.fmean(entropy),
        "uniform_usage_entropy_bits": math.log2(c.num_local_experts),
    }


class OtherLoad:
    """The share of the machine's CPU time that went elsewhere during a ``with`` block: other
    processes (busy time minus this process's own) and steal (the hypervisor's other guests)."""

    def __enter__(self) -> OtherLoad:
        self.start = time.perf_counter(), psutil.cpu_times(), psutil.Process().cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, machine0, own0 = self.start
        wall, machine, own = time.perf_counter() - wall0, psutil.cpu_times(), psutil.Process().cpu_times()
        capacity = wall * (psutil.cpu_count() or 1)

        def busy(t) -> float:
            return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

        mine = (own.user + own.system) - (own0.user + own0.system)
        self.other_share = max(0.0, (busy(machine) - busy(machine0) - mine) / capacity)
        self.steal_share = (getattr(machine, "steal", 0.0) - getattr(machine0, "steal", 0.0)) / capacity


def rates(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def summarize(variant: Variant, reps: list[Rep], experts: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "experts_per_layer": variant.slots,
        "ram": variant.ram,
        "budget": variant.budget,
        "decode_tokens_per_s": rates([r.decode_tokens_per_s for r in reps]),
        "prefill_tokens_per_s": rates([r.prefill_tokens_per_s for r in reps]),
        "uniform_hit_rate": variant.slots / experts,
    }
    if reps[0].cache is not None:
        keys = ("hits", "misses", "host_loads", "disk_loads", "host_bytes", "disk_bytes", "stall_seconds")
        total = {k: sum(r.cache[k] for r in reps) for k in keys}
        steps = sum(r.decode_steps for r in reps)
        seconds = sum(r.decode_seconds for r in reps)
        requests = total["hits"] + total["misses"]
        out.update(
            total,
            hit_rate=total["hits"] / requests if requests else 0.0,
            loads_per_token=(total["host_loads"] + total["disk_loads"]) / steps,
            stall_share=total["stall_seconds"] / seconds,
        )
    return out


def speed_part(args: argparse.Namespace, work: Workdir) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.model is not None:
        pack, info = work.pack_of(Path(args.model))
    else:
        pack, info = work.synthetic_pack("speed", synthetic_config(SPEED_SHAPE, router_skew=args.router_skew))
    c = ModelConfig.from_dir(pack)
    E, K = c.num_local_experts, c.num_experts_per_tok
    per_layer = args.experts_per_layer or sorted({max(K, round(f * E)) for f in (0.25, 0.5, 1.0)})
    bad = [s for s in per_layer if not K <= s <= E]
    if bad:
        raise SettingError(f"--experts-per-layer {bad}: each must be in [{K}, {E}] (top-k to all experts)")
    context = args.prompt_tokens + args.gen_tokens + 1

    engines: dict[str, tuple[Variant, Engine]] = {}
    loads: dict[str, float] = {}
    for variant in variants(E, per_layer):
        start = time.perf_counter()
        engine = Engine.load(pack, device=str(device), context_length=context, **variant.budget)
        loads[variant.name] = time.perf_counter() - start
        if engine.cache is not None and isinstance(engine.cache.source, Pack):
            engine.cache.source.verify_all()  # the first read of each record checks its crc32: not timed
        engines[variant.name] = (variant, engine)
        say(f"speed: loaded {variant.name} in {loads[variant.name]:.2f} s")

    resident = engines["resident"][1]
    text_ids = resident.tokenizer.encode(PROMPT_TEXT)
    prompt = [resident.tokenizer.bos_id] + (text_ids * (args.prompt_tokens // max(1, len(text_ids)) + 1))
    prompt = prompt[: args.prompt_tokens]

    say(f"speed: warm-up, routing profile, then {args.reps} x (pp{len(prompt)} + tg{args.gen_tokens}) "
        f"per engine, interleaved ...")
    for _, engine in engines.values():
        generate_once(engine, prompt, min(args.gen_tokens, WARMUP_TOKENS))
    routing = routing_profile(resident, prompt, args.gen_tokens)
    order = list(engines)
    reps: dict[str, list[Rep]] = {name: [] for name in order}
    with OtherLoad() as other:
        for rep in range(args.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                reps[name].append(generate_once(engines[name][1], prompt, args.gen_tokens))

    results = {name: summarize(engines[name][0], reps[name], E) for name in order}
    base = results["resident"]["decode_tokens_per_s"]["mean"]
    reference = reps["resident"][0].tokens
    for name, r in results.items():
        r["ratio_to_resident"] = r["decode_tokens_per_s"]["mean"] / base
        r["load_seconds"] = loads[name]
        r["same_tokens_as_resident"] = all(x.tokens == reference for x in reps[name])
    for _, engine in engines.values():
        engine.close()
    return {
        "device": str(device),
        "machine": device_name(device),
        "model": str(args.model) if args.model else "synthetic",
        "config": {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_local_experts", "num_experts_per_tok", "vocab_size")},
        "dtype": str(resident.dtype).removeprefix("torch."),
        "expert_bytes": RecordLayout.for_config(c, resident.dtype).nbytes,
        "router_skew": None if args.model else args.router_skew,
        "files": info,
        "prompt_tokens": len(prompt),
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "routing": routing,
        "threads": torch.get_num_threads(),
        "other_cpu_share": other.other_share,  # of the machine, during the timed repetitions
        "steal_share": other.steal_share,
        "engines": results,
    }


# ---- output -----------------------------------------------------------------------------------------

def mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


def print_memory(m: dict[str, Any], console) -> None:
    from rich.table import Table

    c = m["config"]
    console.print(
        f"memory · synthetic D {c['hidden_size']}, I {c['intermediate_size']}, L {c['num_hidden_layers']}, "
        f"E {c['num_local_experts']} top-{c['num_experts_per_tok']}, V {c['vocab_size']} · bf16 pack · CPU · "
        f"experts {format_bytes(m['all_experts_bytes'])} ({c['num_hidden_layers'] * c['num_local_experts']} x "
        f"{format_bytes(m['expert_bytes'])}) · RAM budget {format_bytes(m['ram_budget'])} (a quarter)"
    )
    runs = {k: v for k, v in m["runs"].items() if "skipped" not in v}
    titles = {"budget": "2/layer + RAM 1/4", "ram_all": "2/layer + RAM all", "resident": "resident"}
    table = Table()
    table.add_column("", no_wrap=True)
    for name in runs:
        table.add_column(titles[name], justify="right", no_wrap=True)
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("RSS before load (python + torch)", lambda r: mib(r["baseline_rss"])),
        ("RSS after load", lambda r: mib(r["after_load_rss"])),
        ("peak RSS (ru_maxrss)", lambda r: mib(r["peak_rss_maxrss"])),
        (f"peak RSS (sampled every {RSS_INTERVAL_S * 1000:.0f} ms)", lambda r: mib(r["peak_rss_sampled"])),
        ("peak - baseline", lambda r: mib(r["growth"])),
        ("  dense weights", lambda r: mib(r["dense_bytes"])),
        ("  KV cache", lambda r: f"{mib(r['kv_cache_bytes'])} ({r['context_length']} pos)"),
        ("  device slots (RAM on a CPU)", lambda r: mib(r["device_slot_bytes"])),
        ("  host tier (RAM budget used)", lambda r: mib(r["host_tier_bytes"])),
        (f"  allowed: sum + margin {mib(m['margin'])}", lambda r: mib(r["allowed"])),
        ("check", lambda r: (f"PASS ({mib(r['allowed'] - r['growth'])} spare)" if r["pass"]
                             else f"FAIL ({mib(r['growth'] - r['allowed'])} over)")),
        ("load s · decode tok/s", lambda r: f"{r['load_seconds']:.2f} · "
                                            f"{r['generation']['generation_tokens_per_s']:.1f}"),
        ("disk loads in the generation", lambda r: str(r["cache"]["disk_loads"]) if r["cache"] else "-"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in runs.values()))
    console.print(table)
    for name, r in m["runs"].items():
        if "skipped" in r:
            console.print(f"{titles[name]}: skipped ({r['skipped']})")
    files = m["files"]
    if "writer_peak_rss" in files:
        console.print(
            f"writer + converter peak RSS {mib(files['writer_peak_rss'])} (one layer at a time); "
            f"write {files['write_seconds']:.1f} s, convert {files['convert_seconds']:.1f} s"
        )


def print_speed(s: dict[str, Any], console) -> None:
    from rich.table import Table

    c = s["config"]
    source = "synthetic" if s["model"] == "synthetic" else s["model"]
    skew = f" · router skew {s['router_skew']:g}" if s["router_skew"] not in (None, 1.0) else ""
    console.print(
        f"speed · {source}: D {c['hidden_size']}, I {c['intermediate_size']}, L {c['num_hidden_layers']}, "
        f"E {c['num_local_experts']} top-{c['num_experts_per_tok']} · {s['dtype']} · expert "
        f"{format_bytes(s['expert_bytes'])} · {s['device']}{skew} · pp{s['prompt_tokens']} + "
        f"tg{s['gen_tokens']} · {s['reps']} reps"
    )
    table = Table()
    for title in ("experts on device", "RAM tier", f"tg{s['gen_tokens']} tok/s", "x resident", "hit rate",
                  "uniform S/E", "loads/token", "stall share"):
        table.add_column(title, justify="right", no_wrap=True)
    noisy, differ = [], []
    for name, r in s["engines"].items():
        d = r["decode_tokens_per_s"]
        if d["std"] > NOISY * d["mean"]:
            noisy.append(name)
        if not r["same_tokens_as_resident"]:
            differ.append(name)
        cached = "hit_rate" in r
        table.add_row(
            "all (no cache)" if name == "resident" else f"{r['experts_per_layer']}/{c['num_local_experts']}",
            {"all": "every expert", "0": "none (pack)", "-": "-"}[r["ram"]],
            f"{d['mean']:.1f} ± {d['std']:.1f}",
            f"{r['ratio_to_resident']:.2f}",
            f"{r['hit_rate']:.1%}" if cached else "-",
            f"{r['uniform_hit_rate']:.0%}" if cached else "-",
            f"{r['loads_per_token']:.1f}" if cached else "-",
            f"{r['stall_share']:.1%}" if cached else "-",
        )
    console.print(table)
    K, E = c["num_experts_per_tok"], c["num_local_experts"]
    g = s["routing"]
    if g:
        console.print(
            f"routing ({g['decode_steps']} decode steps, mean of layers): keep rate {g['keep_rate']:.1%} "
            f"(uniform: K/E = {g['uniform_keep_rate']:.0%}), expert usage entropy {g['usage_entropy_bits']:.2f} "
            f"bits (uniform: {g['uniform_usage_entropy_bits']:.2f})"
        )
    if source == "synthetic" and s["router_skew"] != 1.0:
        console.print(
            f"synthetic model with --router-skew {s['router_skew']:g}: some experts are more popular than "
            "others, which lifts hit rates above the uniform router's S/E; still not a trained model's routing"
        )
    elif source == "synthetic":
        console.print(
            "synthetic model: random routers route close to uniformly and with little memory (keep rate and "
            "entropy above), so its hit rates are near the uniform router's S/E; they are the near-uniform "
            "case, not what a trained model's routing gives (--model DIR for that)"
        )
    console.print(
        f"hit rate, loads/token, stall share: decode steps only, all reps; loads/token at S = K is about "
        f"L x K x (1 - S/E) = {c['num_hidden_layers'] * K * (1 - K / E):.1f} when uniform; "
        "stall = seconds waiting for loads / decode seconds; pack reads come from the page cache"
    )
    busy = s["other_cpu_share"] + s["steal_share"]
    console.print(
        f"during the timed runs other processes used {s['other_cpu_share']:.0%} of the machine's CPU time"
        f" (steal {s['steal_share']:.0%}), torch ran {s['threads']} threads"
        + (": the numbers are unreliable; rerun on a quiet machine, or with --threads 1 (steadier when "
           "shared: a descheduled thread stalls every parallel op)" if busy > OTHER_LOAD else "")
    )
    if noisy:
        console.print(f"noisy: std above {NOISY:.0%} of the mean for {', '.join(noisy)} (--json lists every rep)")
    if differ:
        console.print(f"UNEXPECTED: tokens differ from the resident engine's for {', '.join(differ)}")
    else:
        console.print("tokens: every engine sampled the same tokens as the resident one (the cache is exact)")


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 150)
    console.print(f"{result['machine']} · torch {result['torch']} · {result['cpu_count']} CPUs")
    if "memory" in result:
        print_memory(result["memory"], console)
    if "speed" in result:
        if "memory" in result:
            console.print()
        print_speed(result["speed"], console)


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("memory", "speed", "all"), default="all")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--workdir", help="put models and packs here (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory; a later run with the same --workdir reuses its packs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    memory = parser.add_argument_group("memory")
    memory.add_argument("--margin", default="256MiB",
                        help="allowance above dense + KV + slots + host tier (activations, allocator, tokenizer)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--model", help="a checkpoint (converted to a pack first) or a pack; default: synthetic")
    speed.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    speed.add_argument("--experts-per-layer", type=lambda s: [int(x) for x in s.split(",")],
                       help="comma list of device slots per layer (default: 25%%, 50%%, 100%% of the experts)")
    speed.add_argument("--prompt-tokens", type=int, default=64)
    speed.add_argument("--gen-tokens", type=int, default=64)
    speed.add_argument("--reps", type=int, default=3)
    speed.add_argument("--router-skew", type=float, default=1.0,
                       help="synthetic routers' row norms spread over this factor (1 = plain random routers)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one memory measurement, JSON spec
    args = parser.parse_args(argv)
    for flag in ("prompt_tokens", "gen_tokens", "reps", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.router_skew <= 0:
        parser.error("--router-skew must be positive")
    if args.model is not None and args.part == "memory":
        parser.error("--model applies to --part speed (the memory part builds its own 2 GiB model)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_load(json.loads(args.child))))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    work = Workdir(args.workdir, args.keep)
    try:
        if args.part in ("memory", "all"):
            result["memory"] = memory_part(args, work)
            gc.collect()
        if args.part in ("speed", "all"):
            result["speed"] = speed_part(args, work)
            result["machine"] = result["speed"]["machine"]
    except OffloadError as e:  # bad settings, an unreadable --model, a full disk
        say(f"error: {e}")
        return 2
    finally:
        work.close()
    return finish(result, args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
