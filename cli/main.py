"""The ``offload`` command line: argument parsing and rich output only, no engine logic.

Every ``OffloadError`` (a user's mistake: bad path, damaged checkpoint, bad setting) becomes
one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import (
    ATTN_BITS_OPTION,
    CONTEXT_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    EXPERT_BITS_OPTION,
    EXPERT_FORMAT_OPTION,
    EXPERTS_PER_LAYER_OPTION,
    POLICY_OPTION,
    CPU_EXPERTS_OPTION,
    PREFETCH_DEPTH_OPTION,
    PROFILE_OPTION,
    RAM_OPTION,
    VRAM_OPTION,
    OffloadApp,
    checked_text,
    load_with_profile,
    read_stdin_text,
    stderr,
    user_errors,
)
from cli.bench import bench_command
from cli.chat import chat_command
from cli.convert import convert_command
from cli.profile import profile_command
from cli.info import info_command
from cli.simulate import simulate_command, stats_command
from cli.synth import synth_command
from cli.trace import trace_app
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings
from offload.errors import OffloadError
from offload.files import check_file
from offload.sampling import SamplingSettings
from offload.tokenizer import Message

app = OffloadApp(  # typer.Typer, with standard output's failures in one line (cli.common)
    name="offload",
    help="Run Mixture-of-Experts models (Mixtral) on a GPU smaller than the model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Run Mixture-of-Experts models (Mixtral) on a GPU smaller than the model."""


app.command("convert")(convert_command)
app.command("synth")(synth_command)
app.command("info")(info_command)
app.command("simulate")(simulate_command)
app.command("stats")(stats_command)
app.command("bench")(bench_command)
app.command("chat")(chat_command)
app.command("profile")(profile_command)
app.add_typer(trace_app, name="trace")


