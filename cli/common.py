"""What every command shares: the stderr console, one-line errors, the progress bar, the engine
options declared once, and the profile choice (a named profile, checked against this machine, or
the automatic one: ``offload.profile_fit.auto_profile``) merged with the flags given.

Input and output rules kept here: error messages are printed as plain text (a path or tensor name
holding ``[/x]`` prints as it is), only the ``error:`` prefix styled; text from arguments, stdin
and chat input must be valid UTF-8, else one line names where and the first bad byte
(``checked_text``, ``read_stdin_text``); a write to standard output that fails (a full disk:
one line, exit 2; a closed pipe: a quiet exit 1) never ends in a traceback (``OffloadApp``).

No engine or planning logic here: the fitting is ``offload.profile``, the loading ``offload.engine``.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Union

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from offload.engine import DEFAULT_DTYPE, DTYPES, Engine
from offload.errors import OffloadError, SettingError
from offload.quant import FORMATS

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


class OffloadApp(typer.Typer):
    """The command-line app: a ``typer.Typer`` whose entry point (``offload ...``) ends a command
    whose standard output fails in one line: a full disk or another error is ``error: cannot
    write to standard output (...)`` and exit 2; a closed pipe (``offload generate ... | head``)
    a quiet exit 1, as typer does."""

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
CONTEXT_OPTION = typer.Option(None, "--context", help="Context length to allocate (default: min(model maximum, 4096)).")
VRAM_OPTION = typer.Option(
    None, "--vram", help="Device memory budget (e.g. 6GiB): dense weights, KV cache, then expert slots."
)
RAM_OPTION = typer.Option(
    None, "--ram", help="RAM budget for experts (e.g. 16GiB); 0 reads every miss from disk. Default: all."
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
    None, "--expert-bits", help="Expert weights in 4 (nf4), 8 (int8) or 16 bits (unquantized)."
)
ATTN_BITS_OPTION = typer.Option(None, "--attn-bits", help="Attention projections in 4, 8 or 16 bits (default 16).")


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
    for note in engine.notes:  # what the load changed from the plan (e.g. slots fitted to free memory)
        stderr.print(note, style="dim", markup=False)
    return engine


PROFILE_OPTION = typer.Option(
    None,
    "--profile",
    help="A machine profile: a shipped name (see profiles/) or a TOML path, its plan as written; flags "
    "given explicitly win. Default: the best shipped profile for the device, fitted to the model.",
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
        """The one stderr line that names an automatic choice (None for a named profile)."""
        return None if self.reason is None else f"profile: {self.text}; --profile to choose"


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
    if profile:
        chosen = load_profile(profile)
        if device == "auto" or (resolve_device(device).type == "cuda") == chosen.has_gpu:
            does_it_fit(chosen, probe_machine(device=device, copy_bytes=0))
        return ProfileChoice(chosen, chosen.name)
    chosen, reason = auto_profile(
        local_model(model), device, dtype=dtype, context=context_length, expert_format=expert_format,
        expert_bits=expert_bits, attn_bits=attn_bits, vram=vram, ram=ram, experts_per_layer=experts_per_layer,
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
        profile = load_profile(profile) if profile else None
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
    if settings.get("cpu_experts", "") is None:  # not given, nor in the profile: the engine's default
        settings.pop("cpu_experts")
    depth = settings.pop("prefetch_depth", None)
    if depth is not None:  # None: the engine's default
        if depth < 1:
            raise SettingError(f"--prefetch-depth {depth}: must be at least 1")
        settings["prefetch_depth"] = depth
    return settings


# the flags that fix what they name when a profile is fitted to the model (choose_profile)
_FIT_FLAGS = ("device", "dtype", "context_length", "expert_format", "expert_bits", "attn_bits", "vram", "ram",
              "experts_per_layer")


def load_with_profile(profile: Optional[str], model: Union[str, Path], **flags) -> tuple[Engine, ProfileChoice]:
    """The profile (``--profile``, or the automatic one fitted to ``model``), then the engine
    with its plan under the flags given (``engine_options``' names). An automatic choice is
    named in one dim line on stderr after the load, so that a load error stays the only line."""
    chosen = choose_profile(profile, model, **{k: flags[k] for k in _FIT_FLAGS if k in flags})
    engine = load_engine(model, **engine_options(chosen, **flags))
    if chosen.note:
        stderr.print(chosen.note, style="dim", markup=False)
    return engine, chosen
