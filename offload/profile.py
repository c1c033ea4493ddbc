"""Machine profiles: a TOML file that says what a machine has and the plan that runs well on it.

What it is: ``Profile`` (the ``[machine]`` and ``[plan]`` tables of a profile file),
``load_profile`` (a shipped name, or a path), checked field by field with one-line errors naming
the file and the field, ``save_profile`` (hand-written TOML, atomic: ``offload.files``), ``engine_kwargs`` (the plan
as ``Engine.load`` keyword arguments), ``probe_machine`` (RAM, CPU threads, GPU, a timed
host-to-device copy and a timed disk read; with ``compute``, the RAM's read bandwidth, the
4-bit CPU kernel's and, on CUDA, the 4-bit GPU kernel's GB/s on an expert matrix and a CPU
expert's round trip: the numbers ``--cpu-experts auto``'s cost model takes, through
``engine_kwargs``' ``machine``), ``best_shipped_profile`` and ``does_it_fit``. What
it is not: the automatic choice of a profile fitted to a model (profile_fit.py), a benchmark (``offload profile``, in cli/profile.py, measures candidate
plans through offload.bench), nor a printer: the CLI says which profile ran.

Shipped profiles live in the repository's top-level ``profiles/`` folder; a wheel installs a copy
as data files under ``<prefix>/share/offload/profiles`` (pyproject.toml's
``[tool.setuptools.data-files]``), and ``find_profiles_dir`` looks in both places. A name is
looked up there first, then in the user's folder (``user_profiles_dir``:
``$XDG_CONFIG_HOME/offload/profiles``, default ``~/.config/offload/profiles``), where
``offload profile`` writes by default; ``list_profiles`` lists both.

On a machine without a GPU, ``machine.vram`` is "0" and the plan's ``vram`` is a budget of RAM:
the CPU is the device, its "slots" are RAM (``Profile.device_bytes``); ``offload profile``
writes ``plan.ram = "0"`` beside it there, so that nothing more is held in RAM than that budget.

File layout (sizes as strings: "8GiB", "512MiB", "0"):

    # one comment line: what the profile is for
    [machine]
    gpu = "NVIDIA GeForce RTX 3060"   # "none": no GPU, the plan runs on the CPU
    vram = "12GiB"
    ram = "32GiB"
    h2d_gbps = 25.0                   # host-to-device copy, GB/s
    disk_gbps = 3.5                   # sequential read, GB/s
    cpu_threads = 16
    mem_gbps = 360.0                  # optional: the device's memory bandwidth, GB/s (published;
                                      # the CPU's RAM without a GPU), for offload.estimate
    ram_gbps = 65.0                   # optional, beside a GPU: the CPU's RAM read bandwidth, GB/s
                                      # (usable, not peak), for CPU experts (placement, estimate)
    cpu_expert_gbps = 40.0            # optional: the CPU 4-bit kernel's measured GB/s on expert
                                      # records (replaces ram_gbps x its stated 0.6 share)
    gpu_expert_gbps = 220.0           # optional: the GPU 4-bit kernel's measured GB/s on expert
                                      # records (replaces mem_gbps x its stated 0.6 share)
    round_trip_ms = 0.1               # optional: one layer's CPU-expert round trip, ms
    sdpa = "math"                     # optional: how the card runs a prefill chunk's attention:
                                      # "fused" (flash, Ampere and later; the default) or "math"
                                      # (before Ampere: fp32 scores, in the runtime reserve)
    [plan]
    expert_bits = 4                   # 4, 8 or 16
    attn_bits = 4
    vram = "11GiB"                    # optional: GPU budget for the engine (below machine.vram)
    ram = "24GiB"                     # optional: RAM budget for experts
    experts_per_layer = 3             # optional, instead of vram
    context = 4096
    policy = "combined"               # auto, or an expert cache policy
    prefetch_depth = 1                # layers ahead that gate look-ahead prefetches (>= 1)
    cpu_experts = "auto"              # optional: where misses run, auto | off | all (absent: the
                                      # engine's default)
    kv_bits = 8                       # optional: the KV cache's width, 16 (the compute dtype,
                                      # the default when absent) or 8 (int8 with scales)

Profiles written before a field existed still read: every optional field may be absent.

Reading a profile (``load_profile``, ``profile_from_dict``) turns every malformed input into a
SettingError naming the file and the field: not a regular file, over ``PROFILE_MAX_BYTES``, not
UTF-8, not TOML (nested too deep or a number too long included), a table or field missing,
unknown or of the wrong type, a number that is not finite, and values outside sane ranges
(sizes up to ``MAX_SIZE_BYTES``, the integer fields up to their ``_INT_MAX``).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

import offload
from offload.device import device_name, empty_host_buffer, is_cuda, memory_info, resolve_device, synchronize
from offload.errors import SettingError, shown
from offload.experts.policy import POLICY_CHOICES
from offload.files import write_file
from offload.plan import format_bytes, parse_bytes
from offload.quant import BITS_CHOICES

# Where a wheel installs the shipped profiles, relative to the install prefix (the data-files
# entry of pyproject.toml must name the same folder).
PROFILES_DATA_DIR = ("share", "offload", "profiles")


def find_profiles_dir(package_dir: Path | None = None, dist: importlib.metadata.Distribution | None = None) -> Path:
    """The folder of the shipped profiles.

    In a source checkout (an editable install included) the repository's ``profiles/`` folder,
    next to the ``offload`` package and a ``pyproject.toml``. In an installed wheel, the copy the
    wheel put under ``<prefix>/share/offload/profiles``, found through the installed files of
    the ``offload`` distribution (``dist``, default: the one installed). When neither is there,
    the checkout's path, so that errors name where profiles were looked for."""
    root = (package_dir or Path(offload.__file__).resolve().parent).parent
    checkout = root / "profiles"
    if (root / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    try:
        dist = dist or importlib.metadata.distribution("offload")
    except importlib.metadata.PackageNotFoundError:
        return checkout
    for file in dist.files or ():
        if file.suffix == ".toml" and tuple(file.parts[-4:-1]) == PROFILES_DATA_DIR:
            return Path(dist.locate_file(file)).resolve().parent
    return checkout


PROFILES_DIR = find_profiles_dir()
NO_GPU = "none"
# A card's reported total falls a little below its nominal size (an "8 GB" card reports ~7.7 GiB).
NOMINAL_SLACK = 0.95
PROBE_COPY_BYTES = 256 * 2**20
PROBE_READ_BYTES = 256 * 2**20

PROFILE_MAX_BYTES = 2**20  # a profile is a few hundred bytes
MAX_SIZE_BYTES = 2**60  # 1 EiB: no machine's memory is larger
# The largest value each integer field takes (far above any machine or model).
_INT_MAX = {"cpu_threads": 2**16, "experts_per_layer": 2**16, "context": 2**24, "prefetch_depth": 1024}

# (table, key) -> (type, required). float fields take ints too; size fields are strings.
_SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "machine": {
        "gpu": ("str", True),
        "vram": ("size", True),
        "ram": ("size", True),
        "h2d_gbps": ("float", True),
        "disk_gbps": ("float", True),
        "cpu_threads": ("int", True),
        "mem_gbps": ("gbps", False),
        "ram_gbps": ("gbps", False),
        "cpu_expert_gbps": ("gbps", False),
        "gpu_expert_gbps": ("gbps", False),
        "round_trip_ms": ("float", False),
        "sdpa": ("sdpa", False),
    },
    "plan": {
        "expert_bits": ("bits", True),
        "attn_bits": ("bits", True),
        "vram": ("size", False),
        "ram": ("size", False),
        "experts_per_layer": ("int", False),
        "context": ("int", True),
        "policy": ("policy", True),
        "prefetch_depth": ("int", True),
        "cpu_experts": ("cpu_experts", False),
        "kv_bits": ("kv_bits", False),
    },
}


