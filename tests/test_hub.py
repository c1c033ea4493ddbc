"""offload.hub: hub ids resolved through a fake huggingface_hub cache, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.errors import ConfigError
from offload.hub import hub_cache_dir, resolve_model

REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MAIN = "a" * 40
OTHER = "b" * 40


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    repo = root / "models--mistralai--Mixtral-8x7B-Instruct-v0.1"
    for commit, ref in ((MAIN, "main"), (OTHER, "v2")):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text('{"model_type": "mixtral"}')
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes no newline
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_hub_id_resolves_to_snapshot(cache):
    path = resolve_model(REPO)
    assert path == cache / "models--mistralai--Mixtral-8x7B-Instruct-v0.1" / "snapshots" / MAIN
    assert (path / "config.json").is_file()


def test_other_revision_and_commit(cache):
    assert resolve_model(REPO, revision="v2").name == OTHER
    assert resolve_model(REPO, revision=OTHER).name == OTHER


def test_missing_id_is_one_clear_line(cache):
    with pytest.raises(ConfigError) as e:
        resolve_model("mistralai/Nope-7B")
    msg = str(e.value)
    assert "\n" not in msg
    assert "not a directory and not in the Hugging Face cache at" in msg
    assert str(cache) in msg and "huggingface-cli download mistralai/Nope-7B" in msg
    with pytest.raises(ConfigError, match="--revision v9"):
        resolve_model(REPO, revision="v9")


def test_directory_passes_through(tmp_path, cache):
    d = tmp_path / "mixtral"
    d.mkdir()
    assert resolve_model(d) == d
    assert resolve_model(str(d)) == d
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        resolve_model(f)


def test_relative_directory_wins_over_hub_id(tmp_path, cache, monkeypatch):
    (tmp_path / "mistralai" / "Mixtral-8x7B-Instruct-v0.1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == Path(REPO)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub_cache_dir() == Path.home() / ".cache" / "huggingface" / "hub"


def test_agrees_with_huggingface_hub(cache):
    """huggingface_hub itself, offline, finds the same snapshot."""
    from huggingface_hub import snapshot_download

    got = snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert Path(got) == resolve_model(REPO)
