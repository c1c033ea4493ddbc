"""`offload chat`: a conversation with a model, in a terminal or through a pipe.

Interactive when stdin and stdout are both terminals: a ``>>> `` prompt, streamed replies (a
spinner on stderr until the first token), the history kept as ``Message`` turns and rendered
with the tokenizer's chat format each turn, slash commands (``/help``), ``\"\"\"`` for
multi-line input, Ctrl+C to stop a reply (the session stays), Ctrl+D to leave. After each
reply one dim line on stderr: prompt t/s, generation t/s, expert hit rate, MiB moved per
token, peak memory.

Otherwise stdin is read whole as one user message and only the reply goes to stdout.

The engine runs with a machine profile (``--profile``; without one, the best shipped profile for
the device fitted to the model, named on one dim stderr line and in the interactive header).

No engine logic here: the engine generates, this file reads lines and prints.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import psutil
import typer

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
    checked_text,
    load_with_profile,
    print_error,
    read_stdin_text,
    stderr,
    user_errors,
)
from offload.demo import DEMO_MODEL_DIR
from offload.device import peak_memory_bytes
from offload.engine import Engine, GenerationSettings
from offload.errors import OffloadError
from offload.files import check_file
from offload.sampling import SamplingSettings
from offload.tokenizer import Message

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'

HELP = """\
/help                  this list
/clear                 forget the conversation (the system message stays)
/system TEXT           set the system message (no TEXT: show it)
/set temp VALUE        sampling temperature (0 is greedy)
/set top_p VALUE       nucleus sampling mass, in (0, 1]
/set max_tokens VALUE  tokens per reply at most
/stats                 expert cache hit rates per layer, this session so far
/bye                   leave (Ctrl+D too)
\"\"\"                    start multi-line input; end it with another \"\"\"
Ctrl+C stops a reply and keeps the conversation."""


def reply_trace_path(trace: Path, n: int) -> Path:
    """Where reply ``n``'s router trace goes: STEM-n.SUFFIX beside ``trace`` (.jsonl without one)."""
    return trace.with_name(f"{trace.stem}-{n}{trace.suffix or '.jsonl'}")


class ChatSession:
    """The conversation state and one turn's streaming; no terminal reading here."""

    def __init__(
        self, engine: Engine, sampling: SamplingSettings, max_tokens: int, system: Optional[str],
        trace: Optional[Path] = None, trace_force: bool = False,
    ):
        self.engine = engine
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.system = system
        self.trace = trace  # each reply's router trace goes to STEM-N.SUFFIX beside it (N from 1)
        self.trace_force = trace_force  # replace an existing STEM-N.SUFFIX (a regular file only)
        self.history: list[Message] = []  # user and assistant turns, no system message
        self.turns = 0  # replies so far: the seed of turn n is seed + n (repeatable, not repeated)

    def messages(self, user: str) -> list[Message]:
        system = [Message("system", self.system)] if self.system else []
        return system + self.history + [Message("user", user)]

    def settings(self) -> GenerationSettings:
        sampling = self.sampling
        if sampling.seed is not None:
            # torch takes a seed modulo 2**64: wrap, so a seed near the top stays in range every turn
            sampling = replace(sampling, seed=(sampling.seed + self.turns) % 2**64)
        return GenerationSettings(max_new_tokens=self.max_tokens, sampling=sampling, trace=self.trace_path(),
                                  trace_force=self.trace_force)

    def trace_path(self) -> Optional[Path]:
        """Where the next reply's trace goes: one file per reply, since each reply is one token
        sequence (the conversation so far, then the reply)."""
        return reply_trace_path(self.trace, self.turns + 1) if self.trace is not None else None

    def reply(self, user: str, write: Callable[[str], None], stop_requested: Callable[[], bool] = lambda: False,
              spinner: bool = False):
        """Generate the reply to ``user``, writing text as it comes; returns the Generation.

        ``stop_requested`` is asked after each token: a stopped reply keeps what it has said.
        The turn joins the history when generation started (an error before leaves none)."""
        ids = self.engine.tokenizer.encode_messages(self.messages(user))
        generation = self.engine.generate(ids, self.settings())  # checks the prompt's length
        status = stderr.status("", spinner="dots") if spinner and stderr.is_terminal else None
        events = iter(generation)
        if status is not None:
            status.start()
        try:
            for event in events:
                if status is not None:
                    status.stop()
                    status = None
                if event.text:
                    write(event.text)
                if stop_requested():
                    generation.stats.stop_reason = "interrupted"
                    break
        finally:
            if status is not None:
                status.stop()
            events.close()  # ends the decode loop: its statistics are final
            if generation.tokens or generation.stats.stop_reason:
                self.history += [Message("user", user), Message("assistant", generation.text)]
                self.turns += 1
        return generation

    def set(self, name: str, value: str) -> str:
        """``/set NAME VALUE``; raises OffloadError (or ValueError) on a bad one."""
        name = name.replace("-", "_")
        if name in ("temp", "temperature"):
            self.sampling = replace(self.sampling, temperature=float(value))
            return f"temp = {self.sampling.temperature:g}"
        if name == "top_p":
            self.sampling = replace(self.sampling, top_p=float(value))
            return f"top_p = {self.sampling.top_p:g}"
        if name in ("max_tokens", "n"):
            n = int(value)
            GenerationSettings(max_new_tokens=n)
            self.max_tokens = n
            return f"max_tokens = {n}"
        raise ValueError(f"unknown setting {name!r} (temp, top_p or max_tokens)")