@dataclass(frozen=True)
class Profile:
    """A machine and the plan for it. Sizes stay as written ("7.4GiB"); ``*_bytes`` parse them."""

    name: str
    gpu: str
    vram: str
    ram: str
    h2d_gbps: float
    disk_gbps: float
    cpu_threads: int
    expert_bits: int
    attn_bits: int
    context: int
    policy: str
    prefetch_depth: int
    plan_vram: str | None = None
    plan_ram: str | None = None
    experts_per_layer: int | None = None
    mem_gbps: float | None = None  # the device's memory bandwidth, GB/s (None: not stated)
    ram_gbps: float | None = None  # beside a GPU: the CPU's usable RAM read bandwidth, GB/s
    cpu_expert_gbps: float | None = None  # the CPU 4-bit kernel's measured GB/s on expert records
    gpu_expert_gbps: float | None = None  # the GPU 4-bit kernel's measured GB/s on expert records
    round_trip_ms: float | None = None  # one layer's CPU-expert round trip (None: the stated default)
    sdpa: str = "fused"  # a prefill chunk's attention on the card: "fused" (flash) or "math" (offload.plan.SDPA_PATHS)
    cpu_experts: str | None = None  # auto | off | all (None: the engine's default)
    kv_bits: int = 16  # the KV cache's width: 16 (the compute dtype) or 8 (int8 with scales)
    comment: str = ""
    source: str = ""  # the file it was read from ("" when built in memory)

    @property
    def has_gpu(self) -> bool:
        return self.gpu.strip().lower() != NO_GPU

    @property
    def vram_bytes(self) -> int:
        return parse_bytes(self.vram)

    @property
    def ram_bytes(self) -> int:
        return parse_bytes(self.ram)

    @property
    def plan_vram_bytes(self) -> int | None:
        return None if self.plan_vram is None else parse_bytes(self.plan_vram)

    @property
    def plan_ram_bytes(self) -> int | None:
        return None if self.plan_ram is None else parse_bytes(self.plan_ram)

    @property
    def device_bytes(self) -> int:
        """What the plan's ``vram`` budget is drawn from: the card, or RAM on a machine without one."""
        return self.vram_bytes if self.has_gpu else self.ram_bytes

    def tables(self) -> dict[str, dict[str, Any]]:
        """The file's two tables, optional fields left out when unset."""
        machine = dict(gpu=self.gpu, vram=self.vram, ram=self.ram, h2d_gbps=float(self.h2d_gbps),
                       disk_gbps=float(self.disk_gbps), cpu_threads=self.cpu_threads,
                       mem_gbps=None if self.mem_gbps is None else float(self.mem_gbps),
                       ram_gbps=None if self.ram_gbps is None else float(self.ram_gbps),
                       cpu_expert_gbps=None if self.cpu_expert_gbps is None else float(self.cpu_expert_gbps),
                       gpu_expert_gbps=None if self.gpu_expert_gbps is None else float(self.gpu_expert_gbps),
                       round_trip_ms=None if self.round_trip_ms is None else float(self.round_trip_ms),
                       sdpa=None if self.sdpa == "fused" else self.sdpa)  # "fused", the default, left out
        plan = dict(expert_bits=self.expert_bits, attn_bits=self.attn_bits, vram=self.plan_vram,
                    ram=self.plan_ram, experts_per_layer=self.experts_per_layer, context=self.context,
                    policy=self.policy, prefetch_depth=self.prefetch_depth, cpu_experts=self.cpu_experts,
                    kv_bits=None if self.kv_bits == 16 else self.kv_bits)  # 16, the default, left out
        return {
            "machine": {k: v for k, v in machine.items() if v is not None},
            "plan": {k: v for k, v in plan.items() if v is not None},
        }


