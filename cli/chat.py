"""`offload chat`: a conversation with a model, in a terminal or through a pipe.

Interactive when stdin and stdout are both terminals: a ``>>> `` prompt, streamed replies (a
spinner on stderr until the first token), the history kept as ``Message`` turns and rendered
with the tokenizer's chat format each turn, slash commands (``/help``; ``/set`` and ``/show``
for every sampling setting), ``\"\"\"`` for multi-line input, Ctrl+C to stop a reply or the
prompt processing (the session stays), Ctrl+D to leave. The engine keeps the conversation's KV
cache between turns, so each turn prefills only its new tokens; when the context fills, the
oldest turns are dropped (the system message stays), saying so in one dim line. After each
reply one dim line on stderr (``cli.report.stats_line``). Input lines are kept across sessions
in the user's data directory (``history_path``).

Otherwise stdin is read whole as one user message and only the reply goes to stdout.

The engine runs with a machine profile (``--profile``; without one, the best shipped profile for
the device fitted to the model, named on one dim stderr line and in the interactive header).

No engine logic here: the engine generates, this file reads lines and prints.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer

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
    NO_ESCAPE_OPTION,
    POLICY_OPTION,
    CPU_EXPERTS_OPTION,
    PREFETCH_DEPTH_OPTION,
    PROFILE_OPTION,
    QUIET_OPTION,
    RAM_OPTION,
    THREADS_OPTION,
    VRAM_OPTION,
    checked_text,
    process_escapes,
    load_with_profile,
    print_error,
    read_stdin_text,
    stderr,
    user_errors,
)
from cli.report import peak_memory, stats_line
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings
from offload.errors import OffloadError, SettingError
from offload.files import check_file
from offload.sampling import SamplingSettings
from offload.tokenizer import Message

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
HISTORY_LINES = 1000  # input lines kept in the history file, the newest

HELP = """\
/help                  this list
/clear                 forget the conversation (the system message stays)
/system TEXT           set the system message (no TEXT: show it)
/set NAME VALUE        a setting: temp, top_p, top_k, min_p, seed, repeat_penalty, max_tokens,
                       stop (\\n for a newline; none: no stop string), system (none: no system message)
/set, /show            every setting's value
/stats                 expert cache hit rates per layer, this session so far
/bye                   leave (Ctrl+D too)
\"\"\"                    start multi-line input; end it with another \"\"\"
Ctrl+C stops a reply, or the prompt processing, and keeps the conversation."""


def reply_trace_path(trace: Path, n: int) -> Path:
    """Where reply ``n``'s router trace goes: STEM-n.SUFFIX beside ``trace`` (.jsonl without one)."""
    return trace.with_name(f"{trace.stem}-{n}{trace.suffix or '.jsonl'}")


