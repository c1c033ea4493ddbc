"""`offload profile`: probe this machine, time a few candidate plans, write the fastest as a profile.

Argument parsing and output only: the probe, the checks and the TOML are ``offload.profile``; the
timing is ``offload.bench`` (a short ppN/tgN run per candidate, on the demo model by default, so
it takes seconds). Candidates: the plan of the closest shipped profile (bits, context), with
top-k, half and all experts per layer on the device, under policy lru and the base profile's. A
candidate whose device memory at the profile's context exceeds the budget (the card, or available
RAM without one, less ``--headroom``) is skipped. The profile records the fastest candidate's
policy and the budget itself as plan.vram (not the timed model's bytes), so the engine fits as
many experts as it can of whatever model runs under it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from cli.common import local_model, model_label, stderr, user_errors
from offload.bench import BenchConfig, context_needed, load, measure
from offload.config import ModelConfig
from offload.demo import DEMO_MODEL_DIR
from offload.errors import SettingError
from offload.files import check_file
from offload.plan import format_bytes, kv_cache_bytes, parse_bytes
from offload.profile import (
    _size_text,
    best_shipped_profile,
    load_profile,
    machine_profile,
    probe_machine,
    save_profile,
)


def profile_command(
    model: Optional[Path] = typer.Argument(
        None, help="Checkpoint or pack to time the candidates on. Default: the bundled demo model."
    ),
    out: Path = typer.Option(Path("profiles/this-machine.toml"), "--out", help="Where to write the profile."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu or cuda[:N]."),
    base: Optional[str] = typer.Option(
        None, "--from", help="Start from this shipped profile or file (default: the closest shipped one)."
    ),
    prompt_tokens: int = typer.Option(16, "-p", "--n-prompt", min=1, help="Prompt tokens per timed request."),
    gen_tokens: int = typer.Option(8, "-n", "--n-gen", min=1, help="Generated tokens per timed request."),
    reps: int = typer.Option(1, "-r", "--reps", min=1, help="Timed repetitions per candidate."),
    headroom: str = typer.Option("10%", "--headroom", help="Memory left free: a size (1GiB) or a share (10%)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists (a regular file only)."),
) -> None:
    """Probe this machine, time candidate plans briefly, and write the fastest that fits."""
    with user_errors():
        check_file(out, force, "profile")  # refused now, not after probing and timing
        model = local_model(model) if model else DEMO_MODEL_DIR  # a hub id: from the cache, or downloaded
        machine = probe_machine(model, device, compute=True)
        start = load_profile(base) if base else best_shipped_profile(machine["device"], machine["vram"] or None)
        capacity = machine["vram"] if machine["gpu"] != "none" else machine["ram_available"]
        budget = capacity - _headroom(headroom, capacity)
        results = []
        config_json = ModelConfig.from_dir(model)
        E, K = config_json.num_local_experts, config_json.num_experts_per_tok
        for policy in dict.fromkeys(("lru", start.policy)):
            for count in sorted({K, max(K, E // 2), E}):
                config, result, needs = _try(model, machine, start, policy, count, prompt_tokens, gen_tokens, reps)
                fits = needs <= budget
                if not fits and count == K:  # the smallest plan does not fit: nothing will
                    raise SettingError(
                        f"no candidate plan fits {format_bytes(budget)} ({format_bytes(capacity)} less --headroom "
                        f"{headroom}); the smallest, {_label(config)}, needs {format_bytes(needs)}"
                    )
                tg = result.tg.mean if result.tg else 0.0
                stderr.print(
                    f"{_label(config)}: tg{gen_tokens} {tg:.1f} t/s, needs {format_bytes(needs)}"
                    f"{'' if fits else ' (does not fit)'}",
                    style="dim",
                )
                if fits:
                    results.append((tg, config, needs))
        if not results:
            raise SettingError(
                f"no candidate plan fits {format_bytes(budget)} ({format_bytes(capacity)} less --headroom {headroom})"
            )
        tg, config, needs = max(results, key=lambda r: r[0])
        # The budget, not the demo's byte count: the engine fits what it can of any model into it.
        plan = replace(start, policy=config.policy, experts_per_layer=None, plan_ram=None, plan_vram=_size_text(budget))
        name = Path(out).stem
        comment = (
            f"{name}: written by `offload profile` on {machine['gpu'] if machine['gpu'] != 'none' else 'a CPU'}, "
            f"fastest candidate on {model_label(model)}: {_label(config)}, {tg:.1f} t/s"
        )
        profile = machine_profile(machine, plan, name, comment)
        save_profile(profile, out, force=force)
        disk = f"{machine['disk_gbps']:.2f} GB/s" if machine["disk_gbps"] else "not measured"
        print(
            f"{out}: {_label(config)} ({tg:.1f} t/s on {model_label(model)}); machine: {profile.gpu}, "
            f"VRAM {profile.vram}, RAM {profile.ram}, {profile.cpu_threads} threads, "
            f"host-to-device {machine['h2d_gbps']:.1f} GB/s, disk {disk}; {_compute_text(machine)}"
        )


def _compute_text(machine: dict) -> str:
    """The measured figures the CPU-expert cost model takes, in one clause."""
    def gbps(key: str) -> str:
        return f"{machine[key]:.1f} GB/s" if machine.get(key) else "not measured"

    text = f"RAM read {gbps('ram_gbps')}, 4-bit CPU kernel {gbps('cpu_expert_gbps')}"
    if machine.get("gpu_expert_gbps"):
        text += f", 4-bit GPU kernel {gbps('gpu_expert_gbps')}"
    if machine.get("round_trip_ms"):
        text += f", CPU-expert round trip {machine['round_trip_ms']:.3f} ms"
    return text


def _headroom(text: str, capacity: int) -> int:
    text = text.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise SettingError(f"--headroom {text!r}: expected a size (1GiB) or a share (10%)") from None
        if not 0 <= share < 100:
            raise SettingError(f"--headroom {text!r}: a share must be in [0, 100)")
        return int(capacity * share / 100)
    return parse_bytes(text, "--headroom")


def _label(config: BenchConfig) -> str:
    return f"{config.experts_per_layer} experts/layer, policy {config.policy}"


def _try(model, machine, start, policy, count, prompt_tokens, gen_tokens, reps):
    """Time one candidate; (config, result, device bytes at the profile's context)."""
    config = BenchConfig(device=machine["device"], expert_bits=start.expert_bits, attn_bits=start.attn_bits,
                         experts_per_layer=count, policy=policy)
    engine = load(model, config, context_needed(prompt_tokens, gen_tokens))
    try:
        result = measure(engine, config, prompt_tokens, gen_tokens, reps)
        context = min(start.context, engine.config.max_position_embeddings)
        kv = kv_cache_bytes(engine.config, context, engine.dtype)
        needs = engine.plan.device_bytes - engine.plan.kv_cache_bytes + kv
    finally:
        engine.close()
    return config, result, needs
