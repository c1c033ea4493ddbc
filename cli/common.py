"""What every command shares: the stderr console, one-line errors, the progress bar, the engine
options declared once, and the profile choice (a named profile, checked against this machine, or
the automatic one: ``offload.profile_fit.auto_profile``) merged with the flags given.

Input and output rules kept here: error messages are printed as plain text (a path or tensor name
holding ``[/x]`` prints as it is), only the ``error:`` prefix styled; text from arguments, stdin
and chat input must be valid UTF-8, else one line names where and the first bad byte
(``checked_text``, ``read_stdin_text``); a write to standard output that fails (a full disk:
one line, exit 2; a closed pipe: a quiet exit 1) never ends in a traceback (``OffloadApp``).

The command line as llama.cpp's users expect it (``OffloadCommand``, ``OffloadGroup``): ``-h``
beside ``--help``; ``-m/--model MODEL`` (and llama.cpp's ``-hf``) as the MODEL argument of every
command that takes one (the arguments are rewritten before parsing: ``-m X`` becomes the first
positional; both given is an error); a flag given a value (``--chat true``) and a llama.cpp flag
offload does not take (``-ngl``; ``LLAMA_FLAGS`` names the nearest offload setting) are one-line
errors, as is every other parsing error; flags show no ``<bool>`` in help. ``-q/--quiet``
silences the dim informational lines (``note``), ``-t/--threads`` sets torch's threads before a
load (without it a profile's ``cpu_threads`` is a ceiling), ``-b/--batch-size`` is llama.cpp's
prompt batch (the prefill chunk) and ``--kv-bits`` the KV cache's width (llama.cpp's ``-ctk`` and
``-ctv`` name it in their one-line error), ``process_escapes`` turns
llama.cpp's escapes in command-line text (``-p``, ``--stop``, ``--system``) into characters.

No engine or planning logic here: the fitting is ``offload.profile``, the loading ``offload.engine``.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Union

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from offload.engine import DEFAULT_DTYPE, DTYPES, Engine
from offload.errors import OffloadError, SettingError
from offload.quant import FORMATS

try:
    from typer._click.exceptions import UsageError  # typer 0.2x+ carries its own click
except ImportError:  # pragma: no cover - typer on click
    from click.exceptions import UsageError

if TYPE_CHECKING:
    from offload.profile import Profile

stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # text as given, never markup

USER_ERROR_EXIT = 2

ProgressFn = Callable[[int, int, str], None]


def print_error(message: object, prefix: str = "error: ") -> None:
    """One error line on stderr: ``prefix`` in bold red, the message as plain text (never markup)."""
    stderr.print(Text.assemble((prefix, "bold red"), str(message)))


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn engine errors into one clear line on stderr and exit code 2."""
    try:
        yield
    except OffloadError as exc:
        print_error(exc)
        raise typer.Exit(USER_ERROR_EXIT) from None


