"""`offload synth PRESET OUT_DIR`: write a synthetic pack with a built-in model's true shapes.

Argument parsing and rich output only; the pack is made by ``offload.synth.synthesize``. It
takes only the built-in presets (``offload.plan.BUILTIN_MODELS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import user_errors, write_pack
from offload.pack import TARGETS
from offload.plan import BUILTIN_MODELS
from offload.quant import BITS_CHOICES, FORMATS
from offload.synth import synthesize

BITS = "|".join(map(str, BITS_CHOICES))
FOR_OPTION_HELP = (
    "The device the pack is for, which picks the 4-bit layout: auto (CUDA when this machine has it, "
    "else this CPU), cpu or cuda (no GPU needed to write it). 4-bit is "
    "the portable nf4 for both; a CUDA pack refuses the CPU-only -cpu layouts."
)


def synth_command(
    preset: str = typer.Argument(..., metavar="PRESET", help=f"A built-in model: {', '.join(BUILTIN_MODELS)}."),
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="The pack directory to write."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Only the first N layers (default: all)."),
    expert_format: Optional[str] = typer.Option(
        None, "--expert-format", help=f"Expert format: {'|'.join(FORMATS)} (default: bf16, unquantized)."
    ),
    expert_bits: Optional[int] = typer.Option(
        None, "--expert-bits", help=f"Experts in {BITS} bits (4 nf4-dq, 8 int8, 16 bf16), instead of --expert-format."
    ),
    attn_bits: Optional[int] = typer.Option(
        None, "--attn-bits", help=f"Attention projections in {BITS} bits, stored quantized (default 16)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes the same bytes."),
    target: str = typer.Option("auto", "--for", help=f"{'|'.join(TARGETS)}. {FOR_OPTION_HELP}"),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT_DIR if it is a pack (or empty): only the pack's own files; other files stay."
    ),
) -> None:
    """Write a pack with a built-in model's true shapes and seeded random weights, at disk speed:
    for sizes, memory and speed without downloading the model (its text is noise)."""
    with user_errors():
        written = write_pack(out, "writing", f"synthetic {preset}", lambda progress: synthesize(
            preset, out, layers=layers, expert_format=expert_format, expert_bits=expert_bits,
            attn_bits=attn_bits, target=target, seed=seed, force=force, progress=progress,
        ))
        synthetic = written.synthetic
        total_layers = BUILTIN_MODELS[synthetic["preset"]][1]["num_hidden_layers"]
        print(
            f"wrote {out}: synthetic {synthetic['preset']}, {synthetic['layers']} of {total_layers} layers, "
            f"{written.summary}, {written.seconds:.1f} s ({written.total_bytes / written.seconds / 1e9:.2f} GB/s)"
        )
