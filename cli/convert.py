"""`offload convert HF_DIR OUT_DIR`: write the offload pack of a Hugging Face checkpoint.

Argument parsing and rich output only; the conversion itself is ``offload.pack.convert``
(experts and attention quantized on request, for the device ``--for`` names). HF_DIR is a
directory or a hub id (org/name), taken from the local Hugging Face cache or downloaded first as
``generate`` does (``cli.common.local_model``: config.json fetched and checked before any weight,
then one line saying how much).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import local_model, user_errors, write_pack
from cli.synth import BITS, FOR_OPTION_HELP
from offload.engine import DTYPES, parse_dtype
from offload.pack import TARGETS, convert
from offload.quant import FORMATS


def convert_command(
    src: str = typer.Argument(
        ..., metavar="HF_DIR",
        help="A Hugging Face MoE checkpoint directory (safetensors; Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE), or a hub id (org/name): from the "
        "local Hugging Face cache, else downloaded.",
    ),
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="The pack directory to write."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help=f"Weight dtype of the pack: {'|'.join(DTYPES)} (default: the checkpoint's own)."
    ),
    expert_format: Optional[str] = typer.Option(
        None,
        "--expert-format",
        help=f"Store experts quantized: {'|'.join(FORMATS)} (default: the pack's dtype, unquantized).",
    ),
    expert_bits: Optional[int] = typer.Option(
        None, "--expert-bits", help=f"Experts in {BITS} bits (4 nf4-dq, 8 int8, 16 unquantized), instead of --expert-format."
    ),
    attn_bits: Optional[int] = typer.Option(
        None, "--attn-bits", help=f"Attention projections in {BITS} bits, stored quantized (default 16)."
    ),
    target: str = typer.Option("auto", "--for", help=f"{'|'.join(TARGETS)}. {FOR_OPTION_HELP}"),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT_DIR if it is a pack (or empty): only the pack's own files; other files stay."
    ),
) -> None:
    """Convert a checkpoint into an offload pack: each expert one aligned record, read in one go."""
    with user_errors():
        pack_dtype = parse_dtype(dtype) if dtype is not None else None
        source = local_model(src)  # a directory as it is; a hub id from the cache, or downloaded
        label = Path(src).name if source == Path(src).expanduser() else src
        written = write_pack(out, "converting", label, lambda progress: convert(
            source, out, dtype=pack_dtype, expert_format=expert_format, expert_bits=expert_bits,
            attn_bits=attn_bits, target=target, force=force, progress=progress,
        ))
        print(f"wrote {out}: {written.summary}, {written.seconds:.1f} s")