def checked_text(text: str, where: str) -> str:
    """``text`` when it is valid Unicode; an OffloadError naming ``where`` and the first byte that
    is not UTF-8 when it holds undecodable bytes (Python keeps those of an argument, or of input
    read with ``errors="surrogateescape"``, as lone surrogates)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OffloadError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start}); "
                           "give the text in UTF-8") from None
    raise OffloadError(f"{where}: not valid UTF-8; give the text in UTF-8")


def read_stdin_text(where: str = "stdin") -> str:
    """All of stdin as text: its bytes decoded as UTF-8 (newlines made \\n, as text mode does), or
    an OffloadError naming ``where`` and the first byte that is not UTF-8."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return checked_text(sys.stdin.read(), where)
    data = buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OffloadError(f"{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start}); "
                           "give the text in UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _MarkedStdout:
    """Standard output as it is, except that an OSError out of ``write`` or ``flush`` is marked as
    standard output's own (``offload_stdout``), so that ``OffloadApp`` tells it from others."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as exc:
            exc.offload_stdout = True
            raise

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as exc:
            exc.offload_stdout = True
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def stdout_failed(exc: BaseException) -> bool:
    """Is ``exc`` a failed write to standard output (while ``OffloadApp`` runs a command)?"""
    return isinstance(exc, OSError) and getattr(exc, "offload_stdout", False)


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that the flush at exit finds nothing to complain of."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, sys.stdout.fileno())
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


@dataclass
class Invocation:
    """What the options of this command line that are no engine setting asked for (set by their
    callbacks, reset before each command's parsing)."""

    quiet: bool = False  # -q/--quiet: no dim informational lines
    threads: Optional[int] = None  # -t/--threads

    def reset(self) -> None:
        self.quiet, self.threads = False, None


invocation = Invocation()


def note(message: str) -> None:
    """One dim informational line on stderr (a profile chosen, a plan fitted), unless -q."""
    if not invocation.quiet:
        stderr.print(message, style="dim", markup=False)


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"', ord("\\"): b"\\"}
_HEX = b"0123456789abcdefABCDEF"


def process_escapes(text: str, where: str) -> str:
    """llama.cpp's escapes (``string_process_escapes``) in ``text``: ``\\n`` ``\\r`` ``\\t`` ``\\'``
    ``\\"`` ``\\\\``, and ``\\xNN`` a byte (so ``\\xc3\\xa9`` is é); any other backslash stays as it is.
    Bytes from ``\\x`` that are not UTF-8 are an OffloadError naming ``where``."""
    if "\\" not in text:
        return text
    data = text.encode("utf-8", "surrogatepass")
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c != 0x5C or i + 1 >= n:  # not a backslash, or a trailing one
            out.append(c)
            i += 1
            continue
        e = data[i + 1]
        if e in _ESCAPES:
            out += _ESCAPES[e]
            i += 2
        elif e == ord("x") and i + 3 < n and data[i + 2] in _HEX and data[i + 3] in _HEX:
            out.append(int(data[i + 2:i + 4], 16))
            i += 4
        else:
            out += data[i:i + 2]
            i += 2
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise OffloadError(f"{where}: the \\x escapes make bytes that are not UTF-8 (byte 0x{out[e.start]:02x}); "
                           "escape whole UTF-8 sequences, or give --no-escape") from None


# llama.cpp's flags that offload does not take, with the nearest offload setting: the error says so
LLAMA_FLAGS = {
    **dict.fromkeys(("-ngl", "--n-gpu-layers", "--gpu-layers"),
                    "-ngl/--n-gpu-layers: offload places layers itself; use --vram"),
    **dict.fromkeys(("-ot", "--override-tensor"), "-ot/--override-tensor: use --cpu-experts"),
    **dict.fromkeys(("-cmoe", "--cpu-moe"), "--cpu-moe: use --cpu-experts all"),
    **dict.fromkeys(("-ncmoe", "--n-cpu-moe"), "--n-cpu-moe: use --experts-per-layer or --vram"),
    **dict.fromkeys(("-ub", "--ubatch-size"), "-ub/--ubatch-size: offload has one prompt chunk, -b/--batch-size"),
    **dict.fromkeys(("-fa", "--flash-attn"), "-fa/--flash-attn: attention is torch's SDPA, nothing to set"),
    **dict.fromkeys(("-ctk", "--cache-type-k", "-ctv", "--cache-type-v"),
                    "KV cache types: use --kv-bits 8 (int8 keys and values) or 16 (the compute dtype)"),
    **dict.fromkeys(("--mlock", "--no-mmap", "--mmap"), "memory mapping flags: use --ram for the experts' RAM"),
    **dict.fromkeys(("-tb", "--threads-batch"), "-tb/--threads-batch: use -t/--threads"),
    **dict.fromkeys(("-mg", "--main-gpu", "-sm", "--split-mode", "-ts", "--tensor-split"),
                    "multi-GPU flags: offload runs on one device; use --device cuda:N"),
    **dict.fromkeys(("-i", "--interactive", "-cnv", "--conversation"), "interactive mode: use offload chat"),
    **dict.fromkeys(("-r", "--reverse-prompt"), "-r/--reverse-prompt: use --stop"),
    **dict.fromkeys(("--mirostat", "--typical", "--dry-multiplier", "--xtc-probability"),
                    "samplers: offload has --temp, --top-k, --top-p, --min-p, --repeat-penalty"),
}
MODEL_FLAGS = ("-m", "--model", "-hf", "--hf-repo")  # the MODEL argument, as llama.cpp names it
# llama.cpp's names of offload's options, taken without showing in help (None: llama.cpp's
# -e/--escape, which is offload's default: dropped where the command has --no-escape)
LLAMA_ALIASES = {
    "--ctx-size": "--context", "--n-predict": "--max-tokens", "--predict": "--max-tokens",
    "-sys": "--system", "--system-prompt": "--system", "-e": None, "--escape": None,
}
_BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})
_NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False) or getattr(param, "count", False))