@app.command()
def generate(
    model: Optional[Path] = typer.Argument(
        None, help="A Hugging Face Mixtral checkpoint directory (safetensors). Default: the bundled demo model."
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Text to complete. Read from stdin when omitted and stdin is not a terminal."
    ),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=0, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens; 0 is off."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 is off."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for tokens already seen; 1 is off."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed, for repeatable sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    chat: bool = typer.Option(
        False, "--chat", help="Wrap the prompt in the model's chat template (Mixtral's instruct format without one)."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    dtype: Optional[str] = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    context: Optional[int] = CONTEXT_OPTION,
    vram: Optional[str] = VRAM_OPTION,
    ram: Optional[str] = RAM_OPTION,
    experts_per_layer: Optional[int] = EXPERTS_PER_LAYER_OPTION,
    policy: str = POLICY_OPTION,
    prefetch_depth: Optional[int] = PREFETCH_DEPTH_OPTION,
    cpu_experts: Optional[str] = CPU_EXPERTS_OPTION,
    expert_format: Optional[str] = EXPERT_FORMAT_OPTION,
    expert_bits: Optional[int] = EXPERT_BITS_OPTION,
    attn_bits: Optional[int] = ATTN_BITS_OPTION,
    profile: Optional[str] = PROFILE_OPTION,
    trace: Optional[Path] = typer.Option(
        None, "--trace", help="Write a router trace (experts, gates, predictions, cache outcomes) to this file."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace the --trace file if it exists (a regular file only; never a link or device)."
    ),
    replay: Optional[Path] = typer.Option(
        None, "--replay", help="Take each layer's experts and gate weights from this router trace (offload-trace "
        "format, e.g. from --trace or `offload trace convert`) instead of the routers, position by position.",
    ),
    show_stats: bool = typer.Option(False, "--stats", help="Print per-layer expert cache statistics on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with ids, text and statistics."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
) -> None:
    """Complete a prompt: BOS + the prompt's tokens (no chat template unless --chat)."""
    with user_errors():
        if prompt is None:
            if sys.stdin.isatty():
                raise OffloadError("no prompt: give -p TEXT or pipe text on stdin")
            prompt = read_stdin_text("the prompt on stdin")
        prompt = checked_text(prompt, "-p/--prompt")
        system = checked_text(system, "--system") if system is not None else None
        stop = [checked_text(s, "--stop") for s in stop]
        sampling = SamplingSettings(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repeat_penalty, seed=seed
        )
        settings = GenerationSettings(
            max_new_tokens=max_tokens, stop=tuple(stop), sampling=sampling, ignore_eos=ignore_eos, trace=trace,
            trace_force=force,
        )
        if trace is not None:
            check_file(trace, force, "trace")  # refused now, not after loading and generating
        model = model or DEMO_MODEL_DIR
        engine, chosen = load_with_profile(
            profile, model, device=device, dtype=dtype, context_length=context, vram=vram, ram=ram,
            experts_per_layer=experts_per_layer, policy=policy, prefetch_depth=prefetch_depth, cpu_experts=cpu_experts,
            expert_format=expert_format, expert_bits=expert_bits, attn_bits=attn_bits, replay=replay,
        )
        tokenizer = engine.tokenizer
        if chat:
            messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
            prompt_ids = tokenizer.encode_messages(messages)
        else:
            prompt_ids = tokenizer.encode(prompt, bos=True)
        generation = engine.generate(prompt_ids, settings)

        if as_json:
            generation.run()
            print(json.dumps({
                "model": str(model),
                "profile": chosen.label,
                "prompt_tokens": prompt_ids,
                "tokens": generation.tokens,
                "text": generation.text,
                "stop_reason": generation.stats.stop_reason,
                "stats": generation.stats.to_dict(),
                "plan": engine.plan.to_dict() if engine.plan else None,
                "cache": generation.cache_stats.to_dict() if generation.cache_stats else None,
            }))
            return
        try:
            for event in generation:
                if event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            generation.stats.stop_reason = "interrupted"
        sys.stdout.write("\n")
        sys.stdout.flush()
        s = generation.stats
        stderr.print(
            f"prompt {s.prompt_tokens} tok, {s.prompt_tokens_per_s:.1f} t/s | "
            f"generation {s.generated_tokens} tok, {s.generation_tokens_per_s:.1f} t/s | "
            f"stop: {s.stop_reason}",
            style="dim",
        )
        if engine.plan is not None:
            stderr.print(f"experts: {engine.plan.describe()}", style="dim")
        if show_stats:
            print_cache_stats(engine, generation)


def print_cache_stats(engine: Engine, generation) -> None:
    """Per-layer hit rates, loads per tier, bytes and stall, as a rich table on stderr."""
    stats = generation.cache_stats
    if stats is None:
        stderr.print("expert cache: off (every expert resident; give --vram, --ram or --experts-per-layer)")
        return
    table = Table(title="expert cache", title_justify="left", show_edge=False, pad_edge=False)
    # (short headers: eleven columns fit an 80-column terminal unwrapped)
    for name in ("layer", "uses", "hit rate", "prefetched", "RAM", "disk", "MiB", "stall ms", "CPU", "CPU ms"):
        table.add_column(name, justify="right", no_wrap=True)
    table.caption = ("RAM, disk: loads into slots from each; MiB: bytes moved; CPU: misses run on the CPU on "
                     "their RAM copy")
    table.caption_justify = "left"
    rows = [(str(i), s) for i, s in enumerate(stats.layers)] + [("all", stats.total())]
    for name, s in rows:
        table.add_row(
            name, str(s.requests), f"{s.hit_rate:.3f}", f"{s.prefetch_used}/{s.prefetches}",
            str(s.host_loads), str(s.disk_loads),
            f"{s.bytes_moved / 2**20:.1f}", f"{s.stall_seconds * 1e3:.1f}", str(s.cpu_runs),
            f"{s.cpu_seconds * 1e3:.1f}",
        )
    stderr.print(table)
    tokens = max(1, generation.stats.generated_tokens)
    total = stats.total()
    stderr.print(
        f"{total.bytes_moved / tokens / 2**20:.2f} MiB moved per generated token "
        f"(prefill included)",
        style="dim",
    )


if __name__ == "__main__":
    app()