# ---- reading and checking ----------------------------------------------------------------------


def shipped_profiles() -> list[str]:
    """Names of the shipped profiles (``PROFILES_DIR``)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def user_profiles_dir() -> Path:
    """The user's profiles folder, where ``offload profile`` writes by default:
    ``$XDG_CONFIG_HOME/offload/profiles`` (an absolute ``XDG_CONFIG_HOME`` only, as the XDG
    base directory spec says), else ``~/.config/offload/profiles``. Read at each call."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "offload" / "profiles"


def user_profiles() -> list[str]:
    """Names of the profiles in ``user_profiles_dir()`` (none when it does not exist)."""
    folder = user_profiles_dir()
    return sorted(p.stem for p in folder.glob("*.toml") if p.is_file()) if folder.is_dir() else []


def profile_dirs() -> list[tuple[str, Path]]:
    """Where a profile name is looked up, in order: ("shipped", PROFILES_DIR), ("user", the user's folder)."""
    return [("shipped", PROFILES_DIR), ("user", user_profiles_dir())]


@dataclass(frozen=True)
class ProfileEntry:
    """One profile file of ``list_profiles``: its name, where it lives ("shipped" or "user"),
    its path, and the profile (None when it does not read: ``error`` says why). ``shadowed``:
    a user profile with a shipped profile's name, which the name does not reach (its path does)."""

    name: str
    where: str
    path: Path
    profile: Profile | None
    error: str = ""
    shadowed: bool = False