# ---- settings: /set NAME VALUE and /show ----------------------------------------------------------

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a typed line as newline, tab and backslash; any other
    backslash stays as it is."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def escape(text: str) -> str:
    """The inverse of ``unescape``, for showing a value on one line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _number(kind: type, check: Callable[[Any], bool]) -> Callable[[str], Any]:
    """A parser of one number of ``kind`` that ``check`` accepts; ValueError otherwise."""
    def parse(value: str) -> Any:
        number = kind(value)
        if not check(number):
            raise ValueError(value)
        return number
    return parse


def _seed(value: str) -> Optional[int]:
    return None if value.lower() in ("none", "random") else int(value)


def _text(value: str) -> Optional[str]:
    return None if value == "none" else unescape(value)


@dataclass(frozen=True)
class Setting:
    """One ``/set`` name: how its value is read, what it takes (for the error), where it goes
    (a ``SamplingSettings`` field, or ``ChatSession`` attribute)."""

    name: str
    parse: Callable[[str], Any]
    takes: str
    field: str
    sampling: bool = True


SETTINGS = {s.name: s for s in (
    Setting("temp", _number(float, lambda v: 0 <= v < float("inf")), "a number >= 0 (0 is greedy)", "temperature"),
    Setting("top_p", _number(float, lambda v: 0 < v <= 1), "a number in (0, 1] (1 is off)", "top_p"),
    Setting("top_k", _number(int, lambda v: v >= 0), "a whole number >= 0 (0 is off)", "top_k"),
    Setting("min_p", _number(float, lambda v: 0 <= v <= 1), "a number in [0, 1] (0 is off)", "min_p"),
    Setting("seed", _seed, "a whole number, or none for a random seed", "seed"),
    Setting("repeat_penalty", _number(float, lambda v: 0 < v < float("inf")), "a number > 0 (1 is off)",
            "repetition_penalty"),
    Setting("max_tokens", _number(int, lambda v: v >= 0), "a whole number >= 0", "max_tokens", sampling=False),
    Setting("stop", _text, "a text (\\n for a newline), or none", "stop", sampling=False),
    Setting("system", _text, "a text, or none for no system message", "system", sampling=False),
)}
ALIASES = {"temperature": "temp", "n": "max_tokens", "repetition_penalty": "repeat_penalty",
           "max_new_tokens": "max_tokens"}


class ChatSession:
    """The conversation state and one turn's streaming; no terminal reading here.

    The engine keeps the conversation's KV cache between turns: each turn's prompt is the whole
    conversation rendered in the chat format, and only what follows the engine's held sequence
    is prefilled (``GenerationSettings.reuse_prefix``). When the conversation and room for a
    reply do not fit the context, the oldest turns are dropped (``fit``)."""

    def __init__(
        self, engine: Engine, sampling: SamplingSettings, max_tokens: int, system: Optional[str],
        trace: Optional[Path] = None, trace_force: bool = False, stop: tuple[str, ...] = (),
        notify: Callable[[str], None] = lambda line: None,
    ):
        self.engine = engine
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.system = system
        self.stop = tuple(stop)
        self.trace = trace  # each reply's router trace goes to STEM-N.SUFFIX beside it (N from 1)
        self.trace_force = trace_force  # replace an existing STEM-N.SUFFIX (a regular file only)
        self.notify = notify  # one line for the user (turns dropped); the terminal prints it dim
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
        return GenerationSettings(max_new_tokens=self.max_tokens, stop=self.stop, sampling=sampling,
                                  trace=self.trace_path(), trace_force=self.trace_force, reuse_prefix=True)

    def trace_path(self) -> Optional[Path]:
        """Where the next reply's trace goes: one file per reply, since each reply is one token
        sequence (the conversation so far, then the reply; a traced reply prefills it all)."""
        return reply_trace_path(self.trace, self.turns + 1) if self.trace is not None else None

    def reply_room(self) -> int:
        """Positions kept free for the reply when turns are dropped: ``max_tokens``, at most
        half the context."""
        return min(self.max_tokens, self.engine.context_length // 2)

    def fit(self, user: str) -> tuple[list[int], int]:
        """The prompt ids for ``user`` after the conversation, and how many of the oldest turns
        (a user message and its reply) must go for it to leave ``reply_room`` free; the system
        message stays. Changes nothing (``reply`` drops them once the reply is kept). A
        SettingError when ``user`` with the system message alone does not fit."""
        encode, context = self.engine.tokenizer.encode_messages, self.engine.context_length
        limit = context - self.reply_room()
        system = [Message("system", self.system)] if self.system else []
        alone = len(encode(system + [Message("user", user)]))
        if alone > limit:
            raise SettingError(
                f"this message takes {alone} tokens in the chat format (with the system message) and the context "
                f"of {context} keeps {context - limit} for the reply: shorten it (/clear starts over, "
                f"/set max_tokens lower leaves more room)"
            )
        dropped = 0
        ids = encode(self.messages(user))
        while len(ids) > limit:
            dropped += 1
            ids = encode(system + self.history[2 * dropped:] + [Message("user", user)])
        return ids, dropped

    def _drop(self, turns: int) -> None:
        """Forget the ``turns`` oldest turns, saying so in one ``notify`` line."""
        if turns:
            del self.history[: 2 * turns]
            plural = "turn" if turns == 1 else "turns"
            self.notify(f"context full ({self.engine.context_length} tokens): dropped the oldest {turns} {plural}; "
                        "the system message stays")

    def reply(self, user: str, write: Callable[[str], None], stop_requested: Callable[[], bool] = lambda: False,
              spinner: bool = False):
        """Generate the reply to ``user``, writing text as it comes; returns the Generation.

        ``stop_requested`` is asked between prompt chunks and after each token: a reply stopped
        while its prompt is processed says nothing and leaves no turn; one stopped later keeps
        what it has said. The turn joins the history when a token came, or the reply ended
        without one for its limits (an error before leaves none); the oldest turns that make room
        for it (``fit``) are dropped then, and only then."""
        ids, dropped = self.fit(user)
        generation = self.engine.generate(ids, self.settings(), should_stop=stop_requested)
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
            reason = generation.stats.stop_reason
            if generation.tokens or (reason and reason != "interrupted"):
                self._drop(dropped)
                self.history += [Message("user", user), Message("assistant", generation.text)]
                self.turns += 1
        return generation

    def set(self, name: str, value: str) -> str:
        """``/set NAME VALUE``: the line saying the new value; a one-line SettingError naming the
        setting and what it takes on an unknown name or a bad value (the setting is kept)."""
        key = ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
        setting = SETTINGS.get(key)
        if setting is None:
            raise SettingError(f"unknown setting {name!r}: choose one of {', '.join(SETTINGS)}")
        try:
            parsed = setting.parse(value)
            if setting.sampling:
                self.sampling = replace(self.sampling, **{setting.field: parsed})
            elif key == "max_tokens":
                GenerationSettings(max_new_tokens=parsed)
                self.max_tokens = parsed
            elif key == "stop":
                self.stop = () if parsed is None else GenerationSettings(stop=(parsed,)).stop
            else:
                self.system = parsed or None
        except (ValueError, OverflowError, OffloadError):
            raise SettingError(f"{setting.name} takes {setting.takes}; got {value!r}") from None
        return f"{setting.name} = {self.value(setting.name)}"

    def value(self, name: str) -> str:
        """A setting's current value, as ``/show`` prints it."""
        s = self.sampling
        values = {
            "temp": f"{s.temperature:g}", "top_p": f"{s.top_p:g}", "top_k": str(s.top_k),
            "min_p": f"{s.min_p:g}", "seed": "none" if s.seed is None else str(s.seed),
            "repeat_penalty": f"{s.repetition_penalty:g}", "max_tokens": str(self.max_tokens),
            "stop": ", ".join(f'"{escape(x)}"' for x in self.stop) or "none",
            "system": f'"{escape(self.system)}"' if self.system else "none",
        }
        return values[name]

    def show(self) -> str:
        """Every setting, one ``name = value`` line each."""
        return "\n".join(f"{name} = {self.value(name)}" for name in SETTINGS)


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


