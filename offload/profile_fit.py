"""The automatic profile: the best shipped plan for this device, fitted to the model at hand.

What it is: ``fit_profile`` (a profile's plan made to fit one model: the widest weights that
fit its budgets, and no budget at all when every expert fits on the device, exactly a plain
run) and ``auto_profile`` (the best shipped profile for the device, fitted, or plain defaults
with the reason), ``card_fit`` (the same for a card of a given size, not this machine's: what
``offload info --vram`` plans), and ``fit_hints`` (the flags that would make a plan fit a card
that is too small, for one-line errors). Shipped plans are written for Mixtral-8x7B in 4 bits; fitting keeps a small
model at 16 bits and resident, and gives a large one the profile's bits and budgets. What it is
not: the profile file format or the machine probe (profile.py), nor a benchmark.

The fit rule (``fit_profile``), for a profile picked automatically: try the widest weights first,
16 bits, then 8, then the profile's own ``expert_bits`` (attention at the same width, never
narrower than the profile's ``attn_bits``); the first width at which the model fits the profile's
budgets wins. On a GPU a width wider than the profile's wins only when it makes every expert
resident: with a cache the narrow experts move fewer bytes per miss and fit more slots, and
int8 experts are slow there besides (the int8 path casts each whole matrix to bf16 on every
call), so nf4 with a cache beats 8 or 16 bits with one. Without a GPU the first width that fits
wins, cache or not. The device holds ``plan.vram`` (default ``machine.vram``; on a machine without a GPU,
``machine.ram``), the RAM tier ``plan.ram`` (default ``machine.ram``), each scaled from the
profile's machine to this one (the same share of its memory), or replaced by ``--vram``,
``--ram``, ``--experts-per-layer`` when given; "fits" means the dense
weights, the KV cache at the profile's context, top-k experts per layer and, on a GPU, the
runtime reserve (``offload.plan.runtime_reserve``) fit on the device, and
every other expert has a place on the device or in RAM (no disk reads, unless ``--ram`` is given:
a RAM budget the user set may leave misses to the disk; on a GPU the RAM tier is
counted in pinned blocks as the host allocator rounds them; without a GPU, device and RAM tier
share ``machine.ram``). When every expert fits on the device at that width, the plan
has no budget at all (every expert resident, no cache), policy ``auto`` and a plain run's
context, as a run without a profile. A profile given by name keeps its plan exactly as written.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from offload import quant
from offload.config import ModelConfig
from offload.device import device_name, is_cuda, resolve_device
from offload.errors import BudgetError, OffloadError, SettingError
from offload.plan import (
    article,
    attention_shapes,
    format_bytes,
    minimum_vram,
    parse_bytes,
    plan_memory,
    plan_model,
)
from offload.profile import Profile, best_shipped_profile, probe_machine
from offload.profile import _size_text as _profile_size_text


def _size_text(n: int) -> str:
    """profile.py's short size string ("11GiB", "812MiB"), with a unit below 1 MiB too ("4096B"):
    a bare number is no size (``parse_bytes``), 0 excepted."""
    text = _profile_size_text(n)
    return text + "B" if text.isdigit() and text != "0" else text


def _widths(profile: Profile, expert_bits: int | None, attn_bits: int | None) -> list[tuple[int, int]]:
    """(expert bits, attention bits) to try, widest first: 16, 8, then the profile's own; a
    width given by a flag stays fixed."""
    pairs = []
    for width in (16, 8, profile.expert_bits):
        if width < profile.expert_bits:
            continue
        pairs.append((expert_bits or width, attn_bits or max(width, profile.attn_bits)))
    return list(dict.fromkeys(pairs))


def _bits_text(expert_fmt: quant.WeightFormat, bits: int, attn: int, fixed: bool) -> str:
    experts = f"{expert_fmt.name} experts" if fixed else f"{bits}-bit experts"
    if not fixed and bits == attn:
        return f"{bits}-bit weights"
    return f"{experts}, {attn}-bit attention"


def fit_profile(
    profile: Profile,
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    context: int | None = None,
    expert_format: quant.WeightFormat | str | None = None,
    expert_bits: int | None = None,
    attn_bits: int | None = None,
    vram: int | None = None,
    ram: int | None = None,
    experts_per_layer: int | None = None,
    machine: dict[str, Any] | None = None,
    model_name: str = "the model",
    kv_bits: int | None = None,
    prefill_tokens: int | None = None,
) -> tuple[Profile, str]:
    """``profile``'s plan fitted to ``config`` (the module's fit rule), and a short reason.

    ``dtype`` is the compute dtype; ``context`` the context to plan for (default: the profile's,
    lowered to the model's maximum; a model that runs with every expert resident gets a plain
    run's context); ``expert_format`` a fixed expert format (a pack's, or ``--expert-format``);
    ``expert_bits`` / ``attn_bits`` widths fixed by flags; ``vram`` / ``ram`` (bytes) and
    ``experts_per_layer``: budgets given by flags, which replace the profile's. ``machine``
    (``probe_machine``'s dict) scales the profile's budgets to this machine's memory (a plan
    for a 12 GiB card that keeps 11 GiB keeps 11/12 of a bigger or smaller card). ``kv_bits``
    (``--kv-bits``) replaces the profile's KV cache width, ``prefill_tokens`` (``--batch-size``)
    fixes the prefill chunk the reserve is sized for (None: the plan's, fitted). The returned
    profile has the chosen bits and either no budget (every expert resident) or budgets.
    Raises BudgetError, naming the field, when the model fits at none of the widths."""
    from offload.loader import DEFAULT_CONTEXT

    where = profile.source or profile.name or "profile"
    device_type = "cuda" if profile.has_gpu else "cpu"
    plain_context = context or min(config.max_position_embeddings, DEFAULT_CONTEXT)
    context = context or min(config.max_position_embeddings, profile.context)
    machine_field = "machine.vram" if profile.has_gpu else "machine.ram"
    device_field = "plan.vram" if profile.plan_vram is not None else machine_field
    device_budget = profile.plan_vram_bytes if profile.plan_vram is not None else profile.device_bytes
    ram_field = "plan.ram" if profile.plan_ram is not None else "machine.ram"
    ram_budget = profile.plan_ram_bytes if profile.plan_ram is not None else profile.ram_bytes
    ram_total = profile.ram_bytes
    if machine is not None:  # the profile's shares of its machine, of this one
        here = machine["vram"] if profile.has_gpu else machine["ram"]
        device_budget = device_budget * here // max(1, profile.device_bytes)
        ram_budget = ram_budget * machine["ram"] // max(1, profile.ram_bytes)
        ram_total = machine["ram"]
    slots = profile.experts_per_layer
    if vram is not None:
        device_budget, device_field, slots = vram, "--vram", None
    if experts_per_layer is not None:
        slots, device_field = experts_per_layer, "--experts-per-layer"
    if ram is not None:
        ram_budget, ram_field = ram, "--ram"
    I, D = config.intermediate_size, config.hidden_size
    expert_shapes, attn_shapes = ((I, D), (D, I)), tuple(attention_shapes(config).values())
    fixed_width = expert_bits is not None or expert_format is not None
    widths = _widths(profile, expert_bits, attn_bits)
    if expert_format is not None:  # a pack's format: the bits the profile says must be its own
        fixed = quant.get_format(expert_format)
        own = 16 if fixed.kind == "plain" else fixed.bits
        widths = list(dict.fromkeys((own, attn) for _, attn in widths))
    kv = profile.kv_bits if kv_bits is None else kv_bits
    why = ""
    for bits, attn in widths:
        if expert_format is not None:
            expert_fmt = quant.get_format(expert_format)
        else:
            expert_fmt = quant.format_for_bits(bits, dtype, device_type, expert_shapes, "--expert-bits")
        attn_fmt = quant.format_for_bits(attn, dtype, device_type, attn_shapes, "--attn-bits")
        sizes = dict(device_type=device_type, kv_bits=kv, prefill_tokens=prefill_tokens, sdpa=profile.sdpa)
        plan = plan_model(model_name, config, dtype, context, expert_fmt, attn_fmt, **sizes)
        what = _bits_text(expert_fmt, bits, attn, expert_format is not None)
        fitted = replace(profile, expert_bits=bits, attn_bits=attn, kv_bits=kv)
        resident = plan_model(model_name, config, dtype, plain_context, expert_fmt, attn_fmt, **sizes)
        if resident.all_resident_vram <= device_budget and slots is None:  # as a run without a profile
            none = replace(
                fitted, plan_vram=None, plan_ram=None, experts_per_layer=None, policy="auto", context=plain_context
            )
            return none, f"{what}, every expert resident, no budget"
        if profile.has_gpu and not fixed_width and bits > profile.expert_bits:
            continue  # on a GPU a wider width is taken only when it makes every expert resident
        least = minimum_vram(config, dtype, context, expert_fmt, attn_fmt, **sizes)
        if least > device_budget:
            why = (f"{device_field}: {model_name} needs at least {format_bytes(least)} on the device "
                   f"at {what}; the budget is {format_bytes(device_budget)}")
            continue
        if slots:
            budget: dict[str, int] = dict(experts_per_layer=slots)
        else:
            budget = dict(vram=device_budget)
        memory = plan_memory(
            config, plan.expert_bytes, dtype, context, ram=ram_budget, dense=plan.device_dense_bytes,
            device_type=device_type, expert_format=expert_fmt, attn_format=attn_fmt, kv_bits=kv,
            prefill_tokens=prefill_tokens, sdpa=profile.sdpa, **budget,
        )
        if memory.device_bytes > device_budget:
            why = (f"{device_field}: {model_name} needs {format_bytes(memory.device_bytes)} on the device for "
                   f"{slots} experts per layer at {what}; the budget is "
                   f"{format_bytes(device_budget)}")
            continue
        shared = 0 if profile.has_gpu else memory.device_bytes  # without a GPU, slots and RAM tier share RAM
        if (memory.disk_tier and ram is None) or shared + memory.host_bytes > ram_total:
            why = (f"{ram_field}: {model_name}'s experts at {what} need "
                   f"{format_bytes(memory.experts_total * plan.expert_bytes)} in RAM; the budget is "
                   f"{format_bytes(ram_budget)}")
            continue
        budgeted = replace(
            fitted,
            plan_vram=None if slots else _size_text(device_budget),
            experts_per_layer=slots,
            plan_ram=None if profile.plan_ram is None and ram is None else _size_text(ram_budget),
        )
        if memory.disk_tier:  # --ram given, smaller than the experts: the user's budget, misses from disk
            rest = f"{memory.host_experts} in RAM, the rest read from disk"
        else:
            rest = "the rest in RAM"
        return budgeted, f"{what}, {memory.slots_phrase()}, {rest}"
    raise BudgetError(f"{where}: {why}")


def model_shape(
    model: str | Path,
) -> tuple[ModelConfig, quant.WeightFormat | None, torch.dtype | None, int | None]:
    """(config, a pack's expert format, a plain pack's dtype, the width of a pack's quantized
    attention or None) of a checkpoint, pack or hub id in the local cache; only config.json and
    a pack's manifest are read."""
    from offload.hub import resolve_model
    from offload.pack import Pack, is_pack

    path = resolve_model(model)
    config = ModelConfig.from_dir(path)
    if not is_pack(path):
        return config, None, None, None
    pack = Pack(path)
    try:
        layout, attention = pack.layout, pack.attn_format
    finally:
        pack.close()
    attn_bits = None if attention is None or attention.kind == "plain" else (8 if attention.kind == "int8" else 4)
    return config, layout.fmt, layout.dtype if layout.plain else None, attn_bits


def auto_profile(
    model: str | Path,
    device: str | torch.device = "auto",
    *,
    dtype: str | torch.dtype | None = None,
    context: int | None = None,
    expert_format: str | None = None,
    expert_bits: int | None = None,
    attn_bits: int | None = None,
    vram: int | str | None = None,
    ram: int | str | None = None,
    experts_per_layer: int | None = None,
    machine: dict[str, Any] | None = None,
    kv_bits: int | None = None,
    batch_size: int | None = None,
) -> tuple[Profile | None, str]:
    """The best shipped profile for ``device`` fitted to ``model`` (``fit_profile``), and why;
    ``(None, why)`` when no shipped profile suits the device or the model fits none of the
    widths: run with plain defaults then. The other arguments are the flags given (they fix
    what they name); ``machine`` defaults to a probe without timings. Raises no OffloadError:
    a model that cannot be read is the engine's to report."""
    from offload.loader import DEFAULT_DTYPE, parse_dtype

    try:
        torch_device = resolve_device(device) if isinstance(device, str) else device
        what = f"this GPU ({device_name(torch_device)})" if is_cuda(torch_device) else "this CPU"
        profile = best_shipped_profile(torch_device)
        if machine is None:
            machine = probe_machine(device=str(torch_device), copy_bytes=0)
        config, pack_format, pack_dtype, pack_attn_bits = model_shape(model)
        torch_dtype = parse_dtype(dtype) if dtype is not None else pack_dtype or parse_dtype(DEFAULT_DTYPE)
        fitted, how = fit_profile(
            profile, config, dtype=torch_dtype, context=context,
            expert_format=pack_format or expert_format, expert_bits=expert_bits,
            attn_bits=attn_bits or pack_attn_bits,  # a pack's quantized attention is fixed, like its experts
            vram=None if vram is None else parse_bytes(vram, "--vram"),
            ram=None if ram is None else parse_bytes(ram, "--ram"),
            experts_per_layer=experts_per_layer, machine=machine, model_name=Path(str(model)).name or str(model),
            kv_bits=kv_bits, prefill_tokens=batch_size,
        )
    except OffloadError as exc:
        return None, f"auto: {exc}; plain defaults"
    return fitted, f"auto: best shipped profile for {what}; {how}"


def _bits_of(fmt: quant.WeightFormat) -> int:
    return 16 if fmt.kind == "plain" else fmt.bits


def card_fit(
    config: ModelConfig,
    vram: int,
    *,
    ram: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    context: int | None = None,
    expert_format: quant.WeightFormat | str | None = None,
    attn_bits: int | None = None,
    model_name: str = "the model",
    kv_bits: int | None = None,
    prefill_tokens: int | None = None,
) -> tuple[Profile | None, Profile | None, str]:
    """What ``generate`` would take with no bits given on a card of ``vram`` bytes (not this
    machine's): the shipped GPU profile ``best_shipped_profile`` picks for a card of that size,
    fitted (``fit_profile``) with ``vram`` as the device budget and ``ram`` bytes as the RAM tier
    (None: RAM holds every expert; ``offload info``'s default). ``expert_format`` / ``attn_bits``
    are a pack's fixed widths, ``kv_bits`` / ``prefill_tokens`` the flags' (``fit_profile``). Returns (the shipped profile or None when no shipped card is that
    small, the fitted profile or None when the model fits at none of its widths, the reason)."""
    try:
        profile = best_shipped_profile(torch.device("cuda"), vram_total=vram)
    except SettingError as exc:
        return None, None, f"{exc}; plain defaults"
    if ram is None:  # room for every expert at 16 bits in pinned blocks, whatever the profile's machine has
        room = 4 * config.num_moe_layers * config.num_local_experts * config.expert_parameters * 4
        machine = {"vram": vram, "ram": max(room, profile.ram_bytes)}
    else:
        machine = {"vram": vram, "ram": ram}
    try:
        fitted, how = fit_profile(
            profile, config, dtype=dtype, context=context, expert_format=expert_format, attn_bits=attn_bits,
            vram=vram, ram=ram, machine=machine, model_name=model_name, kv_bits=kv_bits, prefill_tokens=prefill_tokens,
        )
    except BudgetError as exc:
        return profile, None, str(exc)
    size = format_bytes(vram).replace(".00 ", " ")
    return profile, fitted, f"the shipped profile for {article(size).lower()} {size} card; {how}"


def fit_hints(
    name: str,
    config: ModelConfig,
    dtype: torch.dtype,
    context: int,
    expert_format: quant.WeightFormat,
    attn_format: quant.WeightFormat,
    vram: int,
    *,
    device_type: str = "cuda",
    experts_fixed: bool = False,
    kv_bits: int = 16,
    prefill_tokens: int | None = None,
    sdpa: str = "fused",
) -> str:
    """The flags that make ``name`` fit a card of ``vram`` bytes that is below its minimum at
    these widths and ``context``, as one clause for an error line: narrower weights (the widest
    that fit: ``--expert-bits 4``, ``--attn-bits 4``; no expert width when ``experts_fixed``, a
    pack's own), an 8-bit KV cache (``--kv-bits 8``, from 16), the largest ``--context`` that fits at these widths, and the ``--vram`` the plan
    needs (``offload.plan.minimum_vram``: at ``prefill_tokens``, or the smallest chunk a plan
    fits down to), with the KV cache at ``kv_bits`` and the card's attention kernel ``sdpa``. ""
    when the plan fits."""
    I, D = config.intermediate_size, config.hidden_size
    expert_shapes, attn_shapes = ((I, D), (D, I)), tuple(attention_shapes(config).values())

    def minimum(ctx: int, experts: quant.WeightFormat, attention: quant.WeightFormat, kv: int = kv_bits) -> int:
        return minimum_vram(config, dtype, ctx, experts, attention, device_type=device_type, kv_bits=kv,
                            prefill_tokens=prefill_tokens, sdpa=sdpa)

    need = minimum(context, expert_format, attn_format)
    if need <= vram:
        return ""
    own_e, own_a = _bits_of(expert_format), _bits_of(attn_format)
    widths = []
    for e_bits, a_bits in ((8, own_a), (4, own_a), (own_e, 8), (own_e, 4), (8, 8), (4, 8), (8, 4), (4, 4)):
        if (e_bits, a_bits) == (own_e, own_a) or e_bits > own_e or a_bits > own_a or (experts_fixed and e_bits != own_e):
            continue
        experts = expert_format if e_bits == own_e else quant.format_for_bits(
            e_bits, dtype, device_type, expert_shapes, "--expert-bits")
        attention = attn_format if a_bits == own_a else quant.format_for_bits(
            a_bits, dtype, device_type, attn_shapes, "--attn-bits")
        if minimum(context, experts, attention) <= vram:
            flags = [f"--expert-bits {e_bits}" if e_bits != own_e else "", f"--attn-bits {a_bits}" if a_bits != own_a else ""]
            widths.append(" ".join(f for f in flags if f))
            break
    hints = [f"with {widths[0]}"] if widths else []
    if kv_bits == 16 and minimum(context, expert_format, attn_format, 8) <= vram:  # half the KV cache
        hints.append("with --kv-bits 8")
    if minimum(1, expert_format, attn_format) <= vram:  # the largest context that fits: a bisection
        low, high = 1, context - 1
        while low < high:
            mid = (low + high + 1) // 2
            if minimum(mid, expert_format, attn_format) <= vram:
                low = mid
            else:
                high = mid - 1
        hints.append(f"at --context {low} (the largest that fits {format_bytes(vram)} at these widths)")
    hints.append(f"on --vram {math.ceil(need / 2**30 * 100) / 100:g}GiB or more")
    return f"{name} fits " + ", or ".join(hints)


__all__ = ["auto_profile", "card_fit", "fit_hints", "fit_profile", "model_shape"]