def peak_memory(engine: Engine) -> str:
    """Peak device memory on CUDA, else the process's resident set."""
    peak = peak_memory_bytes(engine.device)
    if peak is not None:
        return f"peak {peak / 2**20:.0f} MiB"
    return f"RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB"


def stats_line(engine: Engine, generation) -> str:
    s = generation.stats
    parts = [
        f"prompt {s.prompt_tokens} tok {s.prompt_tokens_per_s:.1f} t/s",
        f"generation {s.generated_tokens} tok {s.generation_tokens_per_s:.1f} t/s",
    ]
    cache = generation.cache_stats
    if cache is None:
        parts.append("experts resident")
    else:
        total = cache.total()
        moved = total.bytes_moved / max(1, s.generated_tokens) / 2**20
        parts += [f"hit rate {total.hit_rate:.3f}", f"{moved:.2f} MiB/tok"]
    parts.append(peak_memory(engine))
    if s.stop_reason in ("interrupted", "length", "context"):
        parts.append(f"stop: {s.stop_reason}")
    return " | ".join(parts)


def cache_report(engine: Engine) -> str:
    if engine.cache is None:
        return "all experts resident (no expert cache: give --vram, --ram or --experts-per-layer)"
    stats = engine.cache.stats
    total = stats.total()
    if not total.requests:
        return "no expert requests yet"
    rows = [f"layer {i:>2}: hit rate {s.hit_rate:.3f}  ({s.hits}/{s.requests})" for i, s in enumerate(stats.layers)]
    moved = total.bytes_moved / 2**20
    rows.append(f"all     : hit rate {total.hit_rate:.3f}  ({total.hits}/{total.requests}), {moved:.1f} MiB moved")
    return "\n".join(rows)


class _Interrupts:
    """While active, Ctrl+C sets a flag (checked between tokens) instead of raising, so that a
    reply stops cleanly and the engine is never interrupted half-way through a step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


def read_message(read: Callable[[str], str]) -> str:
    """One user message: a line, or the lines between two \"\"\" fences. EOFError at the end."""
    line = read(PROMPT)
    if not line.lstrip().startswith(FENCE):
        return line
    first = line.lstrip()[len(FENCE):]
    if first.rstrip().endswith(FENCE):  # """one line"""
        return first.rstrip()[: -len(FENCE)]
    lines = [first] if first else []
    while True:
        line = read(CONTINUATION)
        if line.rstrip().endswith(FENCE):
            lines.append(line.rstrip()[: -len(FENCE)])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def interactive(session: ChatSession, read: Callable[[str], str] = input, profile: Optional[str] = None) -> None:
    """The terminal loop; the header names the model and, when given, the profile's label."""
    engine = session.engine
    name = Path(engine.model_name).name or engine.model_name
    with_profile = f", profile {profile}" if profile else ""
    stderr.print(f"chat with {name}{with_profile}; /help for commands, /bye to leave", style="dim", markup=False)
    while True:
        try:
            text = read_message(read)
        except EOFError:
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            stderr.print("Use Ctrl+D or /bye to leave.", style="dim")
            continue
        try:
            text = checked_text(text, "chat input")  # undecodable bytes: one line, the session goes on
            if text.strip().startswith("/"):
                if command(session, text.strip()):
                    return
                continue
            if not text.strip():
                continue
            with _Interrupts() as interrupts:
                def write(chunk: str) -> None:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()

                try:
                    generation = session.reply(text, write, lambda: interrupts.requested, spinner=True)
                finally:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
            stderr.print(stats_line(engine, generation), style="dim")
        except KeyboardInterrupt:  # a Ctrl+C that came before the reply's handler was set
            sys.stdout.write("\n")
            stderr.print("(interrupted)", style="dim")
        except OffloadError as exc:
            print_error(exc)