def _numeric(param) -> bool:
    """Does ``param`` take a number (so that ``-ngl`` cannot be ``-n`` with the value ``gl``)?"""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation in (int, float)
    return getattr(getattr(param, "type", None), "name", "") in ("integer", "float", "integer range", "float range")


def _model_argument(command) -> Optional[object]:
    """The command's MODEL argument: its first argument, when that names a model."""
    for param in command.params:
        if param.param_type_name == "argument":
            return param if param.name in ("model", "src") else None
    return None


def rewrite_args(command, ctx, args: list[str]) -> list[str]:
    """``args`` as click should parse them: ``-m X`` (``--model X``, ``--model=X``, ``-hf X``) made
    the MODEL argument, first; an OffloadError for the model given twice, a flag given a value, a
    llama.cpp flag offload does not take, and an unknown short option click would read as a known
    one with a value (``-ngl`` as ``-n gl``)."""
    options = {}
    for param in command.get_params(ctx):
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                options[name] = param
    model_param = _model_argument(command)
    out: list[str] = []
    positionals: list[str] = []
    model = model_flag = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            positionals += args[i + 1:]
            out += args[i:]
            break
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in options and name in LLAMA_ALIASES:
            target = LLAMA_ALIASES[name]
            if target is None and "--no-escape" in options and not eq:
                i += 1  # -e: escapes are processed already
                continue
            if target in options:
                name = target
                token = f"{name}{eq}{value}"
        param = options.get(name)
        if param is None and model_param is not None and name in MODEL_FLAGS:
            if eq:
                given = value
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                given = args[i + 1]
                i += 1
            else:
                raise OffloadError(f"{name} needs a value: {name} MODEL (a directory, pack or hub id)")
            if model is not None:
                raise OffloadError(f"the model is given twice ({model_flag} {model}, {name} {given}); give it once")
            model, model_flag = given, name
            i += 1
            continue
        if param is None:
            if token.startswith("-") and len(token) > 1 and not _NUMBER.fullmatch(token):
                if name in LLAMA_FLAGS:
                    raise OffloadError(f"unknown option {name} (llama.cpp's {LLAMA_FLAGS[name]})")
                if not token.startswith("--") and len(token) > 2:
                    short = options.get(token[:2])
                    if short is None:
                        raise OffloadError(f"unknown option {token}; {ctx.command_path} -h lists the options")
                    if not _is_flag(short) and _numeric(short) and not _NUMBER.fullmatch(token[2:]):
                        raise OffloadError(f"unknown option {token} ({token[:2]} takes a number: {token[:2]} 64)")
            else:
                positionals.append(token)
            out.append(token)
            i += 1
            continue
        out.append(token)
        i += 1
        if _is_flag(param):
            if eq:
                raise OffloadError(f"{name} takes no value (got {name}={value}): give {name} alone")
            if i < len(args) and args[i].lower() in _BOOL_WORDS:
                raise OffloadError(f"{name} takes no value (got {name} {args[i]}): give {name} alone; "
                                   "it is off unless given")
        elif not eq:
            count = max(1, param.nargs)
            out += args[i:i + count]
            i += count
    if model is None:
        return out
    arguments = [p for p in command.get_params(ctx) if p.param_type_name == "argument"]
    if len(positionals) >= len(arguments):
        raise OffloadError(f"the model is given twice ({model_flag} {model} and {positionals[0]}); give it once")
    return [model, *out]


def _flags_as_flags(params) -> None:
    """Help shows a flag as a flag, with no ``<bool>`` after it (typer's rich help prints a
    metavar in place of the type when there is one)."""
    for param in params:
        if _is_flag(param) and getattr(param, "metavar", "") is None:
            param.metavar = ""


