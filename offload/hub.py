"""Find a Hugging Face hub model (``mistralai/Mixtral-8x7B-Instruct-v0.1``) on local disk.

What it is: ``resolve_model(name_or_path)`` turns what a user typed into a checkpoint directory.
An existing directory is returned as is; a hub id is looked up in the huggingface_hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``) in that library's layout::

    models--{org}--{name}/refs/{revision}        holds a commit hash
    models--{org}--{name}/snapshots/{hash}/      the files of that commit

What it is not: it never touches the network unless asked (``download=True``, which calls
``huggingface_hub.snapshot_download`` for the files this engine reads), and it does not check
that the directory holds a usable checkpoint (the loaders do that, naming the file at fault).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from offload.errors import ConfigError

__all__ = ["DOWNLOAD_PATTERNS", "hub_cache_dir", "resolve_model"]

# The files the engine reads: configs, tokenizer, safetensors shards and their index.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def resolve_model(name_or_path: str | os.PathLike, revision: str = "main", *,
                  download: bool = False) -> Path:
    """The local directory of a model given as a directory or a hub id.

    ``revision`` is a branch or tag (resolved through ``refs/``) or a full commit hash. A hub id
    that is not in the cache is a ConfigError naming the cache and the command that fetches it,
    unless ``download`` is set, in which case the model's files are downloaded into the cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ConfigError(f"{name}: is a file, not a model directory")
    if not _REPO_ID.fullmatch(name) or ".." in name:
        raise ConfigError(f"{name}: no such directory (and not a Hugging Face model id "
                          "like org/name)")
    cache = hub_cache_dir()
    found = _cached_snapshot(cache, name, revision)
    if found is not None:
        return found
    if download:
        return _download(name, revision, cache)
    rev = "" if revision == "main" else f" --revision {revision}"
    at = "" if revision == "main" else f" (revision {revision})"
    raise ConfigError(f"{name}: is not a directory and not in the Hugging Face cache at "
                      f"{cache}{at}; download it with `huggingface-cli download {name}{rev}` "
                      "or pass the checkpoint's directory")


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


def _download(repo_id: str, revision: str, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{repo_id}: downloading needs the huggingface_hub package "
                          "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise ConfigError(f"{repo_id}: download failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