def command(session: ChatSession, line: str) -> bool:
    """Run one slash command; True to leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/bye", "/exit", "/quit"):
        stderr.print("bye", style="dim")
        return True
    if name in ("/help", "/?"):
        stderr.print(HELP, markup=False)
    elif name == "/clear":
        session.history.clear()
        stderr.print("conversation cleared", style="dim")
    elif name == "/system":
        if arg:
            session.system = arg
            stderr.print("system message set", style="dim")
        else:
            stderr.print(f"system: {session.system!r}" if session.system else "no system message", style="dim",
                         markup=False)
    elif name == "/set":
        parts = arg.split()
        if len(parts) != 2:
            stderr.print("usage: /set temp|top_p|max_tokens VALUE", style="dim")
        else:
            try:
                stderr.print(session.set(*parts), style="dim")
            except (OffloadError, ValueError) as exc:
                print_error(f"/set {arg}: {exc}")
    elif name == "/stats":
        stderr.print(cache_report(session.engine), markup=False)
    else:
        stderr.print(f"unknown command {name}; /help lists them", style="dim", markup=False)
    return False


def chat_command(
    model: Optional[Path] = typer.Argument(
        None, help="A Hugging Face Mixtral checkpoint directory (safetensors). Default: the bundled demo model."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    temperature: float = typer.Option(0.7, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 is off."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=0, help="Tokens per reply at most."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Random seed, for a repeatable conversation (reply n uses seed + n)."
    ),
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
        None, "--trace", help="Write each reply's router trace (experts, gates, predictions, cache outcomes) "
        "to STEM-N.jsonl beside this path, N = 1, 2, ...",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace the --trace files STEM-N.jsonl that exist (regular files only)."
    ),
) -> None:
    """Chat with a model: interactive in a terminal; with a pipe, stdin is one message and the reply goes to stdout."""
    with user_errors():
        system = checked_text(system, "--system") if system is not None else None
        sampling = SamplingSettings(temperature=temperature, top_p=top_p, seed=seed)
        GenerationSettings(max_new_tokens=max_tokens)
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        message = None
        if not tty:
            message = read_stdin_text("the message on stdin").strip()
            if not message:
                raise OffloadError("no message: pipe the message on stdin, or run in a terminal to chat")
        if trace is not None:  # reply 1's trace is refused now, not after loading (later ones: at their turn)
            check_file(reply_trace_path(trace, 1), force, "trace")
        model = model or DEMO_MODEL_DIR
        engine, chosen = load_with_profile(
            profile, model, device=device, dtype=dtype, context_length=context, vram=vram, ram=ram,
            experts_per_layer=experts_per_layer, policy=policy, prefetch_depth=prefetch_depth, cpu_experts=cpu_experts,
            expert_format=expert_format, expert_bits=expert_bits, attn_bits=attn_bits,
        )
        session = ChatSession(engine, sampling, max_tokens, system, trace, force)
        if message is not None:
            def write(chunk: str) -> None:
                sys.stdout.write(chunk)
                sys.stdout.flush()

            session.reply(message, write)
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        if hasattr(sys.stdin, "reconfigure"):  # undecodable input reaches checked_text, not a traceback
            sys.stdin.reconfigure(errors="surrogateescape")
        interactive(session, profile=chosen.label)
