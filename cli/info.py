"""`offload info MODEL`: the memory plan a user reads before downloading 90 GB.

Argument parsing and rich output only; the arithmetic is ``offload.plan.plan_model``. MODEL is a
checkpoint directory or pack (its config.json), or a built-in name (``offload.plan.BUILTIN_MODELS``),
so the plan for Mixtral-8x7B needs no download. Nothing is loaded: only shapes are read.
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
from offload.errors import ConfigError, SettingError
from offload.pack import Pack, is_pack
from offload.plan import (
    BUILTIN_MODELS,
    ModelPlan,
    builtin_model,
    format_bytes,
    parse_bytes,
    plan_model,
)
from offload.quant import BITS_CHOICES, FORMATS, WeightFormat, get_format

BITS = "|".join(map(str, BITS_CHOICES))


def info_command(
    model: str = typer.Argument(
        ...,
        metavar="MODEL",
        help=f"A checkpoint directory or pack, or a built-in model: {', '.join(BUILTIN_MODELS)}.",
    ),
    vram: Optional[str] = typer.Option(
        None, "--vram", help="GPU memory budget (e.g. 12GiB). Default: show the minimum card."
    ),
    ram: Optional[str] = typer.Option(
        None, "--ram", help="RAM budget for experts (e.g. 32GiB). Default: RAM holds every expert."
    ),
    context: Optional[int] = typer.Option(
        None, "--context", help=f"Context length of the KV cache (default: min(model maximum, {DEFAULT_CONTEXT}))."
    ),
    expert_bits: Optional[int] = typer.Option(
        None, "--expert-bits", help=f"Expert weights in {BITS} bits: 4 nf4, 8 int8, 16 the compute dtype (default)."
    ),
    attn_bits: Optional[int] = typer.Option(
        None, "--attn-bits", help=f"Attention projections (q, k, v, o) in {BITS} bits, mapped like --expert-bits (default 16)."
    ),
    expert_format: Optional[str] = typer.Option(
        None, "--expert-format", help=f"Expert format by name instead of --expert-bits: {'|'.join(FORMATS)}."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help=f"Compute dtype: {'|'.join(DTYPES)} (default {DEFAULT_DTYPE}; a pack: its own)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, sizes in bytes."),
    profile: Optional[str] = typer.Option(
        None, "--profile", help="Plan with a machine profile's budgets, bits and context: a shipped name or a "
        "TOML path; flags given explicitly win. No default: info plans what the flags say.",
    ),
) -> None:
    """Show how a model splits between GPU, RAM and disk: sizes by class, one expert, KV cache,
    and how many experts fit on the card and in RAM."""
    with user_errors():
        if profile:  # the profile's plan, where no flag says otherwise
            from offload.profile import load_profile

            p = load_profile(profile)
            vram = vram or p.plan_vram
            ram = ram or p.plan_ram
            context = context or p.context
            if expert_format is None:
                expert_bits = expert_bits or p.expert_bits
            attn_bits = attn_bits or p.attn_bits
        attn_bits = attn_bits or 16
        if expert_format is not None and expert_bits is not None:
            raise SettingError("give --expert-format or --expert-bits, not both")
        name, config, pack_format, pack_dtype = _resolve_model(model)
        torch_dtype = parse_dtype(dtype) if dtype is not None else pack_dtype or parse_dtype(DEFAULT_DTYPE)
        if expert_format is not None:
            experts = get_format(expert_format)
        elif expert_bits is not None:
            experts = quant.format_for_bits(expert_bits, torch_dtype, "cuda", setting="--expert-bits")
        else:
            experts = pack_format or quant.format_for_bits(16, torch_dtype, "cuda")
        attention = quant.format_for_bits(attn_bits, torch_dtype, "cuda", setting="--attn-bits")
        if pack_format is not None and experts != pack_format:
            stderr.print(
                f"note: {model} holds {pack_format.name} experts; running this plan needs a convert "
                f"with --expert-format {experts.name}",
                style="dim",
            )
        plan = plan_model(
            name,
            config,
            torch_dtype,
            context if context is not None else min(config.max_position_embeddings, DEFAULT_CONTEXT),
            experts,
            attention,
            vram=None if vram is None else parse_bytes(vram, "--vram"),
            ram=None if ram is None else parse_bytes(ram, "--ram"),
        )
        if as_json:
            print(json.dumps(dict(plan.to_dict(), summary=summary(plan))))
            return
        out = Console(highlight=False, soft_wrap=True)
        out.print(_table(plan, expert_bits))
        out.print(summary(plan))


def _resolve_model(model: str) -> tuple[str, ModelConfig, Optional[WeightFormat], Optional[torch.dtype]]:
    """(display name, config, a pack's expert format, a plain pack's dtype) for MODEL. An existing
    path wins over a built-in name."""
    path = Path(model)
    if path.exists():
        config = ModelConfig.from_dir(path)
        if not is_pack(path):
            return path.name, config, None, None
        with Pack(path) as pack:
            layout = pack.layout
        return path.name, config, layout.fmt, layout.dtype if layout.plain else None
    if model.strip().lower() in BUILTIN_MODELS:
        name, config = builtin_model(model)
        return name, config, None, None
    raise ConfigError(
        f"{model}: not a model directory, and not a built-in model ({', '.join(BUILTIN_MODELS)})"
    )


def _size(n: int) -> str:
    """format_bytes without a needless '.00' ("12 GiB", "94.50 MiB")."""
    return format_bytes(n).replace(".00 ", " ")


def _format_note(fmt: WeightFormat, bits: Optional[int], plan: ModelPlan) -> str:
    c = plan.config
    per_weight = fmt.bits_per_weight((c.intermediate_size, c.hidden_size))
    chosen = f"--expert-bits {bits} -> " if bits is not None else ""
    return f"{chosen}{fmt.name}, {per_weight:.2f} bits/weight"


def _table(plan: ModelPlan, expert_bits: Optional[int]) -> Table:
    c, m = plan.config, plan.memory
    L, E, K = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok
    dtype = get_format(str(plan.dtype).removeprefix("torch.")).name  # "bf16"
    table = Table(
        title=f"{plan.name}: {dtype} compute, {plan.expert_format.name} experts, "
        f"{plan.attn_format.name} attention, context {plan.context}",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("")
    table.add_column("size", justify="right")
    table.add_column("")
    by = plan.dense_by_class
    table.add_row("embeddings", _size(by["embeddings"]), f"{c.vocab_size} x {c.hidden_size}, {dtype}")
    table.add_row("lm_head", _size(by["lm_head"]), "tied to the embeddings" if c.tie_word_embeddings else dtype)
    table.add_row("attention", _size(by["attention"]), f"q, k, v, o x {L} layers, {plan.attn_format.name}")
    table.add_row("norms", _size(by["norms"]), dtype)
    table.add_row("routers", _size(by["routers"]), f"{E} x {c.hidden_size} x {L} layers, {dtype}")
    table.add_row("dense total", _size(plan.dense_bytes), "always on the GPU")
    table.add_section()
    table.add_row("one expert", _size(plan.expert_bytes), _format_note(plan.expert_format, expert_bits, plan))
    table.add_row("all experts", _size(plan.experts_total_bytes), f"{L} layers x {E} experts = {m.experts_total}")
    table.add_row("KV cache", _size(m.kv_cache_bytes), f"context {plan.context}, {dtype}")
    table.add_section()
    table.add_row("minimum VRAM", _size(plan.min_vram), f"dense + KV cache + top-{K} experts per layer")
    table.add_row("all experts on the GPU", _size(plan.all_resident_vram), "dense + KV cache + every expert")
    table.add_section()
    card = f"--vram {_size(plan.vram)}" if plan.vram is not None else "at the minimum VRAM"
    table.add_row("GPU: dense", _size(m.dense_bytes), card)
    table.add_row("GPU: KV cache", _size(m.kv_cache_bytes), "")
    table.add_row(
        "GPU: expert slots", _size(m.device_expert_bytes),
        f"{m.slots_per_layer} of {E} per layer, {plan.device_experts} in all",
    )
    spare = f", {_size(plan.vram - m.device_bytes)} spare" if plan.vram is not None else ""
    table.add_row("GPU: total", _size(m.device_bytes), f"of {_size(plan.vram or m.device_bytes)}{spare}")
    ram = f"of --ram {_size(plan.ram)}" if plan.ram is not None else "no --ram: all of them"
    if m.slots_per_layer == E:
        ram = "not needed: every expert has a GPU slot"
    table.add_row("RAM: experts", _size(m.host_bytes), f"{m.host_experts} of {m.experts_total}, {ram}")
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
    if plan.vram is None:
        return (
            f"{plan.name} with {fmt} needs a card of at least {_size(plan.min_vram)} "
            f"({K} of {E} experts per layer on the GPU); every expert on the GPU needs {_size(plan.all_resident_vram)}."
        )
    ram = f" with {_size(plan.ram)} of RAM" if plan.ram is not None else ""
    head = f"A {_size(plan.vram)} card{ram} holds {plan.name} ({fmt})"
    if m.slots_per_layer == E:
        return f"{head}: all {E} experts per layer on the GPU; no RAM tier, no disk reads."
    gpu = f"{m.slots_per_layer} of {E} experts per layer on the GPU"
    if not plan.disk_experts:
        return f"{head}: {gpu}, all {m.experts_total} in RAM ({_size(m.host_bytes)}); no disk reads."
    return (
        f"{head}: {gpu}, {m.host_experts} of {m.experts_total} in RAM; "
        f"{plan.disk_experts} are read from disk when needed."
    )