def list_profiles() -> list[ProfileEntry]:
    """Every profile the lookup by name sees, shipped first, then the user's, each sorted by name."""
    entries: list[ProfileEntry] = []
    seen: set[str] = set()
    for where, folder in profile_dirs():
        files = sorted(folder.glob("*.toml")) if folder.is_dir() else []
        for path in files:
            if not path.is_file():
                continue
            try:
                profile, error = load_profile(path), ""
            except SettingError as exc:
                profile, error = None, str(exc)
            entries.append(ProfileEntry(path.stem, where, path, profile, error, shadowed=path.stem in seen))
            seen.add(path.stem)
    return entries


def _resolve(name_or_path: str | Path) -> Path:
    if "\0" in str(name_or_path):
        raise SettingError(f"profile {str(name_or_path)!r}: a name or path cannot hold a NUL character")
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists() or len(path.parts) > 1:
        if not path.is_file():
            if path.exists():
                raise SettingError(f"{path}: not a regular file, expected a profile (TOML)")
            raise SettingError(f"{path}: no such profile file")
        return path
    for _, folder in profile_dirs():  # shipped first, then the user's
        found = folder / f"{name_or_path}.toml"
        if found.is_file():
            return found
    shipped = ", ".join(shipped_profiles()) or f"none found in {PROFILES_DIR}"
    user = ", ".join(user_profiles()) or "none"
    raise SettingError(
        f"profile {str(name_or_path)!r}: not a file, nor a shipped profile ({shipped}), nor a user profile in "
        f"{user_profiles_dir()} ({user}); `offload profile --list` lists them"
    )