def _usage_exit(exc: Exception, ctx) -> None:
    """A parsing error as one line on stderr, exit code 2."""
    message = exc.format_message() if isinstance(exc, UsageError) else str(exc)
    if isinstance(exc, UsageError):
        what = "commands" if "No such command" in message else "options"
        message = f"{message.rstrip('.')}; {ctx.command_path} -h lists the {what}"
    print_error(message)
    raise typer.Exit(USER_ERROR_EXIT)


class _FlagsShownAsFlags:
    """Help that shows a flag as a flag (no ``<bool>`` after it): ``_flags_as_flags``."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        _flags_as_flags(params)
        return params


class OffloadCommand(_FlagsShownAsFlags, TyperCommand):
    """A typer command with llama.cpp's conventions (``rewrite_args``), errors in one line, and
    flags shown as flags in help. Its MODEL argument's help names ``-m/--model``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = _model_argument(self)
        if model is not None and "-m/--model" not in (model.help or ""):
            model.help = f"{model.help or ''} Or -m/--model MODEL.".strip()

    def parse_args(self, ctx, args):
        invocation.reset()
        if ctx.resilient_parsing:
            return super().parse_args(ctx, args)
        try:
            return super().parse_args(ctx, rewrite_args(self, ctx, list(args)))
        except OffloadError as exc:
            _usage_exit(exc, ctx)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            _usage_exit(exc, ctx)


class OffloadGroup(_FlagsShownAsFlags, TyperGroup):
    """The ``offload`` group: parsing errors in one line, flags as flags in every command's help."""

    def parse_args(self, ctx, args):
        invocation.reset()
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" or ctx.resilient_parsing:
                raise
            _usage_exit(exc, ctx)

    def resolve_command(self, ctx, args):
        try:
            name, command, rest = super().resolve_command(ctx, args)
        except UsageError as exc:
            if ctx.resilient_parsing:
                raise
            _usage_exit(exc, ctx)
        stack = [command]
        while stack:  # subgroups' commands too (offload trace convert), and their help options
            sub = stack.pop()
            _flags_as_flags(sub.get_params(ctx))
            stack += list(getattr(sub, "commands", {}).values())
        return name, command, rest