# ---- input history across sessions --------------------------------------------------------------

def history_path() -> Path:
    """The input history file: ``$XDG_DATA_HOME/offload/chat_history``, XDG_DATA_HOME defaulting
    to ``~/.local/share`` (a relative XDG_DATA_HOME is ignored, as the XDG spec says)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "offload" / "chat_history"


class InputHistory:
    """The lines typed at the prompt, kept across sessions in ``path`` through readline (up to
    ``HISTORY_LINES``, the newest). Not the conversation: that is ``ChatSession.history``.
    Without readline it does nothing; a file that cannot be read or written is one ``warn``
    line (once), never an error."""

    def __init__(self, path: Path, warn: Callable[[str], None], readline_module: Any = None):
        self.path = path
        self.warn = warn
        self.readline = readline_module
        self._warned = False

    @classmethod
    def open(cls, warn: Callable[[str], None]) -> InputHistory:
        """The history at ``history_path()``, with readline when Python has it, loaded."""
        try:
            import readline
        except ImportError:
            readline = None
        history = cls(history_path(), warn, readline)
        history.load()
        return history

    def _warn_once(self, what: str, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            self.warn(f"input history: cannot {what} {self.path} ({exc.strerror or exc}); going on without it")

    def load(self) -> None:
        if self.readline is None:
            return
        self.readline.set_history_length(HISTORY_LINES)
        if self.path.is_file():
            try:
                self.readline.read_history_file(str(self.path))
            except OSError as exc:
                self._warn_once("read", exc)

    def save(self) -> None:
        """Write the history now (after each message: a session killed keeps what it had)."""
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.path))
        except OSError as exc:
            self._warn_once("write", exc)


# ---- the terminal --------------------------------------------------------------------------------

class _Interrupts:
    """While active, Ctrl+C sets a flag (checked between prompt chunks and between tokens)
    instead of raising, so that a reply stops cleanly and the engine is never interrupted
    half-way through a step."""

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


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _turn(session: ChatSession, text: str, load_seconds: Optional[float]) -> bool:
    """One message and its reply, with the stats line after it; True when a reply ran (the load
    time is then reported)."""
    engine = session.engine
    with _Interrupts() as interrupts:
        try:
            generation = session.reply(text, _write, lambda: interrupts.requested, spinner=True)
        finally:
            _write("\n")
    s = generation.stats
    if s.stop_reason == "interrupted" and not generation.tokens:
        stderr.print(f"(interrupted while processing the prompt, after {s.prompt_tokens} tokens; "
                     "the message was not added)", style="dim")
        return False
    stderr.print(stats_line(s, generation.cache_stats, load_seconds=load_seconds,
                            context_length=engine.context_length, peak=peak_memory(engine.device)), style="dim")
    return True


def interactive(session: ChatSession, read: Callable[[str], str] = input, profile: Optional[str] = None,
                history: Optional[InputHistory] = None, load_seconds: Optional[float] = None,
                verbose: bool = False) -> None:
    """The terminal loop; the header names the model and, when given, the profile's label. The
    first stats line shows ``load_seconds``; ``history`` is saved after each message; ``verbose``
    prints the expert cache's report (``/stats``) after each reply too."""
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
        if history is not None:
            history.save()
        try:
            text = checked_text(text, "chat input")  # undecodable bytes: one line, the session goes on
            if text.strip().startswith("/"):
                if command(session, text.strip()):
                    return
                continue
            if not text.strip():
                continue
            if _turn(session, text, load_seconds):
                load_seconds = None
                if verbose:
                    stderr.print(cache_report(engine), markup=False)
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
    elif name == "/show" or (name == "/set" and not arg):
        stderr.print(session.show(), style="dim", markup=False)
    elif name == "/set":
        setting, _, value = arg.partition(" ")
        value = value.strip()
        if not value:
            print_error(f"/set {setting}: give a value (/set NAME VALUE; /show lists the settings)")
        else:
            try:
                stderr.print(session.set(setting, value), style="dim", markup=False)
            except OffloadError as exc:
                print_error(f"/set {setting}: {exc}")
    elif name == "/stats":
        stderr.print(cache_report(session.engine), markup=False)
    else:
        stderr.print(f"unknown command {name}; /help lists them", style="dim", markup=False)
    return False