def _check_value(where: str, kind: str, value: Any) -> Any:
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise SettingError(f"{where}: expected a non-empty string, got {_short(value)}")
    elif kind == "size":
        if not isinstance(value, str) or len(value) > 64:
            raise SettingError(f"{where}: expected a size string like \"8GiB\", got {_short(value)}")
        try:
            size = parse_bytes(value, where)
        except (SettingError, ValueError, OverflowError):
            raise SettingError(f"{where}: {value!r} is not a size like \"8GiB\", \"512MiB\" or \"0\"") from None
        if size > MAX_SIZE_BYTES:
            raise SettingError(f"{where}: {value!r} is more than {format_bytes(MAX_SIZE_BYTES)}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise SettingError(f"{where}: expected a finite number >= 0, got {_short(value)}")
        value = float(value)
    elif kind == "gbps":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise SettingError(f"{where}: expected a finite bandwidth in GB/s > 0, got {_short(value)}")
        value = float(value)
    elif kind == "int":
        field = where.rsplit(".", 1)[-1]
        most = _INT_MAX.get(field, 2**31)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise SettingError(f"{where}: expected an integer in [1, {most}], got {_short(value)}")
    elif kind == "bits":
        if isinstance(value, bool) or not isinstance(value, int) or value not in BITS_CHOICES:
            raise SettingError(f"{where}: {_short(value)} bits; choose one of {', '.join(map(str, BITS_CHOICES))}")
    elif kind == "sdpa":
        from offload.plan import SDPA_PATHS

        if not isinstance(value, str) or value not in SDPA_PATHS:
            raise SettingError(f"{where}: {_short(value)}; choose one of {', '.join(SDPA_PATHS)}")
    elif kind == "kv_bits":
        from offload.plan import KV_BITS

        if isinstance(value, bool) or not isinstance(value, int) or value not in KV_BITS:
            raise SettingError(f"{where}: {_short(value)} bits; choose one of {', '.join(map(str, KV_BITS))}")
    elif kind == "cpu_experts":
        from offload.experts.placement import CPU_EXPERTS

        if not isinstance(value, str) or value not in CPU_EXPERTS:
            raise SettingError(f"{where}: {_short(value)}; choose one of {', '.join(CPU_EXPERTS)}")
    elif kind == "policy":
        if not isinstance(value, str) or value not in POLICY_CHOICES:
            raise SettingError(f"{where}: policy {_short(value)}; choose one of {', '.join(POLICY_CHOICES)}")
    return value


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 60) -> str:
    """``offload.errors.shown`` on one line, at this module's limit."""
    return shown(value, limit, one_line=True)