class OffloadApp(typer.Typer):
    """The command-line app: a ``typer.Typer`` whose commands are ``OffloadCommand``s in an
    ``OffloadGroup`` (``-h``, ``-m``, one-line parsing errors), and whose entry point
    (``offload ...``) ends a command whose standard output fails in one line: a full disk or
    another error is ``error: cannot write to standard output (...)`` and exit 2; a closed pipe
    (``offload generate ... | head``) a quiet exit 1, as typer does."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", OffloadGroup)
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(*args, **kwargs)

    def command(self, name=None, *, cls=None, **kwargs):
        return super().command(name, cls=cls or OffloadCommand, **kwargs)

    def __call__(self, *args, **kwargs):
        original = sys.stdout
        marked = sys.stdout = _MarkedStdout(original)
        try:
            return super().__call__(*args, **kwargs)
        except OSError as exc:
            if not stdout_failed(exc):
                raise
            _quiet_stdout()
            if exc.errno == errno.EPIPE:
                raise SystemExit(1) from None
            print_error(f"cannot write to standard output ({exc.strerror or exc})")
            raise SystemExit(USER_ERROR_EXIT) from None
        finally:
            if sys.stdout is marked:
                sys.stdout = original


@contextmanager
def progress_bar(verb: str, name: str) -> Iterator[Optional[ProgressFn]]:
    """A transient progress bar on stderr when it is a terminal; yields the callback (or None)."""
    if not stderr.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(f"{verb} {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(name, total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{name}: {what}")

        yield progress


@dataclass(frozen=True)
class WrittenPack:
    """What ``write_pack`` wrote, read back from the pack itself."""

    seconds: float
    total_bytes: int  # every file of the pack
    summary: str  # "16 experts (nf4, 1.39 GiB), attention int8, 2.04 GiB in all"
    synthetic: dict  # the manifest's "synthetic" entry ({} for a converted pack)


def write_pack(out: Path, verb: str, name: str, write: Callable[[Optional[ProgressFn]], object]) -> WrittenPack:
    """Run ``write(progress)`` (a pack writer: convert, synth) under a progress bar; Ctrl+C leaves
    OUT as it was (exit 130); then open what was written, so the summary describes a valid pack."""
    from offload.pack import EXPERTS_FILE, Pack, pack_files
    from offload.plan import format_bytes

    start = time.perf_counter()
    try:
        with progress_bar(verb, name) as progress:
            write(progress)
    except KeyboardInterrupt:
        stderr.print(f"interrupted: {out} left as it was", style="bold red", markup=False)
        raise typer.Exit(130) from None
    seconds = time.perf_counter() - start
    with Pack(out) as pack:
        experts = len(pack.manifest["experts"])
        fmt, attention, synthetic = pack.layout.fmt.name, pack.attn_format, pack.synthetic or {}
    own = [out / name for name in pack_files(out) or ()]  # the pack's files, not the user's others beside them
    total = sum(f.stat().st_size for f in own if f.is_file())
    attn = f", attention {attention.name}" if attention.kind != "plain" else ""
    summary = (
        f"{experts} experts ({fmt}, {format_bytes((out / EXPERTS_FILE).stat().st_size)}){attn}, "
        f"{format_bytes(total)} in all"
    )
    return WrittenPack(seconds, total, summary, synthetic)


# Options every engine command takes (generate, chat; bench takes comma lists of most), declared once.
DTYPE_OPTION = typer.Option(
    None,
    "--dtype",
    help=f"Compute dtype: {'|'.join(DTYPES)} (default {DEFAULT_DTYPE}; for a pack, the pack's own dtype).",
)
DEVICE_OPTION = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu or cuda[:N].")
CONTEXT_OPTION = typer.Option(
    None, "--context", "-c", help="Context length to allocate (default: min(model maximum, 4096); --ctx-size too)."
)
SIZES_HELP = "24GiB or 24G = 24 x 2^30 bytes, 24GB = 24 x 10^9; a bare number is refused"
VRAM_OPTION = typer.Option(
    None, "--vram", help=f"Device memory budget: dense weights, KV cache, then expert slots ({SIZES_HELP})."
)
RAM_OPTION = typer.Option(
    None, "--ram", help=f"RAM budget for experts ({SIZES_HELP}); 0 reads every miss from disk. "
    "Default: what fits in 80% of free RAM."
)


def _set_quiet(value: bool) -> bool:
    invocation.quiet = bool(value)
    return value


def _set_threads(value: Optional[int]) -> Optional[int]:
    invocation.threads = value
    return value


QUIET_OPTION = typer.Option(
    False, "--quiet", "-q", callback=_set_quiet,
    help="No dim informational lines on stderr (the profile chosen, load notes, the demo model's introduction).",
)
THREADS_OPTION = typer.Option(
    None, "--threads", "-t", min=1, callback=_set_threads,
    help="CPU threads for torch (at most this machine's CPUs). Default: torch's, at most the profile's cpu_threads.",
)
NO_ESCAPE_OPTION = typer.Option(
    False, "--no-escape",
    help="Take -p, --stop and --system as typed. Default: \\n \\t \\r \\\\ \\' \\\" \\xNN in them are "
    "characters, as with llama.cpp's -e.",
)
EXPERTS_PER_LAYER_OPTION = typer.Option(
    None, "--experts-per-layer", help="Expert slots per layer on the device (top-k .. all), instead of --vram."
)
POLICY_OPTION = typer.Option(
    "auto",
    "--policy",
    help="Expert cache policy: lru, lfu, lookahead (LRU + gate look-ahead prefetch), history "
    "(router-history prefetch and eviction), combined (both), or auto: combined.",
)
EXPERT_FORMAT_OPTION = typer.Option(
    None,
    "--expert-format",
    help=f"Quantize experts: {'|'.join(FORMATS)} (default: unquantized, in the compute dtype; "
    "a pack keeps the format it was converted with).",
)
EXPERT_BITS_OPTION = typer.Option(
    None, "--expert-bits", help="Expert weights in 4 (nf4-dq: double-quantized nf4), 8 (int8) or 16 bits (unquantized)."
)
ATTN_BITS_OPTION = typer.Option(None, "--attn-bits", help="Attention projections in 4, 8 or 16 bits (default 16).")
KV_BITS_OPTION = typer.Option(
    None, "--kv-bits", help="KV cache in 16 bits (the compute dtype) or 8 (int8 keys and values with a scale in the compute dtype "
    "per layer, head and position: half the bytes). Default: the profile's, else 16.",
)
BATCH_SIZE_OPTION = typer.Option(
    None, "--batch-size", "-b", min=1, help="Prompt tokens per forward pass (the prefill chunk the device reserve is "
    "sized for). Default: the plan's (256, smaller when the card needs it).",
)


def model_label(model: Union[str, Path]) -> str:
    """A model's short name in output: the directory's name; the demo model by its name."""
    from offload.demo import DEMO_MODEL_DIR

    path = Path(model)
    return "offload-demo" if path.resolve() == DEMO_MODEL_DIR.resolve() else path.name


def load_engine(model: Path, **settings) -> Engine:
    """``Engine.load`` with a progress bar on stderr when it is a terminal. A hub id that is not in
    the local Hugging Face cache is downloaded first (``local_model``)."""
    model_dir = local_model(model)
    with progress_bar("loading", model_label(model)) as progress:
        engine = Engine.load(model_dir, progress=progress, **settings)
    for line in engine.notes:  # what the load changed from the plan (e.g. slots fitted to free memory)
        note(line)
    return engine


PROFILE_OPTION = typer.Option(
    None,
    "--profile",
    help="A machine profile: a shipped name (see profiles/) or a TOML path, its plan as written; flags "
    "given explicitly win; none: plain defaults. Default: the best shipped profile for the device, fitted "
    "to the model.",
)
CPU_EXPERTS_OPTION = typer.Option(
    None,
    "--cpu-experts",
    help="Where a miss whose record is in RAM runs: auto (on a CPU, on its RAM copy; on a GPU, where "
    "a cost model says is sooner), off (always copied into a device slot), all (always on the CPU, "
    "like llama.cpp's --cpu-moe). Default: the profile's, else auto.",
)
PREFETCH_DEPTH_OPTION = typer.Option(
    None,
    "--prefetch-depth",
    help="Layers ahead that gate look-ahead prefetches, >= 1 (policies lookahead and combined; "
    "default: the profile's, else 1).",
)


def announce_download(download) -> None:
    """The one stderr line before a hub download: what, where and how much."""
    from offload.plan import format_bytes

    stderr.print(
        f"downloading {download.repo_id} to {download.cache} ({download.files} files, "
        f"{format_bytes(download.size)} from {download.endpoint})",
        markup=False,
    )


def local_model(model: Union[str, Path]) -> Path:
    """``model``'s directory: a directory as it is, a hub id from the local Hugging Face cache,
    downloaded first when it is not there: one line on stderr saying what, where and how much,
    then huggingface_hub's own progress bars (drawn when stderr is a terminal)."""
    from offload.hub import resolve_model

    return resolve_model(model, download=True, on_download=announce_download, progress_bars=True)


