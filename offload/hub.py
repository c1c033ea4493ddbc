"""Find a Hugging Face hub model (``mistralai/Mixtral-8x7B-Instruct-v0.1``) on local disk, or fetch it.

What it is: ``resolve_model(name_or_path)`` turns what a user typed into a checkpoint directory.
An existing directory is returned as is; a hub id is looked up in the huggingface_hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``) in that library's layout::

    models--{org}--{name}/refs/{revision}        holds a commit hash
    models--{org}--{name}/snapshots/{hash}/      the files of that commit

With ``download=True`` a hub id that is not in the cache, or whose download was cut short (the
tree listing huggingface_hub keeps names files the snapshot lacks, or the snapshot holds no
``*.safetensors`` at all, as after ``resolve_config``), is fetched into that cache from
``$HF_ENDPOINT`` (default https://huggingface.co), only the files this engine reads
(``DOWNLOAD_PATTERNS``), in this order: the repo's file listing with sizes (one API call), then
config.json alone, checked as ``offload.config.ModelConfig`` checks it (a refused architecture,
DeepseekV3ForCausalLM say, stops here: no weight file is requested), then, with ``on_download``
told first (a ``Download``: what, from where, to where, how many files and bytes still to fetch),
the rest by ``huggingface_hub.snapshot_download``; huggingface_hub draws its own tqdm bars on
stderr only when the caller passes ``progress_bars=True``. ``resolve_config`` is the same for a
command that reads only config.json (``offload info``): a cached snapshot as it is, weights or
not, else config.json alone fetched and checked, never a weight. Network off (``HF_HUB_OFFLINE``),
an unreachable hub, a missing, private or gated repo, an unknown revision, a repo without
config.json, one without safetensors and one without a tokenizer (tokenizer.model or
tokenizer.json: ``TOKENIZER_FILES``, looked for in the listing) each give a one-line ConfigError
naming the model id.

What it is not: it never touches the network for a directory or a model already in the cache, nor
at all without ``download=True``; it never prints; and apart from a fetched config.json it does not
check that a directory holds a usable checkpoint (the loaders do that, naming the file at fault).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from importlib.util import find_spec
from pathlib import Path, PurePath
from typing import Callable, Optional

from offload.errors import ConfigError

__all__ = ["CONFIG_FILE", "DOWNLOAD_PATTERNS", "TOKENIZER_FILES", "Download", "DownloadListener", "fetch_command",
           "hub_cache_dir", "hub_endpoint", "is_hub_id", "resolve_config", "resolve_model"]

# The files the engine reads: configs (config.json, generation_config.json), the tokenizer
# (tokenizer.model and/or tokenizer.json, tokenizer_config.json, special_tokens_map.json,
# chat_template.jinja), safetensors shards and their index.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # a checkpoint needs one (offload.tokenizer)

CONFIG_FILE = "config.json"  # all that `offload info` reads
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # what huggingface_hub reads

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HTTP_CLIENTS = {"httpx2", "httpx", "requests", "urllib3"}  # whose own errors mean "no answer"


@dataclass(frozen=True)
class Download:
    """A download about to start: which model, from where, into which cache, and how much."""

    repo_id: str
    revision: str
    endpoint: str
    cache: Path
    files: int  # the files still to fetch (config.json, fetched and checked first, among them)
    size: int  # their bytes, as the hub's listing reports them


DownloadListener = Callable[[Download], None]


def hub_cache_dir() -> Path:
    """The huggingface_hub cache directory, from the same environment variables it reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def hub_endpoint() -> str:
    """The hub to download from: ``$HF_ENDPOINT``, read when called, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def fetch_command(repo_id: str, revision: str = "main") -> str:
    """The shell command that downloads the files this engine reads into the cache."""
    cli = "hf" if find_spec("huggingface_hub.cli") else "huggingface-cli"  # `hf` since 0.34
    rev = "" if revision == "main" else f" --revision {revision}"
    include = " ".join(f"'{p}'" if "*" in p else p for p in DOWNLOAD_PATTERNS)
    return f"{cli} download {repo_id}{rev} --include {include}"


def resolve_model(name_or_path: str | os.PathLike, revision: str = "main", *, download: bool = False,
                  on_download: Optional[DownloadListener] = None, progress_bars: bool = False) -> Path:
    """The local directory of a model given as a directory or a hub id.

    ``revision`` is a branch or tag (resolved through ``refs/``) or a full commit hash. A hub id
    that is not in the cache is a ConfigError naming the cache and the command that fetches it,
    unless ``download`` is set: then its files are downloaded into the cache (see the module
    docstring for ``on_download`` and ``progress_bars``).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = _hub_name(name_or_path, path)
    cache = hub_cache_dir()
    found = _cached_snapshot(cache, name, revision)
    missing = (_missing_files(cache, name, found) or _no_weights(found)) if found is not None and download else []
    if found is not None and not missing:
        return found
    if found is None:
        at = "" if revision == "main" else f" (revision {revision})"
        state = f"is not a directory and not in the Hugging Face cache at {cache}{at}"
    else:
        state = f"is only partly in the Hugging Face cache at {found} ({missing[0]} missing)"
    if not download:
        raise ConfigError(f"{name}: {state}; download it with `{fetch_command(name, revision)}` "
                          "or pass the checkpoint's directory")
    return _download(name, revision, cache, state, on_download, progress_bars)


