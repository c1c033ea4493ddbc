"""`offload info MODEL`: the memory plan a user reads before downloading 90 GB.

Argument parsing and rich output only; the arithmetic is ``offload.plan.plan_model`` and the
speed estimate ``offload.estimate``. MODEL is a checkpoint directory or pack (its config.json),
a built-in name (``offload.plan.BUILTIN_MODELS``), so the plan for Mixtral-8x7B needs no
download, or a hub id (org/name): from the local Hugging Face cache, else its config.json alone
fetched and checked (``offload.hub.resolve_config``), never a weight. Nothing is loaded: only
shapes are read. The table's title names the model's family and its total and active
parameters (``offload.plan.parameter_count``); a family's own dense weights (q/k norms, biases,
Qwen2-MoE's shared expert, dense-MLP layers) are counted in their classes. With ``--vram`` and
no bits, format or profile given, the plan is the one ``generate`` would run on a card of that size: the shipped profile for it, fitted to the model
(``offload.profile_fit.card_fit``: its bits and context), named in one line; a card too small
is one error line naming the flags that would fit (``offload.profile_fit.fit_hints``: narrower weights,
``--kv-bits 8``, a shorter context, a larger card). ``--kv-bits`` plans the KV cache at 16 or 8 bits (the KV
cache row says which); ``-b/--batch-size`` fixes the prefill chunk the runtime reserve is sized for (the
prefill chunk row: the default 256, a chunk fitted down to a small card, or the flag's). With a budget (``--vram``,
``--experts-per-layer``) or a profile, the last line is the estimated decode speed, labelled
an estimate, for the profile's machine or the one ``--mem-gbps``, ``--link-gbps``,
``--disk-gbps`` and ``--ram-gbps`` describe, with misses placed as ``--cpu-experts`` says (the
profile's ``plan.cpu_experts``, else the engine's default, auto), the transfer-only figure beside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from cli.common import stderr, user_errors
from offload import quant
from offload.config import ModelConfig
from offload.engine import DEFAULT_CONTEXT, DEFAULT_DTYPE, DTYPES, parse_dtype
from offload.errors import BudgetError, ConfigError, SettingError
from offload.estimate import (
    DEFAULT_DISK_GBPS,
    DEFAULT_LINK_GBPS,
    DEFAULT_MEM_GBPS,
    DEFAULT_RAM_GBPS,
    Estimate,
    Machine,
    estimate_plan,
)
from offload.experts.placement import CPU_EXPERTS
from offload.plan import (
    BUILTIN_MODELS,
    KV_BITS,
    PREFILL_CHUNK_TOKENS,
    ModelPlan,
    check_kv_bits,
    article,
    attention_shapes,
    builtin_model,
    format_bytes,
    is_decimal_size,
    kv_positions,
    parse_bytes,
    plan_model,
)
from offload.quant import BITS_CHOICES, FORMATS, WeightFormat, get_format

BITS = "|".join(map(str, BITS_CHOICES))


def info_command(
    model: str = typer.Argument(
        ...,
        metavar="MODEL",
        help=f"A checkpoint directory or pack, a hub id (org/name: only its config.json is fetched), or a "
        f"built-in model: {', '.join(BUILTIN_MODELS)}.",
    ),
    vram: Optional[str] = typer.Option(
        None, "--vram", help="GPU memory budget (e.g. 12GiB; 12GB is 12 x 10^9 bytes). With no bits, format "
        "or profile given, the plan generate would run on such a card (its shipped profile, fitted). Default: "
        "show the minimum card."
    ),
    ram: Optional[str] = typer.Option(
        None, "--ram", help="RAM budget for experts (e.g. 32GiB), not the machine's RAM; 0: every miss reads "
        "the disk. Default: RAM holds every expert."
    ),
    context: Optional[int] = typer.Option(
        None, "--context", help=f"Context length of the KV cache (default: min(model maximum, {DEFAULT_CONTEXT}))."
    ),
    expert_bits: Optional[int] = typer.Option(
        None, "--expert-bits", help=f"Expert weights in {BITS} bits: 4 nf4-dq (double-quantized nf4), 8 int8, 16 the compute dtype (default)."
    ),
    attn_bits: Optional[int] = typer.Option(
        None, "--attn-bits", help=f"Attention projections (q, k, v, o) in {BITS} bits, mapped like --expert-bits (default 16)."
    ),
    expert_format: Optional[str] = typer.Option(
        None, "--expert-format", help=f"Expert format by name instead of --expert-bits: {'|'.join(FORMATS)}."
    ),
    kv_bits: Optional[int] = typer.Option(
        None, "--kv-bits", help=f"KV cache in {'|'.join(map(str, KV_BITS))} bits: 16 the compute dtype (default), "
        "8 int8 with a scale in the compute dtype per layer, head and position (half the bytes).",
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", "-b", min=1, help=f"Prompt tokens per forward pass (the prefill chunk the runtime reserve is "
        f"sized for). Default {PREFILL_CHUNK_TOKENS}, smaller when its reserve would not fit the card.",
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help=f"Compute dtype: {'|'.join(DTYPES)} (default {DEFAULT_DTYPE}; a pack: its own)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, sizes in bytes."),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="Plan with a machine profile's budgets, bits and context, and estimate the "
        "speed on its machine: a shipped name or a TOML path; flags given explicitly win. No default: "
        "info plans what the flags say.",
    ),
    experts_per_layer: Optional[int] = typer.Option(
        None, "--experts-per-layer", help="Expert slots on the GPU for every layer (top-k to all), instead of --vram."
    ),
    mem_gbps: Optional[float] = typer.Option(
        None, "--mem-gbps", help=f"The card's memory bandwidth for the estimate, GB/s (default: the profile's, "
        f"else {DEFAULT_MEM_GBPS:g}, an RTX 3060 12 GB).",
    ),
    link_gbps: Optional[float] = typer.Option(
        None, "--link-gbps", help=f"Host-to-device copy for the estimate, GB/s (default: the profile's, else "
        f"{DEFAULT_LINK_GBPS:g}, PCIe 4.0 x16 as measured).",
    ),
    disk_gbps: Optional[float] = typer.Option(
        None, "--disk-gbps",
        help=f"Disk read for the estimate, GB/s (default: the profile's, else {DEFAULT_DISK_GBPS:g}).",
    ),
    ram_gbps: Optional[float] = typer.Option(
        None, "--ram-gbps", help=f"The CPU's RAM read bandwidth for CPU experts in the estimate, GB/s (default: "
        f"the profile's, else {DEFAULT_RAM_GBPS:g}, dual-channel DDR5-5600 as read).",
    ),
    cpu_experts: Optional[str] = typer.Option(
        None, "--cpu-experts", help=f"Where misses run in the estimate: {'|'.join(CPU_EXPERTS)} (auto: the "
        "placement cost model, GPU after a copy or CPU per miss; off: every miss over the link; all: every "
        "expert on the CPU). Default: the profile's, else auto, as the engine.",
    ),
) -> None:
    """Show how a model splits between GPU, RAM and disk: sizes by class, one expert, KV cache,
    how many experts fit on the card and in RAM, and (with a budget or a profile) an estimate
    of the decode speed."""
    with user_errors():
        if cpu_experts is not None and cpu_experts not in CPU_EXPERTS:
            raise SettingError(f"--cpu-experts {cpu_experts!r}: choose one of {', '.join(CPU_EXPERTS)}")
        if kv_bits is not None:
            check_kv_bits(kv_bits)
        p = None
        ceiling = None  # a profile's context: a ceiling the model may lower, as for generate
        sdpa = "fused"  # the card's attention kernel: a profile's, else flash (Ampere and later)
        if profile:  # the profile's plan, where no flag says otherwise
            from offload.profile import load_profile

            p = load_profile(profile)
            if vram is None and experts_per_layer is None:
                vram, experts_per_layer = p.plan_vram, p.experts_per_layer
            ram = ram or p.plan_ram
            ceiling = p.context
            kv_bits = kv_bits or p.kv_bits
            sdpa = p.sdpa
            if expert_format is None:
                expert_bits = expert_bits or p.expert_bits
            profile_attn_bits = p.attn_bits
        else:
            profile_attn_bits = None
        if expert_format is not None and expert_bits is not None:
            raise SettingError("give --expert-format or --expert-bits, not both")
        if vram is not None and experts_per_layer is not None:
            raise SettingError("give --vram or --experts-per-layer, not both")
        device_type = "cpu" if p is not None and not p.has_gpu else "cuda"
        name, config, pack_format, pack_dtype, pack_attn_bits = _resolve_model(model)
        vram_bytes = None if vram is None else parse_bytes(vram, "--vram")
        ram_bytes = None if ram is None else parse_bytes(ram, "--ram")
        for flag, text, nbytes in (("--vram", vram, vram_bytes), ("--ram", ram, ram_bytes)):
            if is_decimal_size(text) and nbytes:
                stderr.print(f"note: {flag} {text.strip()} is decimal: {nbytes:,} bytes, {_size(nbytes)} "
                             "(GiB, as this plan reports, is 2^30 bytes)", style="dim")
        torch_dtype = parse_dtype(dtype) if dtype is not None else pack_dtype or parse_dtype(DEFAULT_DTYPE)
        given_bits = expert_bits  # the flag, for the table's note (not an automatic choice)
        chosen = None  # the automatic profile: {"name", "auto", "reason", ...}
        if (p is None and vram_bytes is not None and experts_per_layer is None and expert_bits is None
                and expert_format is None and attn_bits is None):
            from offload.profile_fit import card_fit

            shipped, fitted, why = card_fit(
                config, vram_bytes, ram=ram_bytes, dtype=torch_dtype, context=context, expert_format=pack_format,
                attn_bits=pack_attn_bits, model_name=name, kv_bits=kv_bits, prefill_tokens=batch_size,
            )
            take = fitted or shipped  # nothing fits: the profile's own widths, for the error's hints
            if take is not None:
                if pack_format is None:
                    expert_bits = take.expert_bits
                attn_bits = pack_attn_bits or take.attn_bits
                kv_bits = kv_bits or take.kv_bits
                sdpa = take.sdpa
                ceiling = take.context
            chosen = dict(name=take.name if take is not None else "none", auto=True, fits=fitted is not None,
                          reason=f"auto: {why}", expert_bits=expert_bits, attn_bits=attn_bits)
        elif p is not None:
            chosen = dict(name=p.name or p.source, auto=False)
        if pack_attn_bits is not None and attn_bits not in (None, pack_attn_bits):
            stderr.print(
                f"note: {model} holds {pack_attn_bits}-bit attention; running this plan needs a convert "
                f"with --attn-bits {attn_bits}",
                style="dim",
            )
        attn_bits = attn_bits or pack_attn_bits or profile_attn_bits or 16  # a pack's quantized attention is fixed
        if context is None and ceiling is not None:
            context = min(ceiling, config.max_position_embeddings)
        if p is not None and vram is None and experts_per_layer is None:
            experts_per_layer = config.num_local_experts  # a profile with no budget: every expert resident
        I, D = config.intermediate_size, config.hidden_size
        expert_shapes = ((I, D), (D, I))
        attn_shapes = tuple(attention_shapes(config).values())
        if expert_format is not None:
            experts = get_format(expert_format)
        elif expert_bits is not None:
            experts = quant.format_for_bits(expert_bits, torch_dtype, device_type, expert_shapes, "--expert-bits")
        else:
            experts = pack_format or quant.format_for_bits(16, torch_dtype, device_type)
        attention = quant.format_for_bits(attn_bits, torch_dtype, device_type, attn_shapes, "--attn-bits")
        if pack_format is not None and experts != pack_format:
            stderr.print(
                f"note: {model} holds {pack_format.name} experts; running this plan needs a convert "
                f"with --expert-format {experts.name}",
                style="dim",
            )
        context = context if context is not None else min(config.max_position_embeddings, DEFAULT_CONTEXT)
        kv_bits = kv_bits or 16
        try:
            plan = plan_model(
                name, config, torch_dtype, context, experts, attention, vram=vram_bytes, ram=ram_bytes,
                experts_per_layer=experts_per_layer, device_type=device_type, kv_bits=kv_bits,
                prefill_tokens=batch_size, sdpa=sdpa,
            )
        except BudgetError as exc:
            if vram_bytes is None:
                raise
            from offload.profile_fit import fit_hints

            hints = fit_hints(name, config, torch_dtype, context, experts, attention, vram_bytes,
                              device_type=device_type, experts_fixed=pack_format is not None, kv_bits=kv_bits,
                              prefill_tokens=batch_size, sdpa=sdpa)
            auto = ""
            if chosen is not None and chosen["auto"] and chosen["name"] != "none":
                auto = (f"; profile {chosen['name']} (auto) fits at none of its widths, down to {experts.name} "
                        f"experts and {attention.name} attention at context {context}")
            elif chosen is not None and chosen["auto"]:
                auto = f"; no shipped profile is for a card this small (auto): plain defaults, {experts.name} experts"
            raise BudgetError(f"{exc}{auto}; {hints}" if hints else f"{exc}{auto}") from None
        estimate = None
        if p is not None or plan.vram is not None or experts_per_layer is not None or (
            mem_gbps or link_gbps or disk_gbps or ram_gbps
        ):
            mode = cpu_experts or (p.cpu_experts if p is not None else None) or "auto"
            estimate = _estimate(plan, p, mem_gbps, link_gbps, disk_gbps, ram_gbps, mode)
        if as_json:
            print(json.dumps(dict(
                plan.to_dict(), summary=summary(plan), profile=chosen,
                estimate=None if estimate is None else dict(estimate.to_dict(), summary=estimate.describe()),
            )))
            return
        out = Console(highlight=False, soft_wrap=True, markup=False)
        if chosen is not None and chosen["auto"]:
            out.print(f"profile: {chosen['name']} ({chosen['reason']}); --profile, --expert-bits or --attn-bits "
                      "to choose")
        out.print(_table(plan, given_bits, batch_size))
        out.print(summary(plan))
        if estimate is not None:
            out.print(estimate.describe())


def _estimate(plan: ModelPlan, profile, mem_gbps, link_gbps, disk_gbps, ram_gbps, mode: str) -> Optional[Estimate]:
    """The decode estimate on the profile's machine, or on the one the flags (or their defaults)
    describe, with misses placed as ``mode`` says; None, with a note, when a profile gives no
    memory bandwidth and no flag does. A card's profile that states no RAM bandwidth (an older
    one) is estimated transfer-only, with a note."""
    flags = dict(mem_gbps=mem_gbps, link_gbps=link_gbps, disk_gbps=disk_gbps, ram_gbps=ram_gbps)
    if profile is not None:
        if profile.mem_gbps is None and mem_gbps is None:
            stderr.print(f"note: no estimate: {profile.name or profile.source} gives no machine.mem_gbps "
                         "(--mem-gbps to give one)", style="dim")
            return None
        machine = Machine.from_profile(profile, **flags)
    else:
        given = {k: v for k, v in flags.items() if v is not None}
        source = "flags" if given else "defaults"
        given.setdefault("ram_gbps", DEFAULT_RAM_GBPS)
        machine = Machine(device_type=plan.device_type, **given, source=source)
    if mode != "off" and machine.device_type == "cuda" and not machine.prices_cpu_experts:
        stderr.print(f"note: {profile.name or profile.source} gives no machine.ram_gbps: the estimate is "
                     "transfer-only (--ram-gbps to price CPU experts)", style="dim")
        mode = "off"
    return estimate_plan(plan, machine, cpu_experts=mode)


def _resolve_model(
    model: str,
) -> tuple[str, ModelConfig, Optional[WeightFormat], Optional[torch.dtype], Optional[int]]:
    """(display name, config, a pack's expert format, a plain pack's dtype, the width of a pack's
    quantized attention) for MODEL. An existing path wins over a built-in name."""
    from offload.profile_fit import model_shape

    from offload.hub import hub_cache_dir, is_hub_id, resolve_config

    path = Path(model)
    if path.exists():
        return (path.name, *model_shape(path))
    if model.strip().lower() in BUILTIN_MODELS:
        name, config = builtin_model(model)
        return name, config, None, None, None
    cached = is_hub_id(model) and (hub_cache_dir() / ("models--" + model.replace("/", "--"))).is_dir()
    if "/" in model or cached:  # a hub id: cached, or its config.json fetched (never a weight)
        if is_hub_id(model):
            return (model, *model_shape(resolve_config(model)))
    raise ConfigError(
        f"{model}: not a model directory, not a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "and not a Hugging Face model id (org/name)"
    )


def _billions(n: int) -> str:
    """A parameter count as model cards write it: "30.5B", "141B", "6.9B"."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _size(n: int) -> str:
    """format_bytes without a needless '.00' ("12 GiB", "94.50 MiB")."""
    return format_bytes(n).replace(".00 ", " ")