@dataclass(frozen=True)
class ProfileChoice:
    """The profile a command runs with: its plan (None: plain defaults), how output names it
    ("rtx-3060-12gb", "cpu-only (auto)", "none (auto)"), and, for an automatic choice, why."""

    profile: Optional["Profile"]
    label: str
    reason: Optional[str] = None  # None for a profile given by name

    @property
    def text(self) -> str:
        """The label, with the reason for an automatic choice: "cpu-only (auto: ...)"."""
        if self.reason is None:
            return self.label
        return f"{self.profile.name if self.profile is not None else 'none'} ({self.reason})"

    @property
    def note(self) -> Optional[str]:
        """The one short stderr line that names an automatic choice (None for a named profile):
        ``profile: cpu-only (auto: 16-bit, all experts resident)``, at most 80 columns."""
        if self.reason is None:
            return None
        name = self.profile.name if self.profile is not None else "none"
        line = f"profile: {name} ({short_reason(self.reason)})"
        return line if len(line) <= NOTE_COLUMNS else line[:NOTE_COLUMNS - 3] + "..."


NOTE_COLUMNS = 80


def short_reason(reason: str) -> str:
    """``offload.profile_fit.auto_profile``'s reason in a few words: "auto: 16-bit, all experts
    resident", "auto: 4-bit, 2-3/8 experts/layer on GPU, rest in RAM", "auto: plain defaults,
    no shipped profile fits" (the whole reason stays in ``ProfileChoice.reason``)."""
    body = reason.removeprefix("auto: ")
    if body.endswith("; plain defaults"):
        return "auto: plain defaults, no shipped profile fits"
    head, _, how = body.partition("; ")
    where = "GPU" if "GPU" in head else "device"
    how = how or body
    how = re.sub(r" \([\d.]+ on average\)", "", how)
    for long, short in ((" weights", ""), (", every expert resident, no budget", ", all experts resident"),
                        (" experts per layer on the device", f" experts/layer on {where}"),
                        (", the rest in RAM", ", rest in RAM"), (" in RAM, the rest read from disk", " in RAM, rest on disk"),
                        (" experts, ", " + "), ("-bit attention", "-bit attn")):
        how = how.replace(long, short)
    return f"auto: {how}"


