"""offload.hub: hub ids resolved through a test-made huggingface_hub cache, offline, and
downloaded for real by huggingface_hub from a local HTTP server that answers as the hub does."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from offload.errors import ConfigError
from offload.hub import hub_cache_dir, resolve_model
from tests.model_builder import WINDOWED

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
        (snap / "model.safetensors").write_bytes(b"")  # a snapshot with weights: complete
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
    assert str(cache) in msg and "`hf download mistralai/Nope-7B --include '*.json'" in msg
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


# --- downloads, from a local server that speaks the part of the hub API snapshot_download uses ---

REMOTE = "tiny-org/tiny-mixtral"
COMMIT = "c" * 40
PROMPT = "def parse_args(argv):"
NOT_READ = {"consolidated.00.pt": b"pickle, never fetched", "README.md": b"# tiny"}

_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


class FakeHub(ThreadingHTTPServer):
    """Repos held in memory, one commit each, served as huggingface.co serves them to
    ``snapshot_download``: model info, the tree listing, and HEAD/GET on ``resolve`` URLs."""

    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos = repos
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_GET(self):
        self._answer(with_body=True)

    def do_HEAD(self):
        self._answer(with_body=False)

    def log_message(self, *args):
        pass

    def _answer(self, with_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(f"{self.command} {path}")
        api, resolve = _API.fullmatch(path), _RESOLVE.fullmatch(path)
        match = api or resolve
        files = self.server.repos.get(match["repo"]) if match else None
        if files is None:
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, with_body)
        if match["rev"] not in ("main", COMMIT):
            return self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, with_body)
        if api:
            return self._send(200, json.dumps(_listing(match["repo"], files, api["kind"])).encode(),
                              {"Content-Type": "application/json"}, with_body)
        if resolve["file"] not in files:
            return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT},
                              with_body)
        data = files[resolve["file"]]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        self._send(200, data, headers, with_body)

    def _send(self, status: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)


def _listing(repo: str, files: dict[str, bytes], kind: str):
    """The JSON of /api/models/{repo}/revision/{rev}?blobs=True or of /api/models/{repo}/tree/{rev}."""
    def oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    if kind == "revision":
        siblings = [{"rfilename": n, "size": len(d), "blobId": oid(d)} for n, d in files.items()]
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
    return [{"type": "file", "path": n, "size": len(d), "oid": oid(d)} for n, d in files.items()]


def _serve(repos: dict[str, dict[str, bytes]]):
    server = FakeHub(repos)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture()
def online(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, with the network on (whatever the environment says)."""
    import huggingface_hub

    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return root


REFUSED = "deepseek-org/tiny-deepseek-v3"  # the same files, config.json naming an architecture offload refuses
JSON_REMOTE = "qwen-org/tiny-json-tokenizer"  # a tokenizer.json checkpoint, as Qwen's and OLMoE's repos are
NO_TOKENIZER = "tiny-org/no-tokenizer"  # REMOTE without its tokenizer.model
# What Qwen's repos hold besides tokenizer.json: vocab.json matches *.json (fetched, never read), merges.txt not.
SLOW_TOKENIZER = {"vocab.json": b"{}", "merges.txt": b"#version: 0.2\n"}


@pytest.fixture(scope="module")
def json_checkpoint(tmp_path_factory) -> Path:
    from tests.test_tokenizer_json import write_json_checkpoint

    return write_json_checkpoint(tmp_path_factory.mktemp("hub-json") / "qwen-style")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture()