def _format_note(fmt: WeightFormat, bits: Optional[int], plan: ModelPlan) -> str:
    c = plan.config
    per_weight = fmt.bits_per_weight((c.intermediate_size, c.hidden_size))
    chosen = f"--expert-bits {bits} -> " if bits is not None else ""
    return f"{chosen}{fmt.name}, {per_weight:.2f} bits/weight"


def _kv_note(plan: ModelPlan, dtype: str) -> str:
    """The KV cache row's note: its context (a sliding window's ring), and its width."""
    c, m = plan.config, plan.memory
    positions = kv_positions(c, plan.context, m.prefill_chunk)
    held = (f"context {plan.context}" if positions == plan.context else
            f"context {plan.context}: a ring of {positions} positions (window {c.sliding_window} + a prefill chunk)")
    if m.kv_bits == 8:
        return f"{held}, 8-bit: int8 keys and values, a {dtype} scale per layer, KV head and position"
    return f"{held}, {dtype}"


def _chunk_note(plan: ModelPlan, batch_size: Optional[int]) -> str:
    """The prefill chunk row's note: given, the default, or fitted down to the card."""
    if batch_size is not None:
        return f"-b/--batch-size {batch_size}"
    if plan.memory.prefill_chunk != PREFILL_CHUNK_TOKENS:
        return (f"fitted: the reserve at the default {PREFILL_CHUNK_TOKENS} leaves no room for top-"
                f"{plan.config.num_experts_per_tok} experts per layer; -b/--batch-size to choose")
    return "the default; -b/--batch-size to choose"


