"""Find a Hugging Face hub model (``mistralai/Mixtral-8x7B-Instruct-v0.1``) on local disk, or fetch it.

What it is: ``resolve_model(name_or_path)`` turns what a user typed into a checkpoint directory.
An existing directory is returned as is; a hub id is looked up in the huggingface_hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``) in that library's layout::

    models--{org}--{name}/refs/{revision}        holds a commit hash
    models--{org}--{name}/snapshots/{hash}/      the files of that commit

With ``download=True`` a hub id that is not in the cache, or whose download was cut short (the
tree listing huggingface_hub keeps names files the snapshot lacks), is fetched into that cache
from ``$HF_ENDPOINT`` (default https://huggingface.co) by ``huggingface_hub.snapshot_download``,
only the files this engine reads (``DOWNLOAD_PATTERNS``). Just before the transfer starts,
``on_download`` gets a ``Download`` (what, from where, to where, how many bytes); huggingface_hub
draws its own tqdm bars on stderr only when the caller passes ``progress_bars=True``. Network off
(``HF_HUB_OFFLINE``), an unreachable hub, a missing, private or gated repo, an unknown revision and
a repo without safetensors each give a one-line ConfigError naming the model id.

What it is not: it never touches the network for a directory or a model already in the cache, nor
at all without ``download=True``; it never prints; and it does not check that a directory holds a
usable checkpoint (the loaders do that, naming the file at fault).
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

__all__ = ["DOWNLOAD_PATTERNS", "Download", "DownloadListener", "fetch_command", "hub_cache_dir", "hub_endpoint",
           "resolve_model"]

# The files the engine reads: configs, tokenizer, safetensors shards and their index.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]

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
    files: int
    size: int  # bytes, as the hub reports them


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
    name = name_or_path.as_posix() if isinstance(name_or_path, PurePath) else str(name_or_path)
    if path.exists():
        raise ConfigError(f"{name}: is a file, not a model directory")
    if not _REPO_ID.fullmatch(name) or ".." in name:
        raise ConfigError(f"{name}: no such directory (and not a Hugging Face model id "
                          "like org/name)")
    cache = hub_cache_dir()
    found = _cached_snapshot(cache, name, revision)
    missing = _missing_files(cache, name, found) if found is not None and download else []
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


def _wanted(filename: str) -> bool:
    return any(fnmatch(filename, pattern) for pattern in DOWNLOAD_PATTERNS)


def _download(repo_id: str, revision: str, cache: Path, state: str,
              on_download: Optional[DownloadListener], progress_bars: bool) -> Path:
    _require_hub(repo_id)
    offline = _offline_variable()
    if offline is not None:
        raise ConfigError(f"{repo_id}: {state}; the network is off ({offline} is set), so fetch "
                          f"it with `{offline}=0 {fetch_command(repo_id, revision)}` or pass the "
                          "checkpoint's directory")
    endpoint = hub_endpoint()
    files = _remote_files(repo_id, revision, endpoint)
    if not any(name.endswith(".safetensors") for name, _ in files):
        raise ConfigError(f"{repo_id}: has no safetensors weights on {endpoint} "
                          "(offload reads only safetensors checkpoints)")
    if on_download is not None:
        on_download(Download(repo_id, revision, endpoint, cache, len(files),
                             sum(size for _, size in files)))
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
            allow_patterns=DOWNLOAD_PATTERNS, tqdm_class=None if progress_bars else _silent_bars(),
        )
    except Exception as e:  # network, auth, disk: one line for the user
        raise ConfigError(_failure(repo_id, revision, endpoint, e)) from None
    return Path(snapshot)


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
