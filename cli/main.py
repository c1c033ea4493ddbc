"""The ``offload`` command line: argument parsing and rich output only, no engine logic.

Every ``OffloadError`` (a user's mistake: bad path, damaged checkpoint, bad setting) becomes
one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import (
    ATTN_BITS_OPTION,
    BATCH_SIZE_OPTION,
    CONTEXT_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    EXPERT_BITS_OPTION,
    EXPERT_FORMAT_OPTION,
    EXPERTS_PER_LAYER_OPTION,
    KV_BITS_OPTION,
    POLICY_OPTION,
    CPU_EXPERTS_OPTION,
    NO_ESCAPE_OPTION,
    PREFETCH_DEPTH_OPTION,
    PROFILE_OPTION,
    QUIET_OPTION,
    RAM_OPTION,
    THREADS_OPTION,
    VRAM_OPTION,
    OffloadApp,
    checked_text,
    load_with_profile,
    process_escapes,
    read_stdin_text,
    stderr,
    user_errors,
)
from cli.bench import bench_command
from cli.report import peak_memory, stats_line
from cli.chat import chat_command
from cli.convert import convert_command
from cli.profile import profile_command
from cli.serve import serve_command
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
    help="Run Mixture-of-Experts models (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) on a GPU smaller than the model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


PROMPT_FILE_LIMIT = 64 * 2**20  # bytes: far more text than any context holds


def version_text() -> str:
    """``offload X.Y.Z (torch A.B.C)``: the installed package's version (pyproject.toml's when
    running from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        own = version("offload")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M) \
            if pyproject.is_file() else None
        own = found.group(1) if found else "unknown"
    return f"offload {own} (torch {torch.__version__})"


def _print_version(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print offload's and torch's versions."
    ),
) -> None:
    """Run Mixture-of-Experts models (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) on a GPU smaller than the model."""


def read_prompt_file(path: Path) -> str:
    """The prompt in ``path`` (-f): UTF-8 text, newlines made \\n, one final newline dropped (as
    llama.cpp's -f); no escapes processed. An OffloadError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(PROMPT_FILE_LIMIT + 1)
    except FileNotFoundError:
        raise OffloadError(f"-f {path}: no such file") from None
    except IsADirectoryError:
        raise OffloadError(f"-f {path}: a directory, not a file") from None
    except OSError as exc:
        raise OffloadError(f"-f {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > PROMPT_FILE_LIMIT:
        raise OffloadError(f"-f {path}: more than {PROMPT_FILE_LIMIT // 2**20} MiB of prompt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OffloadError(f"-f {path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start}); "
                           "give the text in UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text[:-1] if text.endswith("\n") else text


app.command("convert")(convert_command)
app.command("synth")(synth_command)
app.command("info")(info_command)
app.command("simulate")(simulate_command)
app.command("stats")(stats_command)
app.command("bench")(bench_command)
app.command("chat")(chat_command)
app.command("profile")(profile_command)
app.command("serve")(serve_command)
app.add_typer(trace_app, name="trace")


@app.command()
def generate(
    model: Optional[Path] = typer.Argument(
        None, help="A Hugging Face MoE checkpoint directory (safetensors), pack or hub id; or -m/--model "
        "MODEL. Default: the bundled demo model."
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Text to complete. Read from stdin when omitted and stdin is not a terminal."
    ),
    prompt_file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Read the prompt from this UTF-8 file (instead of -p; no escapes processed)."
    ),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=0, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens; 0 is off."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 is off."),
    min_p: float = typer.Option(
        0.0, "--min-p", min=0.0, max=1.0,
        help="Keep tokens at least this share of the most likely one's probability (after top-k, top-p); 0 is off.",
    ),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for tokens already seen; 1 is off."),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed, for repeatable sampling."),
    stop: list[str] = typer.Option(
        [], "--stop", help="Stop when this text appears (repeatable; escapes such as \\n\\n processed)."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Wrap the prompt in the model's chat template (Mixtral's instruct format without one)."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    no_escape: bool = NO_ESCAPE_OPTION,
    quiet: bool = QUIET_OPTION,  # -q and -t act through their callbacks (cli.common.invocation)
    threads: Optional[int] = THREADS_OPTION,
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
    kv_bits: Optional[int] = KV_BITS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
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
    show_stats: bool = typer.Option(False, "--stats", "--verbose", "-v",
                                    help="Print per-layer expert cache statistics on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with ids, text and statistics."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence."),
) -> None:
    """Complete a prompt: BOS + the prompt's tokens (no chat template unless --chat)."""
    with user_errors():
        def typed(text: str, where: str) -> str:  # text from the command line: UTF-8, escapes (-e)
            text = checked_text(text, where)
            return text if no_escape else process_escapes(text, where)

        if prompt is not None and prompt_file is not None:
            raise OffloadError("give the prompt once: -p TEXT or -f FILE, not both")
        if prompt_file is not None:
            prompt = read_prompt_file(prompt_file)
        elif prompt is not None:
            prompt = typed(prompt, "-p/--prompt")
        else:
            if sys.stdin.isatty():
                raise OffloadError("no prompt: give -p TEXT, -f FILE or pipe text on stdin")
            prompt = read_stdin_text("the prompt on stdin")
        system = typed(system, "--system") if system is not None else None
        stop = [typed(s, "--stop") for s in stop]
        sampling = SamplingSettings(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repeat_penalty,
            seed=seed,
        )
        settings = GenerationSettings(
            max_new_tokens=max_tokens, stop=tuple(stop), sampling=sampling, ignore_eos=ignore_eos, trace=trace,
            trace_force=force,
        )
        if trace is not None:
            check_file(trace, force, "trace")  # refused now, not after loading and generating
        model = model or DEMO_MODEL_DIR
        started = time.perf_counter()
        engine, chosen = load_with_profile(
            profile, model, device=device, dtype=dtype, context_length=context, vram=vram, ram=ram,
            experts_per_layer=experts_per_layer, policy=policy, prefetch_depth=prefetch_depth, cpu_experts=cpu_experts,
            expert_format=expert_format, expert_bits=expert_bits, attn_bits=attn_bits, replay=replay,
            kv_bits=kv_bits, batch_size=batch_size,
        )
        load_seconds = time.perf_counter() - started
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
        stderr.print(
            stats_line(generation.stats, generation.cache_stats, load_seconds=load_seconds,
                       context_length=engine.context_length, peak=peak_memory(engine.device)),
            style="dim", markup=False,
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