def is_hub_id(text: str) -> bool:
    """Is ``text`` shaped like a hub model id ("org/name", or "name")?"""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def _hub_name(name_or_path: str | os.PathLike, path: Path) -> str:
    """The hub id that ``name_or_path`` names (it is no directory), or a ConfigError."""
    name = name_or_path.as_posix() if isinstance(name_or_path, PurePath) else str(name_or_path)
    if path.exists():
        raise ConfigError(f"{name}: is a file, not a model directory")
    if not is_hub_id(name):
        raise ConfigError(f"{name}: no such directory (and not a Hugging Face model id "
                          "like org/name)")
    return name


def resolve_config(name_or_path: str | os.PathLike, revision: str = "main", *, download: bool = True) -> Path:
    """A directory holding the model's config.json, for a command that reads nothing else
    (``offload info``): a directory as it is; a hub id's cached snapshot when it holds
    config.json (its weights or not); else, with ``download``, config.json alone fetched from the
    hub into the cache (the snapshot ``resolve_model`` completes later) and checked as
    ``ModelConfig`` checks it: never a weight file. Without ``download``, a hub id not cached is
    the ConfigError ``resolve_model`` gives."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = _hub_name(name_or_path, path)
    cache = hub_cache_dir()
    found = _cached_snapshot(cache, name, revision)
    if found is not None and (found / CONFIG_FILE).is_file():
        return found
    if not download:
        return resolve_model(name, revision)
    at = "" if revision == "main" else f" (revision {revision})"
    _require_hub(name)
    _check_online(name, revision, f"is not a directory and not in the Hugging Face cache at {cache}{at}")
    endpoint = hub_endpoint()
    config = _fetch_config(name, revision, cache, endpoint)
    _check_config(name, config, endpoint, after="")
    return config.parent


def _cached_snapshot(cache: Path, repo_id: str, revision: str) -> Path | None:
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return None
    commit = None
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{ref}: cannot read ({e})") from None
    elif _COMMIT.fullmatch(revision):
        commit = revision
    if not commit:
        return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _missing_files(cache: Path, repo_id: str, snapshot: Path) -> list[str]:
    """The engine's files that the commit's cached tree listing names but the snapshot lacks (a
    download cut short); empty when complete or when there is no listing to compare with."""
    try:
        from huggingface_hub import get_cached_repo_tree  # recent huggingface_hub only
        files = get_cached_repo_tree(repo_id, revision=snapshot.name, cache_dir=cache)
    except Exception:  # no listing (an older download, another tool): trust the snapshot
        return []
    names = [f.path for f in files if _wanted(f.path)]
    return sorted(n for n in names if not (snapshot / n).exists())


def _no_weights(snapshot: Path) -> list[str]:
    """["*.safetensors"] when the snapshot holds no weights at all (``resolve_config`` fetched
    only config.json, or a download stopped before the first shard), else []."""
    return [] if any(snapshot.glob("*.safetensors")) else ["*.safetensors"]


def _wanted(filename: str) -> bool:
    return any(fnmatch(filename, pattern) for pattern in DOWNLOAD_PATTERNS)


def _download(repo_id: str, revision: str, cache: Path, state: str,
              on_download: Optional[DownloadListener], progress_bars: bool) -> Path:
    """The listing, then config.json alone (checked), then the rest: a refused model costs one
    API call and one small file, never a weight."""
    _require_hub(repo_id)
    _check_online(repo_id, revision, state)
    endpoint = hub_endpoint()
    files = _remote_files(repo_id, revision, endpoint)
    if not any(name.endswith(".safetensors") for name, _ in files):
        raise ConfigError(f"{repo_id}: has no safetensors weights on {endpoint} "
                          "(offload reads only safetensors checkpoints)")
    if CONFIG_FILE not in dict(files):
        raise ConfigError(f"{repo_id}: has no {CONFIG_FILE} on {endpoint}; no weights downloaded")
    if not any(name in dict(files) for name in TOKENIZER_FILES):
        raise ConfigError(f"{repo_id}: has no {' or '.join(TOKENIZER_FILES)} on {endpoint} (offload needs "
                          "the model's tokenizer); no weights downloaded")
    had = _cached_snapshot(cache, repo_id, revision)
    to_fetch = [(n, size) for n, size in files if had is None or not (had / n).exists()]
    config = _fetch_config(repo_id, revision, cache, endpoint)
    _check_config(repo_id, config, endpoint, after="; no weights downloaded")
    if on_download is not None:
        on_download(Download(repo_id, revision, endpoint, cache, len(to_fetch),
                             sum(size for _, size in to_fetch)))
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
            allow_patterns=DOWNLOAD_PATTERNS, tqdm_class=None if progress_bars else _silent_bars(),
        )
    except Exception as e:  # network, auth, disk: one line for the user
        raise ConfigError(_failure(repo_id, revision, endpoint, e)) from None
    return Path(snapshot)


def _check_online(repo_id: str, revision: str, state: str) -> None:
    offline = _offline_variable()
    if offline is not None:
        raise ConfigError(f"{repo_id}: {state}; the network is off ({offline} is set), so fetch "
                          f"it with `{offline}=0 {fetch_command(repo_id, revision)}` or pass the "
                          "checkpoint's directory")


def _fetch_config(repo_id: str, revision: str, cache: Path, endpoint: str) -> Path:
    """config.json alone, downloaded into the cache's snapshot of ``revision``; its path."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache, endpoint=endpoint,
                                    tqdm_class=_silent_bars()))
    except Exception as e:
        if type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            raise ConfigError(f"{repo_id}: has no {CONFIG_FILE} on {endpoint}") from None
        raise ConfigError(_failure(repo_id, revision, endpoint, e)) from None