def chat_command(
    model: Optional[Path] = typer.Argument(
        None, help="A Hugging Face MoE checkpoint directory (safetensors; Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE). Default: the bundled demo model."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    temperature: float = typer.Option(0.7, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens; 0 is off."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 is off."),
    min_p: float = typer.Option(
        0.0, "--min-p", min=0.0, max=1.0, help="Drop tokens less likely than this fraction of the most likely one; 0 is off."
    ),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for tokens already seen; 1 is off."),
    stop: list[str] = typer.Option([], "--stop", help="End a reply when this text appears (repeatable)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=0, help="Tokens per reply at most."),
    seed: Optional[int] = typer.Option(
        None, "--seed", "-s", help="Random seed, for a repeatable conversation (reply n uses seed + n)."
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
    kv_bits: Optional[int] = KV_BITS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    profile: Optional[str] = PROFILE_OPTION,
    trace: Optional[Path] = typer.Option(
        None, "--trace", help="Write each reply's router trace (experts, gates, predictions, cache outcomes) "
        "to STEM-N.jsonl beside this path, N = 1, 2, ...",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace the --trace files STEM-N.jsonl that exist (regular files only)."
    ),
    no_escape: bool = NO_ESCAPE_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="After each reply, the expert cache's report "
                                 "(as /stats) too."),
    quiet: bool = QUIET_OPTION,  # -q and -t act through their callbacks (cli.common.invocation)
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Chat with a model: interactive in a terminal; with a pipe, stdin is one message and the reply goes to stdout."""
    with user_errors():
        def escaped(text: str, where: str) -> str:
            text = checked_text(text, where)
            return text if no_escape else process_escapes(text, where)

        system = escaped(system, "--system") if system is not None else None
        stops = tuple(escaped(s, "--stop") for s in stop)
        sampling = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repeat_penalty, seed=seed)
        GenerationSettings(max_new_tokens=max_tokens, stop=stops)
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        message = None
        if not tty:
            message = read_stdin_text("the message on stdin").strip()
            if not message:
                raise OffloadError("no message: pipe the message on stdin, or run in a terminal to chat")
        if trace is not None:  # reply 1's trace is refused now, not after loading (later ones: at their turn)
            check_file(reply_trace_path(trace, 1), force, "trace")
        model = model or DEMO_MODEL_DIR
        started = time.perf_counter()
        engine, chosen = load_with_profile(
            profile, model, device=device, dtype=dtype, context_length=context, vram=vram, ram=ram,
            experts_per_layer=experts_per_layer, policy=policy, prefetch_depth=prefetch_depth, cpu_experts=cpu_experts,
            expert_format=expert_format, expert_bits=expert_bits, attn_bits=attn_bits,
            kv_bits=kv_bits, batch_size=batch_size,
        )
        load_seconds = time.perf_counter() - started
        dim = lambda line: stderr.print(line, style="dim", markup=False)  # noqa: E731
        session = ChatSession(engine, sampling, max_tokens, system, trace, force, stop=stops, notify=dim)
        if message is not None:
            session.reply(message, _write)
            _write("\n")
            return
        history = InputHistory.open(dim)  # line editing, and the lines of earlier sessions
        if hasattr(sys.stdin, "reconfigure"):  # undecodable input reaches checked_text, not a traceback
            sys.stdin.reconfigure(errors="surrogateescape")
        interactive(session, profile=chosen.label, history=history, load_seconds=load_seconds, verbose=verbose)