def _table(plan: ModelPlan, expert_bits: Optional[int], batch_size: Optional[int] = None) -> Table:
    c, m = plan.config, plan.memory
    L, E, K = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok
    Lm = c.num_moe_layers  # the layers with experts (all but Qwen's mlp_only_layers)
    dtype = get_format(str(plan.dtype).removeprefix("torch.")).name  # "bf16"
    gpu = "GPU" if plan.device_type == "cuda" else "device (RAM)"
    params = plan.parameters
    table = Table(
        title=f"{plan.name} ({c.family}, {_billions(params.total)} parameters, {_billions(params.active)} active: "
        f"top-{K} of {E} experts a layer): {dtype} compute, {plan.expert_format.name} experts, "
        f"{plan.attn_format.name} attention, context {plan.context}",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("")
    table.add_column("size", justify="right")
    table.add_column("")
    by = plan.dense_by_class
    host_embeddings = plan.host_dense_bytes > 0  # a card: the input table stays in RAM (untied lm_head)
    where = ", in RAM: each token's row is gathered there and copied up" if host_embeddings else ""
    table.add_row("embeddings", _size(by["embeddings"]), f"{c.vocab_size} x {c.hidden_size}, {dtype}{where}")
    table.add_row("lm_head", _size(by["lm_head"]), "tied to the embeddings" if c.tie_word_embeddings else dtype)
    biases = "q, k, v, o" if c.qkv_bias and c.o_bias else "q, k, v" if c.qkv_bias else "o" if c.o_bias else ""
    biases = f" + {biases} biases" if biases else ""
    table.add_row("attention", _size(by["attention"]), f"q, k, v, o x {L} layers, {plan.attn_format.name}{biases}")
    qk_norms = {"head": ", with q/k norms per head", "projection": ", with q/k norms per projection"}
    table.add_row("norms", _size(by["norms"]), f"{dtype}{qk_norms.get(c.qk_norm, '')}")
    table.add_row("routers", _size(by["routers"]), f"{E} x {c.hidden_size} x {Lm} layers, {dtype}")
    if by["shared_experts"]:  # Qwen2-MoE: a dense FFN beside the routed experts, run by every token
        Is = c.shared_expert_intermediate_size
        table.add_row("shared experts", _size(by["shared_experts"]),
                      f"3 x {Is} x {c.hidden_size} + gate x {Lm} layers, {dtype}")
    if by["dense_mlps"]:  # Qwen's mlp_only_layers: an FFN instead of experts
        table.add_row("dense MLPs", _size(by["dense_mlps"]),
                      f"3 x {c.dense_intermediate_size} x {c.hidden_size} x {L - Lm} layers, {dtype}")
    table.add_row("dense total", _size(plan.dense_bytes),
                  f"on the {gpu} but the embeddings" if host_embeddings else f"always on the {gpu}")
    table.add_section()
    table.add_row("one expert", _size(plan.expert_bytes),
                  f"3 x {c.intermediate_size} x {c.hidden_size}, {_format_note(plan.expert_format, expert_bits, plan)}")
    table.add_row("all experts", _size(plan.experts_total_bytes), f"{Lm} layers x {E} experts = {m.experts_total}")
    table.add_row("KV cache", _size(m.kv_cache_bytes), _kv_note(plan, dtype))
    table.add_row("prefill chunk", f"{m.prefill_chunk} tokens", _chunk_note(plan, batch_size))
    reserve = m.reserve
    if reserve.terms:
        terms = ", ".join(f"{t.name} {_size(t.nbytes)}" for t in reserve.terms if t.nbytes >= 2**20)
        kernel = "fused attention" if reserve.sdpa == "fused" else "attention on SDPA's math path"
        table.add_row("runtime reserve", _size(reserve.total),
                      f"{terms} (prefill chunks of {reserve.prefill_tokens}, {kernel})")
    table.add_section()
    with_reserve = " + runtime reserve" if reserve.terms else ""
    table.add_row("minimum VRAM", _size(plan.min_vram), f"dense + KV cache + top-{K} experts per layer{with_reserve}")
    table.add_row(
        f"all experts on the {gpu}", _size(plan.all_resident_vram), f"dense + KV cache + every expert{with_reserve}"
    )
    table.add_section()
    if plan.vram is not None:
        card = f"--vram {_size(plan.vram)}"
    elif plan.experts_per_layer is not None:
        card = f"--experts-per-layer {plan.experts_per_layer}"
    else:
        card = "at the minimum VRAM"
    table.add_row(f"{gpu}: dense", _size(m.dense_bytes), card)
    table.add_row(f"{gpu}: KV cache", _size(m.kv_cache_bytes), "")
    if m.max_slots_per_layer == m.slots_per_layer:
        spread = ""
    else:
        rule = ("the layers whose LRU hit rate gains most on Mixtral-8x7B's traces" if m.spread == "trace"
                else "layers spread evenly")
        spread = f" ({m.device_slots / Lm:.2f} on average; the spare slots to {rule})"
    table.add_row(
        f"{gpu}: expert slots", _size(m.device_expert_bytes),
        f"{m.slots_text(' of ')} per layer, {plan.device_experts} in all{spread}",
    )
    if reserve.terms:
        table.add_row(f"{gpu}: runtime reserve", _size(reserve.total), "")
    spare = f", {_size(plan.vram - m.device_bytes)} spare" if plan.vram is not None else ""
    table.add_row(f"{gpu}: total", _size(m.device_bytes), f"of {_size(plan.vram or m.device_bytes)}{spare}")
    ram = f"of the --ram budget {_size(plan.ram)}" if plan.ram is not None else "no --ram: all of them"
    if m.slots_per_layer == E:
        ram = f"not needed: every expert has a {gpu} slot"
    elif m.host_pinned:
        blocks = len(m.host_chunks)
        ram += (f", pinned in {blocks} block{'s' if blocks > 1 else ''} "
                f"({_size(m.host_raw_bytes)} of records)")
    table.add_row("RAM: experts", _size(m.host_bytes), f"{m.host_experts} of {m.experts_total}, {ram}")
    if host_embeddings:
        table.add_row("RAM: embeddings", _size(plan.host_dense_bytes), "beside the --ram budget")
    disk = (
        f"{plan.disk_experts} experts ({_size(plan.disk_experts * plan.expert_bytes)}) read on a miss"
        if plan.disk_experts else "not needed"
    )
    table.add_row("disk tier", "", disk)
    return table


def summary(plan: ModelPlan) -> str:
    """One plain-language line: what the card and RAM hold, and whether disk reads happen."""
    c, m = plan.config, plan.memory
    E, K = c.num_local_experts, c.num_experts_per_tok
    fmt = f"{plan.expert_format.name} experts"
    gpu = "GPU" if plan.device_type == "cuda" else "device"
    if plan.vram is None and plan.experts_per_layer is None:
        return (
            f"{plan.name} with {fmt} needs a card of at least {_size(plan.min_vram)} "
            f"({K} of {E} experts per layer on the GPU); every expert on the GPU needs {_size(plan.all_resident_vram)}."
        )
    ram = f" with {article(_size(plan.ram)).lower()} {_size(plan.ram)} expert RAM budget" if plan.ram is not None else ""
    if plan.vram is not None:
        head = f"{article(_size(plan.vram))} {_size(plan.vram)} card{ram} holds {plan.name} ({fmt})"
    elif plan.device_type == "cpu":
        head = f"On a CPU{ram}, {plan.name} ({fmt}) takes {_size(m.device_bytes)} for dense weights, KV cache and slots"
    else:
        head = f"A card of {_size(m.device_bytes)}{ram} holds {plan.name} ({fmt})"
    if m.slots_per_layer == E:
        return f"{head}: all {E} experts per layer on the {gpu}; no RAM tier, no disk reads."
    slots = m.slots_phrase(f"on the {gpu}", " of ")
    pinned = " pinned" if m.host_pinned else ""
    if not plan.disk_experts:
        return f"{head}: {slots}, all {m.experts_total} in RAM ({_size(m.host_bytes)}{pinned}); no disk reads."
    return (
        f"{head}: {slots}, {m.host_experts} of {m.experts_total} in RAM; "
        f"{plan.disk_experts} are read from disk when needed."
    )