def _check_config(repo_id: str, path: Path, endpoint: str, after: str) -> None:
    """``ModelConfig``'s checks on a fetched config.json, its errors naming the repo, with
    ``after`` appended (what was not downloaded)."""
    import json

    from offload.config import ModelConfig

    source = f"{repo_id}: {CONFIG_FILE} on {endpoint}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: unreadable ({type(exc).__name__}){after}") from None
    try:
        ModelConfig.from_dict(raw, source=source)
    except ConfigError as exc:
        raise type(exc)(f"{exc}{after}") from None


def _require_hub(repo_id: str) -> None:
    if find_spec("huggingface_hub") is None:
        raise ConfigError(f"{repo_id}: downloading needs the huggingface_hub package "
                          "(pip install huggingface_hub)")


def _offline_variable() -> str | None:
    """The variable that turns huggingface_hub's network off, read now (huggingface_hub itself
    reads it once, at import: that counts too)."""
    from huggingface_hub import constants

    for var in OFFLINE_VARIABLES:
        if os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return OFFLINE_VARIABLES[0] if getattr(constants, "HF_HUB_OFFLINE", False) else None


def _remote_files(repo_id: str, revision: str, endpoint: str) -> list[tuple[str, int]]:
    """(name, bytes) of every file of the repo at ``revision`` that the engine reads."""
    from huggingface_hub import HfApi, constants

    timeout = getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision,
                                                   files_metadata=True, timeout=timeout)
    except Exception as e:
        raise ConfigError(_failure(repo_id, revision, endpoint, e)) from None
    return [(s.rfilename, s.size or 0) for s in info.siblings or [] if _wanted(s.rfilename)]


def _failure(repo_id: str, revision: str, endpoint: str, error: Exception) -> str:
    """One line on why a download from the hub failed."""
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    if isinstance(error, GatedRepoError):
        return (f"{repo_id}: is gated on {endpoint}; accept its terms at {endpoint}/{repo_id} "
                "and set HF_TOKEN to a token of that account")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{repo_id}: no such directory, and no such model on {endpoint} (if it is "
                "private, set HF_TOKEN to a token that can read it)")
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id}: no revision {revision!r} on {endpoint}"
    detail = f"{type(error).__name__}: {_first_line(error)}"
    if isinstance(error, HfHubHTTPError):
        return f"{repo_id}: download from {endpoint} failed ({detail})"
    if type(error).__module__.split(".")[0] in _HTTP_CLIENTS:
        return f"{repo_id}: cannot reach {endpoint} to download it ({detail}); check the network"
    return f"{repo_id}: download from {endpoint} failed ({detail})"


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no detail"


def _silent_bars():
    """A tqdm class for huggingface_hub that never draws: the caller asked for no bars."""
    from huggingface_hub.utils import tqdm

    class SilentBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentBar
