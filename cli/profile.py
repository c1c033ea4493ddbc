"""`offload profile`: probe this machine, time a few candidate plans, write the fastest as a profile.

Argument parsing and output only: the probe, the checks and the TOML are ``offload.profile``; the
timing is ``offload.bench``. What is timed: MODEL when given; else a synthetic pack of the
model the profiles are for (``--preset``, default Mixtral-8x7B: its true shapes, its first
``--layers`` layers, the base profile's expert and attention bits, the vocabulary cut to the
synthetic tokenizer's size as ``benchmarks/bench_cpu_decode.py`` does), written at disk speed to
a temporary folder and removed afterwards. Each candidate runs a warm-up then ``-r``
repetitions of pp``-p`` + tg``-n`` and reports tg as mean ± std (min..max); candidates whose
ranges overlap are said to be within the noise, and when the base profile's policy is within
the noise of the fastest, it is kept.

Candidates: the plan of the closest shipped profile (bits, context), with top-k, half and all
experts per layer on the device, under policy lru and the base profile's. A candidate whose
device memory at the profile's context exceeds the budget (the card, or available RAM without
one, less ``--headroom``) is skipped. The profile records the chosen policy and the budget
itself as plan.vram (not the timed model's bytes), so the engine fits as many experts as it can
of whatever model runs under it; without a GPU, machine.vram is "0", plan.vram is a RAM budget
(the CPU is the device) and plan.ram is "0", so nothing is held in RAM beside it.

Where: ``--out`` defaults to the user's profiles folder (``offload.profile.user_profiles_dir``:
``$XDG_CONFIG_HOME/offload/profiles``, default ``~/.config/offload/profiles``), which
``--profile NAME`` searches after the shipped profiles, so ``--profile this-machine`` finds it
from any folder. ``--list`` lists the shipped and the user's profiles.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from cli.common import local_model, model_label, stderr, user_errors, write_pack
from offload.bench import BenchConfig, Measure, context_needed, load, measure
from offload.config import ModelConfig
from offload.errors import SettingError
from offload.files import check_file
from offload.plan import BUILTIN_MODELS, format_bytes, kv_cache_bytes, parse_bytes
from offload.profile import (
    NO_GPU,
    PROBE_READ_BYTES,
    _largest_file,
    _size_text,
    _time_read,
    best_shipped_profile,
    list_profiles,
    load_profile,
    machine_profile,
    probe_machine,
    save_profile,
    shipped_profiles,
    user_profiles_dir,
)
from offload.synth import synthesize

DEFAULT_PRESET = "mixtral-8x7b"  # what the shipped profiles' plans are written for
DEFAULT_LAYERS = 2
DEFAULT_NAME = "this-machine"


def synthetic_config(preset: str) -> dict[str, Any]:
    """The config.json of ``preset`` with its vocabulary cut to the synthetic tokenizer's size
    (a preset's 32000 would make lm_head the largest read of a few-layer pack)."""
    from offload.demo import DEMO_MODEL_DIR
    from offload.tokenizer import Tokenizer

    key = preset.strip().lower()
    if key not in BUILTIN_MODELS:
        raise SettingError(f"--preset {preset!r}: choose one of {', '.join(BUILTIN_MODELS)}")
    config = dict(BUILTIN_MODELS[key][1])
    config["vocab_size"] = min(config["vocab_size"], Tokenizer.from_dir(DEMO_MODEL_DIR).vocab_size)
    return config


def profile_command(
    model: Optional[Path] = typer.Argument(
        None, help="Checkpoint or pack to time the candidates on. Default: a synthetic pack of --preset, "
        "written to a temporary folder and removed afterwards."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where to write the profile. Default: this-machine.toml in the user's profiles folder "
        "($XDG_CONFIG_HOME/offload/profiles, else ~/.config/offload/profiles), found by --profile this-machine.",
    ),
    list_them: bool = typer.Option(False, "--list", help="List the shipped and the user's profiles, then exit."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu or cuda[:N]."),
    base: Optional[str] = typer.Option(
        None, "--from", help="Start from this profile (name or file; default: the closest shipped one)."
    ),
    preset: str = typer.Option(
        DEFAULT_PRESET, "--preset", help=f"Without MODEL: the built-in model to synthesize ({', '.join(BUILTIN_MODELS)})."
    ),
    layers: int = typer.Option(
        DEFAULT_LAYERS, "--layers", min=1, help="Without MODEL: the synthetic pack's layers (its first N)."
    ),
    prompt_tokens: int = typer.Option(16, "-p", "--n-prompt", min=1, help="Prompt tokens per timed request."),
    gen_tokens: int = typer.Option(32, "-n", "--n-gen", min=1, help="Generated tokens per timed request."),
    reps: int = typer.Option(3, "-r", "--reps", min=1, help="Timed repetitions per candidate, after a warm-up."),
    headroom: str = typer.Option("10%", "--headroom", help="Memory left free: a size (1GiB) or a share (10%)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists (a regular file only)."),
) -> None:
    """Probe this machine, time candidate plans on a synthetic true-shape pack (or MODEL), and
    write the fastest that fits, usable as --profile NAME."""
    with user_errors():
        if list_them:
            _print_list()
            return
        out = Path(out) if out is not None else user_profiles_dir() / f"{DEFAULT_NAME}.toml"
        check_file(out, force, "profile")  # refused now, not after probing and timing
        name = out.stem
        shadowed = name in shipped_profiles() and out.resolve().parent != _shipped_dir()
        start_profile = load_profile(base) if base else None
        temp: Optional[Path] = None
        try:
            if model is not None:
                model = local_model(model)  # a hub id: from the cache, or downloaded
                machine = probe_machine(model, device, compute=True)
            else:
                machine = probe_machine(None, device, compute=True)
            start = start_profile or best_shipped_profile(machine["device"], machine["vram"] or None)
            if model is None:
                temp = Path(tempfile.mkdtemp(prefix="offload-profile-"))
                model = _synthetic_pack(temp / "pack", preset, layers, start, machine["device"])
                disk_file = _largest_file(model)  # the disk read, timed on the pack just written (fsynced)
                machine.update(disk_gbps=_time_read(disk_file, PROBE_READ_BYTES), disk_file=str(disk_file))
            timed_on = _model_text(model, temp, preset)
            chosen = _time_candidates(model, machine, start, prompt_tokens, gen_tokens, reps, headroom)
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
        config, result, needs, budget, note = chosen
        tg = result.tg or Measure(())
        has_gpu = machine["gpu"] != NO_GPU
        if has_gpu:  # the budget, not the timed model's bytes: the engine fits what it can of any model into it
            plan = replace(start, policy=config.policy, experts_per_layer=None, plan_ram=None, plan_vram=_size_text(budget))
        else:  # the CPU is the device: plan.vram is RAM, and nothing more is held in RAM beside it
            plan = replace(start, policy=config.policy, experts_per_layer=None, plan_ram="0", plan_vram=_size_text(budget))
        where = machine["gpu"] if has_gpu else "a CPU (no GPU: plan.vram is a RAM budget)"
        comment = (
            f"{name}: written by `offload profile` on {where}, timed on {timed_on}: "
            f"{_label(config)}, tg{gen_tokens} {_spread(tg)} t/s"
        )
        profile = machine_profile(machine, plan, name, comment)
        save_profile(profile, out, force=force)
        disk = f"{machine['disk_gbps']:.2f} GB/s" if machine["disk_gbps"] else "not measured"
        memory = f"VRAM {profile.vram}, " if has_gpu else "no GPU, "
        print(
            f"{out}: {_label(config)} (tg{gen_tokens} {_spread(tg)} t/s on {timed_on}); "
            f"machine: {profile.gpu}, {memory}RAM {profile.ram}, {profile.cpu_threads} threads, "
            f"host-to-device {machine['h2d_gbps']:.1f} GB/s, disk {disk}; {_compute_text(machine)}"
        )
        if note:
            print(note)
        if shadowed:
            stderr.print(f"note: {name} is also a shipped profile's name, which --profile {name} finds first; "
                         f"use --profile {out}", style="yellow", markup=False)
        elif out.resolve().parent == user_profiles_dir().resolve():
            print(f"use it with --profile {name}")
        else:
            print(f"use it with --profile {out} (only the user's profiles folder, {user_profiles_dir()}, is found by name)")


def _shipped_dir() -> Path:
    from offload import profile as profiles

    return profiles.PROFILES_DIR.resolve()


def _synthetic_pack(path: Path, preset: str, layers: int, start, device: str) -> Path:
    """Write the synthetic pack of ``preset`` (its first ``layers``, the base profile's bits)
    to ``path``, with progress on stderr."""
    config = synthetic_config(preset)
    total = config["num_hidden_layers"]
    if layers > total:
        raise SettingError(f"--layers {layers}: {preset} has {total} layers")
    target = "cuda" if str(device).startswith("cuda") else "cpu"
    what = (f"synthetic {preset}, {layers} of {total} layers, {start.expert_bits}-bit experts, "
            f"{start.attn_bits}-bit attention")
    stderr.print(f"writing a {what} to {path} (removed afterwards) ...", style="dim", markup=False)
    written = write_pack(path, "writing", f"synthetic {preset}", lambda progress: synthesize(
        config, path, layers=layers, expert_bits=start.expert_bits, attn_bits=start.attn_bits, target=target,
        seed=0, progress=progress,
    ))
    stderr.print(f"wrote {written.summary} in {written.seconds:.1f} s", style="dim", markup=False)
    return path


def _time_candidates(model, machine, start, prompt_tokens, gen_tokens, reps, headroom):
    """Time every candidate; (config, result, needs, budget, note) of the one chosen."""
    capacity = machine["vram"] if machine["gpu"] != NO_GPU else machine["ram_available"]
    budget = capacity - _headroom(headroom, capacity)
    config_json = ModelConfig.from_dir(model)
    E, K = config_json.num_local_experts, config_json.num_experts_per_tok
    counts = sorted({K, max(K, E // 2), E})
    policies = list(dict.fromkeys(("lru", start.policy)))
    results = []
    total = len(counts) * len(policies)
    done = 0
    for policy in policies:
        for count in counts:
            done += 1
            config, result, needs = _try(model, machine, start, policy, count, prompt_tokens, gen_tokens, reps)
            fits = needs <= budget
            if not fits and count == K:  # the smallest plan does not fit: nothing will
                raise SettingError(
                    f"no candidate plan fits {format_bytes(budget)} ({format_bytes(capacity)} less --headroom "
                    f"{headroom}); the smallest, {_label(config)}, needs {format_bytes(needs)}"
                )
            tg = result.tg or Measure(())
            stderr.print(
                f"[{done}/{total}] {_label(config)}: tg{gen_tokens} {_spread(tg)} t/s over {reps} rep(s), "
                f"needs {format_bytes(needs)}{'' if fits else ' (does not fit)'}",
                style="dim", markup=False,
            )
            if fits:
                results.append((config, result, needs))
    if not results:
        raise SettingError(
            f"no candidate plan fits {format_bytes(budget)} ({format_bytes(capacity)} less --headroom {headroom})"
        )
    chosen = _choose(results, start.policy)
    config, result, needs = chosen
    return config, result, needs, budget, _noise_note(results, chosen, start.policy, reps)


def _choose(results, base_policy: str):
    """The fastest candidate by mean tg, unless a candidate of the base profile's policy has its
    mean inside the fastest's min..max range (the noise of the fastest: a noisy candidate's own
    wide range does not count): then the fastest of that policy, so the noise does not pick it."""
    fastest = max(results, key=lambda r: r[1].tg.mean)
    if fastest[0].policy == base_policy or len(fastest[1].tg.values) < 2:
        return fastest
    tied = [r for r in results if r[0].policy == base_policy and r[1].tg.mean >= fastest[1].tg.min]
    return max(tied, key=lambda r: r[1].tg.mean) if tied else fastest


NOISY_SPREAD = 0.10  # std / mean above which a candidate's timing is called noisy


def _noise_note(results, chosen, base_policy: str, reps: int) -> str:
    """One line: which candidates cannot be told apart from the chosen one (``Measure.within_noise``),
    and which are noisy."""
    if reps < 2:
        return "one repetition per candidate: no spread measured, so no candidate is known to be faster; give -r 3"
    tg = chosen[1].tg
    fastest = max(results, key=lambda r: r[1].tg.mean)
    tied = [r for r in results if r is not chosen and r[1].tg.within_noise(tg)]
    if not tied:
        text = f"{_label(chosen[0])} is faster than every other candidate beyond the noise (min..max ranges apart)"
    else:
        names = "; ".join(f"{_label(c)} {_spread(r.tg)}" for c, r, _ in tied)
        text = f"within the noise of {_label(chosen[0])} ({_spread(tg)} t/s): {names}"
    if chosen is not fastest:
        text += f"; kept policy {base_policy}, the base profile's, as {_label(fastest[0])} is within the noise"
    noisy = [c for c, r, _ in results if r.tg.spread > NOISY_SPREAD]
    if noisy:
        text += (f"; noisy (std/mean over {100 * NOISY_SPREAD:.0f}%): {', '.join(map(_label, noisy))}: a busy "
                 "machine? more -r")
    return text


def _spread(m: Measure) -> str:
    if not m.values:
        return "-"
    if len(m.values) == 1:
        return f"{m.mean:.1f}"
    return f"{m.mean:.1f} ± {m.std:.1f} ({m.min:.1f}..{m.max:.1f})"


def _model_text(model: Path, temp: Optional[Path], preset: str) -> str:
    if temp is not None and Path(model).is_relative_to(temp):
        return f"a synthetic {preset} pack of {ModelConfig.from_dir(model).num_hidden_layers} layers"
    return model_label(model)


def _print_list() -> None:
    """One line per profile, shipped then the user's: name, where, GPU, VRAM, RAM, description."""
    entries = list_profiles()
    rows = [("NAME", "WHERE", "GPU", "VRAM", "RAM", "DESCRIPTION")]
    for e in entries:
        where = e.where + (" (shadowed by shipped)" if e.shadowed else "")
        if e.profile is None:
            rows.append((e.name, where, "-", "-", "-", f"invalid: {e.error}"))
            continue
        p = e.profile
        rows.append((e.name, where, p.gpu, p.vram, p.ram, _short(p.comment)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths)) + "  " + r[5])
    from offload.profile import profile_dirs

    for where, folder in profile_dirs():
        print(f"{where}: {folder}{'' if folder.is_dir() else ' (not there yet)'}")


def _short(comment: str, limit: int = 72) -> str:
    text = " ".join(comment.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                         experts_per_layer=count, policy=policy, kv_bits=None if start.kv_bits == 16 else start.kv_bits)
    engine = load(model, config, context_needed(prompt_tokens, gen_tokens))
    try:
        result = measure(engine, config, prompt_tokens, gen_tokens, reps)
        context = min(start.context, engine.config.max_position_embeddings)
        kv = kv_cache_bytes(engine.config, context, engine.dtype, engine.plan.kv_bits, engine.plan.prefill_chunk)
        needs = engine.plan.device_bytes - engine.plan.kv_cache_bytes + kv
    finally:
        engine.close()
    return config, result, needs