def choose_profile(
    profile: Optional[str],
    model: Union[str, Path],
    *,
    device: Optional[str] = "auto",
    dtype: Optional[str] = None,
    context_length: Optional[int] = None,
    expert_format: Optional[str] = None,
    expert_bits: Optional[int] = None,
    attn_bits: Optional[int] = None,
    vram: Optional[str] = None,
    ram: Optional[str] = None,
    experts_per_layer: Optional[int] = None,
    kv_bits: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> ProfileChoice:
    """A profile given by name or path: loaded, and refused (SettingError naming the field) when
    it needs more than this machine has, unless --device overrides where it runs. None: the best
    shipped profile for the device, fitted to ``model`` (``offload.profile_fit.auto_profile``), or
    plain defaults when none suits; the flags given (bits, formats, budgets) fix what they name in
    the fit."""
    from offload.device import resolve_device
    from offload.profile import does_it_fit, load_profile, probe_machine
    from offload.profile_fit import auto_profile

    device = device or "auto"
    if profile is not None and profile.strip().lower() == "none":  # --profile none: plain defaults
        return ProfileChoice(None, "none")
    if profile:
        chosen = load_profile(profile)
        if device == "auto" or (resolve_device(device).type == "cuda") == chosen.has_gpu:
            does_it_fit(chosen, probe_machine(device=device, copy_bytes=0))
        return ProfileChoice(chosen, chosen.name)
    chosen, reason = auto_profile(
        local_model(model), device, dtype=dtype, context=context_length, expert_format=expert_format,
        expert_bits=expert_bits, attn_bits=attn_bits, vram=vram, ram=ram, experts_per_layer=experts_per_layer,
        kv_bits=kv_bits, batch_size=batch_size,
    )
    return ProfileChoice(chosen, f"{chosen.name if chosen else 'none'} (auto)", reason)


def engine_options(profile: Union[None, str, "Profile", ProfileChoice], **flags) -> dict:
    """``load_engine``'s settings: a profile's plan (a name or path, a Profile, or a choice),
    overridden by every flag the user gave (a flag at its default, None or "auto", counts as not
    given). A flag that replaces a profile setting by another name replaces it whole:
    --expert-format the profile's expert bits, --vram and --experts-per-layer each other, and
    --replay a profile's look-ahead policy (lookahead, combined: a trace holds no hidden states)."""
    from offload.profile import Profile, engine_kwargs, load_profile

    if isinstance(profile, ProfileChoice):
        profile = profile.profile
    if isinstance(profile, str):
        profile = load_profile(profile) if profile and profile.strip().lower() != "none" else None
    settings = engine_kwargs(profile) if isinstance(profile, Profile) else {}
    if "context_length" in settings:  # a machine's context is a ceiling: a model may allow less
        settings["max_context"] = settings.pop("context_length")
    given = {key for key, value in flags.items() if value is not None and value != "auto"}
    replaced = {"expert_format": ("expert_bits",), "vram": ("experts_per_layer",), "experts_per_layer": ("vram",)}
    for key in given:
        for other in replaced.get(key, ()):
            if other not in given:
                settings.pop(other, None)
    settings.setdefault("device", "auto")
    settings.setdefault("context_length", None)
    for key, value in flags.items():
        if key in given:
            settings[key] = value
        else:
            settings.setdefault(key, value)
    if "replay" in given and "policy" not in given and settings.get("policy") in ("lookahead", "combined"):
        settings["policy"] = "auto"  # a profile's gate look-ahead cannot run on a trace: the replay default
    for key in ("cpu_experts", "kv_bits", "batch_size"):  # not given, nor in the profile: the engine's default
        if key in settings and settings[key] is None:
            settings.pop(key)
    if "kv_bits" in settings:
        from offload.plan import check_kv_bits

        check_kv_bits(settings["kv_bits"])  # refused before anything loads
    depth = settings.pop("prefetch_depth", None)
    if depth is not None:  # None: the engine's default
        if depth < 1:
            raise SettingError(f"--prefetch-depth {depth}: must be at least 1")
        settings["prefetch_depth"] = depth
    return settings


# the flags that fix what they name when a profile is fitted to the model (choose_profile)
_FIT_FLAGS = ("device", "dtype", "context_length", "expert_format", "expert_bits", "attn_bits", "vram", "ram",
              "experts_per_layer", "kv_bits", "batch_size")


def load_with_profile(profile: Optional[str], model: Union[str, Path], **flags) -> tuple[Engine, ProfileChoice]:
    """The profile (``--profile``, or the automatic one fitted to ``model``), then the engine
    with its plan under the flags given (``engine_options``' names). An automatic choice is
    named in one dim line on stderr after the load, so that a load error stays the only line."""
    if flags.get("kv_bits") is not None:
        from offload.plan import check_kv_bits

        check_kv_bits(flags["kv_bits"])  # refused before a profile is fitted or anything is read
    chosen = choose_profile(profile, model, **{k: flags[k] for k in _FIT_FLAGS if k in flags})
    settings = engine_options(chosen, **flags)
    set_threads(chosen.profile)
    engine = load_engine(model, **settings)
    if chosen.note:
        note(chosen.note)
    introduce_demo(model)
    return engine, chosen


def usable_cpus() -> tuple[int, int]:
    """(CPUs this process may run on, of them physical cores as far as psutil tells)."""
    import psutil

    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return logical, max(1, min(logical, physical))


def set_threads(profile: Optional["Profile"] = None) -> int:
    """torch's CPU threads before a load: -t/--threads as given (at most the CPUs this process
    may use, said in a note when lowered); without it, a profile's ``cpu_threads`` (a named or
    automatic one) as a ceiling: at most the physical cores, never above torch's own count (which
    OMP_NUM_THREADS sets). Returns the count set."""
    import torch

    logical, physical = usable_cpus()
    current = torch.get_num_threads()
    if invocation.threads is not None:
        threads = min(invocation.threads, logical)
        if threads < invocation.threads:
            note(f"threads: {threads} (-t {invocation.threads} is more than the {logical} CPUs here)")
    elif profile is not None:
        threads = min(profile.cpu_threads, physical, current)
    else:
        threads = current
    if threads != current:
        torch.set_num_threads(threads)
    return threads


DEMO_INTRO = ("offload-demo: a ~10M-parameter model trained on the Python docs, bundled so offload works "
              "offline; a real model: -m mistralai/Mixtral-8x7B-Instruct-v0.1 (or a path)")


def demo_marker() -> Path:
    """The file whose presence says the demo model was introduced to this user:
    ``$XDG_DATA_HOME/offload/demo-introduced`` (XDG_DATA_HOME default ~/.local/share)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "offload" / "demo-introduced"


def introduce_demo(model: Union[str, Path]) -> bool:
    """The demo model's first run (once per user, unless -q): one dim line saying what it is and
    how to run a real model, and a marker file so that it is said once. True when said. A marker
    that cannot be written (a read-only home) only means the line comes again next time."""
    from offload.demo import DEMO_MODEL_DIR

    if invocation.quiet:
        return False
    try:
        if Path(model).resolve() != DEMO_MODEL_DIR.resolve():
            return False
        marker = demo_marker()
        if marker.exists():
            return False
    except (OSError, ValueError):
        return False
    note(DEMO_INTRO)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("offload introduced its demo model here once; delete to see it again\n")
    except OSError:
        pass
    return True