def hub(online, model_dirs, json_checkpoint, monkeypatch):
    """A local hub holding REMOTE (the windowed test checkpoint, plus files the engine never
    reads), REFUSED (the same, as DeepseekV3ForCausalLM), JSON_REMOTE (a tokenizer.json
    checkpoint, no tokenizer.model) and NO_TOKENIZER, with HF_ENDPOINT pointing at it."""
    files = _files(model_dirs[WINDOWED.name])
    deepseek = dict(json.loads(files["config.json"]), architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    server, thread = _serve({
        REMOTE: {**files, **NOT_READ},
        REFUSED: {**files, "config.json": json.dumps(deepseek).encode()},
        JSON_REMOTE: {**_files(json_checkpoint), **SLOW_TOKENIZER, **NOT_READ},
        NO_TOKENIZER: {n: d for n, d in files.items() if n != "tokenizer.model"},
    })
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def run_cli(*args: str):
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, list(args))


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output)
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_download_fetches_what_the_engine_reads(hub, online, model_dirs, capfd):
    seen = []
    path = resolve_model(REMOTE, download=True, on_download=seen.append)
    assert path == online / "models--tiny-org--tiny-mixtral" / "snapshots" / COMMIT
    wanted = {n: d for n, d in hub.repos[REMOTE].items() if n not in NOT_READ}
    assert {p.name for p in path.iterdir()} == set(wanted)
    assert all((path / n).read_bytes() == d for n, d in wanted.items())
    (download,) = seen
    assert (download.repo_id, download.revision, download.endpoint, download.cache) == (REMOTE, "main", hub.url, online)
    assert (download.files, download.size) == (len(wanted), sum(map(len, wanted.values())))
    assert capfd.readouterr().err == ""  # no bars unless asked for
    assert not any(n in r for r in hub.requests for n in NOT_READ)

    requests = len(hub.requests)
    assert resolve_model(REMOTE, download=True, on_download=seen.append) == path
    assert len(hub.requests) == requests and len(seen) == 1  # cached: no network at all


def test_interrupted_download_is_completed(hub, online):
    path = resolve_model(REMOTE, download=True)
    shard = sorted(path.glob("*.safetensors"))[3]
    shard.unlink()  # as if the download had been stopped before this file
    assert resolve_model(REMOTE) == path  # without download: the loader will name the file
    seen = []
    assert resolve_model(REMOTE, download=True, on_download=seen.append) == path
    assert shard.read_bytes() == hub.repos[REMOTE][shard.name] and len(seen) == 1


def test_cli_downloads_then_generates_as_from_the_directory(hub, online, model_dirs):
    args = ["-p", PROMPT, "-n", "8", "--temp", "0", "--dtype", "float32", "--json", "--ignore-eos"]
    fetched = run_cli("generate", REMOTE, *args)
    assert fetched.exit_code == 0, fetched.output
    first = fetched.stderr.splitlines()[0]
    files = len(hub.repos[REMOTE]) - len(NOT_READ)
    assert first.startswith(f"downloading {REMOTE} to {online} ({files} files, ") and first.endswith(f"from {hub.url})")
    assert "100%" in fetched.stderr  # huggingface_hub's own bar, which the CLI asks for
    direct = run_cli("generate", str(model_dirs[WINDOWED.name]), *args)
    assert direct.exit_code == 0, direct.output
    assert json.loads(fetched.stdout)["tokens"] == json.loads(direct.stdout)["tokens"]
    again = run_cli("generate", REMOTE, *args)
    assert again.exit_code == 0 and "downloading" not in again.stderr
    assert json.loads(again.stdout)["tokens"] == json.loads(direct.stdout)["tokens"]