def profile_from_dict(data: dict[str, Any], source: str = "<profile>", name: str = "", comment: str = "") -> Profile:
    """A checked Profile from the parsed tables; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise SettingError(f"{source}: expected tables [machine] and [plan], got {_short(data)}")
    unknown = set(map(str, data)) - set(_SCHEMA)
    if unknown:
        raise SettingError(f"{source}: unknown table or field {_one_line(sorted(unknown)[0])!r} (expected [machine] and [plan])")
    values: dict[str, dict[str, Any]] = {}
    for table, schema in _SCHEMA.items():
        given = data.get(table)
        if given is None:
            raise SettingError(f"{source}: missing table [{table}]")
        if not isinstance(given, dict):
            raise SettingError(f"{source}: [{table}] must be a table, got {_short(given)}")
        extra = sorted(set(map(str, given)) - set(schema))
        if extra:
            raise SettingError(f"{source}: {table}.{_one_line(extra[0])}: unknown field (known: {', '.join(schema)})")
        values[table] = {}
        for key, (kind, required) in schema.items():
            if key not in given:
                if required:
                    raise SettingError(f"{source}: {table}.{key}: missing")
                continue
            values[table][key] = _check_value(f"{source}: {table}.{key}", kind, given[key])
    m, p = values["machine"], values["plan"]
    profile = Profile(
        name=name, gpu=m["gpu"], vram=m["vram"], ram=m["ram"], h2d_gbps=m["h2d_gbps"],
        disk_gbps=m["disk_gbps"], cpu_threads=m["cpu_threads"], expert_bits=p["expert_bits"],
        attn_bits=p["attn_bits"], context=p["context"], policy=p["policy"],
        prefetch_depth=p["prefetch_depth"], plan_vram=p.get("vram"), plan_ram=p.get("ram"),
        experts_per_layer=p.get("experts_per_layer"), mem_gbps=m.get("mem_gbps"), ram_gbps=m.get("ram_gbps"),
        cpu_expert_gbps=m.get("cpu_expert_gbps"), gpu_expert_gbps=m.get("gpu_expert_gbps"), round_trip_ms=m.get("round_trip_ms"),
        cpu_experts=p.get("cpu_experts"), kv_bits=p.get("kv_bits", 16), sdpa=m.get("sdpa", "fused"),
        comment=comment, source=source,
    )
    if profile.plan_vram is not None and profile.experts_per_layer is not None:
        raise SettingError(f"{source}: plan.experts_per_layer: give plan.vram or plan.experts_per_layer, not both")
    limit, what = (profile.vram_bytes, "machine.vram") if profile.has_gpu else (profile.ram_bytes, "machine.ram")
    if profile.plan_vram is not None and profile.plan_vram_bytes > limit:
        raise SettingError(
            f"{source}: plan.vram: {profile.plan_vram} is more than the machine has ({what} {getattr(profile, what[8:])})"
        )
    if profile.plan_ram is not None and profile.plan_ram_bytes > profile.ram_bytes:
        raise SettingError(f"{source}: plan.ram: {profile.plan_ram} is more than the machine has (machine.ram {profile.ram})")
    return profile


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name ("rtx-3060-12gb": shipped first, then the user's folder,
    ``user_profiles_dir``) or a profile file by path, checked."""
    path = _resolve(name_or_path)
    try:
        with open(path, "rb") as f:
            raw = f.read(PROFILE_MAX_BYTES + 1)
    except OSError as exc:
        raise SettingError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > PROFILE_MAX_BYTES:
        raise SettingError(f"{path}: larger than {PROFILE_MAX_BYTES} bytes; not a profile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SettingError(f"{path}: not valid TOML (byte {exc.start} is not UTF-8)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise SettingError(f"{path}: not valid TOML (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise SettingError(f"{path}: not valid TOML ({_one_line(str(exc))})") from None
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    comment = first.lstrip("#").strip() if first.startswith("#") else ""
    return profile_from_dict(data, str(path), path.stem, comment)


# ---- writing -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(round(value, 3))
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def profile_toml(profile: Profile) -> str:
    """The profile as TOML text: a comment line, then [machine] and [plan] as key = value."""
    comment = " ".join(profile.comment.split()) or f"machine profile {profile.name}".strip()
    lines = [f"# {comment}"]
    for table, values in profile.tables().items():
        lines += ["", f"[{table}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def save_profile(profile: Profile, path: str | Path, *, force: bool = False) -> Path:
    """Check, then write ``path`` under the rule of ``offload.files`` (an ``AtomicFile``: a
    temporary sibling, fsynced, renamed into place; missing folders made): an existing ``path``
    is refused unless ``force``, and then only a regular file is replaced."""
    path = Path(path)
    text = profile_toml(profile)
    profile_from_dict(tomllib.loads(text), str(path), path.stem)  # refuse to write what load refuses
    return write_file(path, text, force=force, what="profile", make_parents=True)


# ---- using a profile ---------------------------------------------------------------------------


def engine_kwargs(profile: Profile) -> dict[str, Any]:
    """Keyword arguments for ``Engine.load``: the profile's plan, its device and context (and its
    ``kv_bits`` when not the engine's default, 16), and (a GPU profile) the profile itself as
    ``machine``, whose measured costs the placement cost model of ``--cpu-experts auto`` takes."""
    return {
        "device": "cuda" if profile.has_gpu else "cpu",
        "context_length": profile.context,
        "vram": profile.plan_vram,
        "ram": profile.plan_ram,
        "experts_per_layer": profile.experts_per_layer,
        "policy": profile.policy,
        "prefetch_depth": profile.prefetch_depth,
        "expert_bits": profile.expert_bits,
        "attn_bits": profile.attn_bits,
        **({} if profile.cpu_experts is None else {"cpu_experts": profile.cpu_experts}),
        **({} if profile.kv_bits == 16 else {"kv_bits": profile.kv_bits}),  # 16: the engine's default
        **({"machine": profile} if profile.has_gpu else {}),
    }


def _time_copy(device: torch.device, nbytes: int) -> float:
    """GB/s of one host-to-device copy of ``nbytes`` (pinned on CUDA; a memcpy on CPU), best of 3."""
    src = empty_host_buffer(nbytes, 1, device)
    src.fill_(1)
    dst = torch.empty_like(src, device=device)
    best = math.inf
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=is_cuda(device))
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def _largest_file(root: Path) -> Path | None:
    if root.is_file():
        return root
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    return max(files, key=lambda p: p.stat().st_size, default=None)


def _time_read(path: Path, limit: int) -> float | None:
    """GB/s reading up to ``limit`` bytes of ``path``, after asking the kernel to drop its cached
    pages (Linux; elsewhere a cached file reads faster than the disk)."""
    chunk = 8 * 2**20
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        done = 0
        start = time.perf_counter()
        while done < limit:
            data = f.read(min(chunk, limit - done))
            if not data:
                break
            done += len(data)
        seconds = time.perf_counter() - start
    return done / seconds / 1e9 if done and seconds > 0 else None


def probe_machine(
    pack_or_model: Path | None = None,
    device: str = "auto",
    copy_bytes: int = PROBE_COPY_BYTES,
    read_bytes: int = PROBE_READ_BYTES,
    compute: bool = False,
) -> dict[str, Any]:
    """What this machine has: RAM and CPU threads (psutil), the GPU's name and memory, a timed
    host-to-device copy of ``copy_bytes`` and, given a model or pack, a timed read of its largest
    file; with ``compute``, ``offload.measure.compute_figures`` too (``ram_gbps``,
    ``cpu_expert_gbps``, ``gpu_expert_gbps``, ``round_trip_ms``: about a second). Sizes in
    bytes, speeds in GB/s (None when not measured)."""
    torch_device = resolve_device(device)
    memory = psutil.virtual_memory()
    machine: dict[str, Any] = {
        "device": str(torch_device),
        "gpu": NO_GPU,
        "vram": 0,
        "vram_free": 0,
        "ram": memory.total,
        "ram_available": memory.available,
        "cpu_threads": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "h2d_gbps": None,
        "disk_gbps": None,
        "disk_file": None,
    }
    if is_cuda(torch_device):
        free, total = memory_info(torch_device)
        machine.update(gpu=device_name(torch_device), vram=total, vram_free=free)
    if copy_bytes > 0:
        machine["h2d_gbps"] = _time_copy(torch_device, copy_bytes)
    if pack_or_model is not None:
        path = _largest_file(Path(pack_or_model))
        if path is None:
            raise SettingError(f"{pack_or_model}: no file to time a disk read on")
        machine.update(disk_gbps=_time_read(path, read_bytes), disk_file=str(path))
    if compute:
        from offload.measure import compute_figures

        machine.update(compute_figures(torch_device))
    return machine


def best_shipped_profile(device: str | torch.device = "auto", vram_total: int | None = None) -> Profile:
    """CPU: cpu-only. CUDA: the shipped GPU profile with the largest card no larger than this one
    (``vram_total`` bytes; default: the card's reported total)."""
    torch_device = resolve_device(device) if isinstance(device, str) else device
    profiles = [load_profile(name) for name in shipped_profiles()]
    if not is_cuda(torch_device):
        for profile in profiles:
            if not profile.has_gpu:
                return profile
        raise SettingError(f"{PROFILES_DIR}: no shipped profile without a GPU")
    if vram_total is None:
        vram_total = memory_info(torch_device)[1]
    fitting = [p for p in profiles if p.has_gpu and p.vram_bytes * NOMINAL_SLACK <= vram_total]
    if not fitting:
        smallest = min((p for p in profiles if p.has_gpu), key=lambda p: p.vram_bytes, default=None)
        need = f"; the smallest is {smallest.name} ({smallest.vram})" if smallest else ""
        raise SettingError(f"no shipped GPU profile fits a card of {format_bytes(vram_total)}{need}")
    return max(fitting, key=lambda p: p.vram_bytes)


def does_it_fit(profile: Profile, machine: dict[str, Any]) -> None:
    """Raise SettingError when ``profile``'s plan needs a GPU, VRAM or RAM that ``machine``
    (``probe_machine``'s dict) lacks."""
    where = profile.source or profile.name or "profile"
    has_gpu = machine.get("gpu", NO_GPU) != NO_GPU and machine.get("vram", 0) > 0
    if profile.has_gpu and not has_gpu:
        raise SettingError(f"{where}: machine.gpu: needs a GPU ({profile.gpu}) and this machine has none")
    need = profile.plan_vram_bytes
    if need is not None:
        have, what = (machine["vram"], "VRAM") if profile.has_gpu else (machine["ram"], "RAM")
        if need > have:
            raise SettingError(
                f"{where}: plan.vram {profile.plan_vram} is more than this machine's {what} ({format_bytes(have)})"
            )
    need = profile.plan_ram_bytes
    if need is not None and need > machine["ram"]:
        raise SettingError(
            f"{where}: plan.ram {profile.plan_ram} is more than this machine's RAM ({format_bytes(machine['ram'])})"
        )


def machine_profile(machine: dict[str, Any], plan: Profile, name: str = "this-machine", comment: str = "") -> Profile:
    """``plan``'s [plan] with ``machine``'s (probe_machine) figures as the [machine] table; the
    memory bandwidth, which the probe does not measure, is the machine's ``mem_gbps`` when it
    has one, on a machine without a GPU the measured ``ram_gbps``, else ``plan``'s when its GPU
    is this machine's, else unstated; the host's figures
    for CPU experts (``ram_gbps``, ``cpu_expert_gbps``, ``gpu_expert_gbps``, ``round_trip_ms``) are the machine's
    when it has them, else unstated (another machine's would mislead); the attention kernel
    (``sdpa``) the machine's when it says, else ``plan``'s when its GPU is this machine's, else
    "fused"."""
    mem_gbps = machine.get("mem_gbps") or (plan.mem_gbps if plan.gpu == machine["gpu"] else None)
    if machine["gpu"] == NO_GPU and machine.get("ram_gbps"):  # a CPU's device memory is its RAM, as measured
        mem_gbps = machine["ram_gbps"]
    return replace(
        plan,
        name=name,
        gpu=machine["gpu"],
        vram=_size_text(machine["vram"]),
        ram=_size_text(machine["ram"]),
        h2d_gbps=round(machine["h2d_gbps"] or 0.0, 2),
        disk_gbps=round(machine["disk_gbps"] or 0.0, 2),
        cpu_threads=int(machine["cpu_threads"]),
        mem_gbps=mem_gbps,
        ram_gbps=machine.get("ram_gbps"),
        cpu_expert_gbps=machine.get("cpu_expert_gbps"),
        gpu_expert_gbps=machine.get("gpu_expert_gbps"),
        round_trip_ms=machine.get("round_trip_ms"),
        sdpa=machine.get("sdpa") or (plan.sdpa if plan.gpu == machine["gpu"] else "fused"),
        comment=comment or plan.comment,
        source="",
    )


def _size_text(n: int) -> str:
    """Bytes as a short size string that ``parse_bytes`` reads back, rounded down ("0",
    "23.5GiB", "812MiB", "4096B")."""
    if n >= 2**30:
        return f"{math.floor(n / 2**30 * 100) / 100:g}GiB"
    if n >= 2**20:
        return f"{n // 2**20}MiB"
    return f"{n}B" if n else "0"


__all__ = [
    "PROFILES_DATA_DIR", "PROFILES_DIR", "Profile", "ProfileEntry", "best_shipped_profile", "does_it_fit",
    "engine_kwargs", "find_profiles_dir", "list_profiles", "load_profile", "machine_profile", "probe_machine",
    "profile_dirs", "profile_from_dict", "profile_toml", "save_profile", "shipped_profiles", "user_profiles",
    "user_profiles_dir",
]