def test_cli_offline_and_not_cached_is_one_line(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line(run_cli("generate", "some-org/Some-Model", "-p", "hi"))
    assert line.startswith("error: some-org/Some-Model: is not a directory and not in the Hugging Face cache at")
    assert "the network is off (HF_HUB_OFFLINE is set)" in line
    assert "`HF_HUB_OFFLINE=0 hf download some-org/Some-Model --include" in line


def test_cli_missing_repo_is_one_line(hub):
    line = one_line(run_cli("generate", "tiny-org/no-such-model", "-p", "hi"))
    assert f"tiny-org/no-such-model: no such directory, and no such model on {hub.url}" in line
    assert hub.requests == ["GET /api/models/tiny-org/no-such-model/revision/main"]


def test_unknown_revision_and_no_safetensors(hub, online):
    with pytest.raises(ConfigError, match=f"{REMOTE}: no revision 'v9' on {re.escape(hub.url)}$"):
        resolve_model(REMOTE, revision="v9", download=True)
    hub.repos["tiny-org/pickles"] = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    with pytest.raises(ConfigError, match="tiny-org/pickles: has no safetensors weights"):
        resolve_model("tiny-org/pickles", download=True)
    assert not (online / "models--tiny-org--pickles").exists()


def test_cli_unreachable_hub_is_one_line(online, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    line = one_line(run_cli("generate", "some-org/Some-Model", "-p", "hi"))
    assert f"some-org/Some-Model: cannot reach {url} to download it (" in line and "check the network" in line


def test_a_snapshot_without_weights_is_incomplete_for_a_download(cache):
    """config.json alone (what `offload info` fetched) is no model to run: without download the
    snapshot is returned (the loader names what is missing); with it, the weights are fetched."""
    snap = resolve_model(REPO)
    (snap / "model.safetensors").unlink()
    assert resolve_model(REPO) == snap
    with pytest.raises(ConfigError, match=r"only partly in the Hugging Face cache at .* \(\*\.safetensors missing\)"):
        resolve_model(REPO, download=True)  # offline: the line says what is missing


def test_cached_id_never_touches_the_network(cache, monkeypatch):
    """Network on but unreachable: a cached id still resolves, so nothing was asked."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model(REPO, download=True) == resolve_model(REPO)


# --- config.json first: checked before any weight; `info` fetches nothing else ---


def _weights_asked(hub) -> list[str]:
    return [r for r in hub.requests if r.endswith((".safetensors", "tokenizer.model", "tokenizer.json"))]


def test_download_checks_the_config_and_knows_the_size_before_any_weight(hub, online):
    seen = []

    def announce(download):
        seen.append((download, list(hub.requests)))  # what the hub had been asked when told

    path = resolve_model(REMOTE, download=True, on_download=announce)
    ((download, asked),) = seen
    assert f"GET /{REMOTE}/resolve/main/config.json" in asked  # fetched (and checked) first
    assert asked[0] == f"GET /api/models/{REMOTE}/revision/main"  # the listing with sizes, before it
    assert not any(r.endswith(".safetensors") for r in asked)  # no weight before the announcement
    wanted = {n: d for n, d in hub.repos[REMOTE].items() if n not in NOT_READ}
    assert (download.files, download.size) == (len(wanted), sum(map(len, wanted.values())))
    assert _weights_asked(hub) and (path / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("command", ["info", "generate", "convert"])
def test_a_refused_architecture_is_refused_after_config_json_alone(hub, online, tmp_path, command):
    args = {"info": ["info", REFUSED], "generate": ["generate", REFUSED, "-p", "hi"],
            "convert": ["convert", REFUSED, str(tmp_path / "pack")]}[command]
    result = run_cli(*args)
    line = one_line(result)
    assert f"error: {REFUSED}: config.json on {hub.url}: architecture 'DeepseekV3ForCausalLM' is not supported" in line
    assert "downloading" not in result.stderr  # nothing announced: nothing to download
    assert f"GET /{REFUSED}/resolve/main/config.json" in hub.requests
    assert _weights_asked(hub) == [], hub.requests  # no weight file was requested
    if command != "info":
        assert line.endswith("; no weights downloaded")
    assert not (tmp_path / "pack").exists()
    snapshots = list((online / "models--deepseek-org--tiny-deepseek-v3" / "snapshots").iterdir())
    assert [p.name for s in snapshots for p in s.iterdir()] == ["config.json"]


def test_info_of_a_hub_id_fetches_config_json_alone_then_generate_completes_it(hub, online, model_dirs):
    fetched = run_cli("info", REMOTE, "--json")
    assert fetched.exit_code == 0, fetched.output
    direct = run_cli("info", str(model_dirs[WINDOWED.name]), "--json")
    plan, same = json.loads(fetched.stdout), json.loads(direct.stdout)
    assert plan["model"] == REMOTE and plan["config"] == same["config"]
    assert plan["experts_total_bytes"] == same["experts_total_bytes"] and plan["min_vram_bytes"] == same["min_vram_bytes"]
    assert all(r.endswith("/config.json") for r in hub.requests), hub.requests  # HEAD and GET of config.json only
    snapshot = online / "models--tiny-org--tiny-mixtral" / "snapshots" / COMMIT
    assert [p.name for p in snapshot.iterdir()] == ["config.json"]
    asked = len(hub.requests)
    assert run_cli("info", REMOTE).exit_code == 0 and len(hub.requests) == asked  # cached: no network

    args = ["-p", PROMPT, "-n", "4", "--temp", "0", "--dtype", "float32", "--json", "--ignore-eos"]
    completed = run_cli("generate", REMOTE, *args)
    assert completed.exit_code == 0, completed.output
    rest = {n: d for n, d in hub.repos[REMOTE].items() if n not in NOT_READ and n != "config.json"}
    assert completed.stderr.splitlines()[0].startswith(f"downloading {REMOTE} to {online} ({len(rest)} files, ")
    assert {p.name for p in snapshot.iterdir()} == set(rest) | {"config.json"}
    reference = run_cli("generate", str(model_dirs[WINDOWED.name]), *args)
    assert json.loads(completed.stdout)["tokens"] == json.loads(reference.stdout)["tokens"]


def test_info_of_a_hub_id_in_a_test_made_cache_works_offline(model_dirs, tmp_path, monkeypatch):
    """HF_HOME/hub holding the snapshot (config.json alone suffices), the network off."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "home" / "hub" / "models--acme--tiny-mixtral"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT / "config.json").write_bytes((model_dirs[WINDOWED.name] / "config.json").read_bytes())
    result = run_cli("info", "acme/tiny-mixtral", "--json", "--vram", "1GiB")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == "acme/tiny-mixtral" and out["experts_total"] == 3 * 8 and out["context"] == 512
    line = one_line(run_cli("info", "acme/absent"))
    assert "acme/absent: is not a directory and not in the Hugging Face cache" in line
    assert "the network is off (HF_HUB_OFFLINE is set)" in line


def test_convert_takes_a_hub_id(hub, online, tmp_path):
    from offload.pack import Pack

    out = tmp_path / "pack"
    result = run_cli("convert", REMOTE, str(out), "--expert-bits", "4")
    assert result.exit_code == 0, result.output
    assert f"downloading {REMOTE} to {online}" in result.stderr and _weights_asked(hub)
    assert result.stdout.startswith(f"wrote {out}: ")
    with Pack(out) as pack:
        assert pack.layout.fmt.name == "nf4-dq" and len(pack.manifest["experts"]) == 3 * 8  # --expert-bits 4


# --- tokenizer.json checkpoints (Qwen, OLMoE): fetched with their tokenizer files; none is refused ---


def test_a_tokenizer_json_checkpoint_downloads_and_generates(hub, online, json_checkpoint):
    from offload.tokenizer import JsonTokenizer, Tokenizer

    path = resolve_model(JSON_REMOTE, download=True)
    wanted = {n for n in hub.repos[JSON_REMOTE] if n not in NOT_READ and n != "merges.txt"}
    assert {p.name for p in path.iterdir()} == wanted
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} <= wanted
    tok, source = Tokenizer.from_dir(path), Tokenizer.from_dir(json_checkpoint)
    assert isinstance(tok, JsonTokenizer) and tok.bos_id is None
    assert tok.encode(PROMPT, bos=True) == source.encode(PROMPT, bos=True)
    args = ["-p", PROMPT, "-n", "4", "--temp", "0", "--dtype", "float32", "--json", "--ignore-eos", "--chat"]
    fetched, direct = run_cli("generate", JSON_REMOTE, *args), run_cli("generate", str(json_checkpoint), *args)
    assert fetched.exit_code == 0 and direct.exit_code == 0, (fetched.output, direct.output)
    assert json.loads(fetched.stdout)["prompt_tokens"] == json.loads(direct.stdout)["prompt_tokens"]
    assert json.loads(fetched.stdout)["tokens"] == json.loads(direct.stdout)["tokens"]


def test_a_repo_without_a_tokenizer_is_refused_before_any_download(hub, online):
    with pytest.raises(ConfigError) as e:
        resolve_model(NO_TOKENIZER, download=True)
    assert str(e.value) == (f"{NO_TOKENIZER}: has no tokenizer.model or tokenizer.json on {hub.url} (offload needs "
                            "the model's tokenizer); no weights downloaded")
    assert hub.requests == [f"GET /api/models/{NO_TOKENIZER}/revision/main"]  # the listing alone
    assert not (online / "models--tiny-org--no-tokenizer").exists()
