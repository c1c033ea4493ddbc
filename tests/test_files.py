"""One rule for every file the tool writes (offload/files.py): nothing the user did not ask to
replace is replaced or deleted, writes are atomic and locked, leftovers are cleaned only when
ours and stale, and a failed write leaves nothing under the final name.

The oracle is the file system itself: each test lists the directory, reads the bytes back, or
opens the pack, before and after."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offload import files
from offload.errors import OffloadError, OutputError
from offload.files import (
    AtomicFile,
    WriteLock,
    clean_leftovers,
    rename_noreplace,
    write_file,
)
from offload.pack import MANIFEST, Pack, convert, pack_files
from offload.profile import load_profile, save_profile
from offload.synth import synthesize
from offload.trace import TraceHeader, TraceWriter, load_trace

ROOT = Path(__file__).resolve().parents[1]
HEADER = TraceHeader("tiny", num_layers=2, num_experts=4, top_k=2)

# A one-layer Mixtral-shaped model: a pack of it is written in well under a second.
TINY = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
    "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry below ``folder``: a file's bytes, a link's target, "dir" for a directory."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        elif path.is_file():
            out[key] = path.read_bytes()
        else:
            out[key] = "special"
    return out


def write_trace(path: Path, tokens: int = 2, force: bool = False) -> Path:
    with TraceWriter(path, HEADER, force=force) as writer:
        for t in range(tokens):
            writer.write_token(t, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    return path


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.skip("the pid of a finished process was reused at once")


# ---- an existing target: refused without --force ----------------------------------------------


def test_an_existing_file_is_refused_without_force_and_replaced_with_it(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text("the user's notes\n")
    with pytest.raises(OutputError, match=r"run\.jsonl: already exists; give --force to replace it") as info:
        write_trace(path)
    assert one_line(str(info.value))
    assert listing(tmp_path) == {"run.jsonl": b"the user's notes\n"}  # no temporary, no lock left
    write_trace(path, tokens=3, force=True)
    assert load_trace(path).tokens() == 3 and sorted(os.listdir(tmp_path)) == ["run.jsonl"]

    profile = load_profile("cpu-only")
    toml = tmp_path / "p.toml"
    toml.write_text("# mine\n")
    with pytest.raises(OutputError, match="already exists; give --force"):
        save_profile(profile, toml)
    assert toml.read_text() == "# mine\n"
    save_profile(profile, toml, force=True)
    assert load_profile(toml).tables() == profile.tables()


@pytest.mark.parametrize("target", ["link to a file", "dangling link", "link to a folder"])
def test_a_symlink_is_neither_followed_nor_replaced(tmp_path, target):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "out"
    link.symlink_to({"link to a file": precious, "dangling link": tmp_path / "nowhere",
                     "link to a folder": folder}[target])
    before = listing(tmp_path)
    for force in (False, True):
        with pytest.raises(OutputError, match=r"out: is a symbolic link, not a regular file") as info:
            write_trace(link, force=force)
        assert one_line(str(info.value))
        with pytest.raises(OutputError, match=r"out: is a symbolic link"):
            save_profile(load_profile("cpu-only"), link, force=force)
        with pytest.raises(OutputError, match=r"out: is a symbolic link, not a pack directory"):
            synthesize(TINY, link, force=force)
    assert listing(tmp_path) == before


def test_a_device_node_or_fifo_is_refused_even_with_force(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target, kind in ((Path("/dev/null"), "a device node"), (fifo, "a fifo")):
        with pytest.raises(OutputError, match=rf"{target}: is {kind}, not a regular file") as info:
            write_trace(target, force=True)
        assert one_line(str(info.value))
        with pytest.raises(OutputError, match=rf"is {kind}"):
            save_profile(load_profile("cpu-only"), target, force=True)
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
    assert not any(n.startswith(".null.") for n in os.listdir("/dev"))  # no lock or temporary beside it


def test_a_directory_where_a_file_belongs_is_one_line(tmp_path):
    folder = tmp_path / "traces"
    folder.mkdir()
    (folder / "old.jsonl").write_text("x")
    for force in (False, True):
        with pytest.raises(OutputError, match=r"traces: is a directory, not a regular file") as info:
            write_trace(folder, force=force)
        assert one_line(str(info.value))
    assert listing(tmp_path) == {"traces": "dir", "traces/old.jsonl": b"x"}


# ---- packs: --force replaces only the pack's own files -------------------------------------------


def test_pack_force_keeps_the_users_other_files(tmp_path):
    out = synthesize(TINY, tmp_path / "pack", seed=1)
    own = pack_files(out)
    assert own == {MANIFEST, "config.json", "dense.safetensors", "experts.bin", "tokenizer.model",
                   *json.loads((out / MANIFEST).read_text())["tokenizer_files"]}
    (out / "notes.md").write_text("my notes")
    (out / "results").mkdir()
    (out / "results" / "run1.json").write_text("{}")
    mine = {k: v for k, v in listing(out).items() if k.split("/")[0] not in own}
    old_experts = (out / "experts.bin").read_bytes()

    synthesize(TINY, out, seed=2, force=True)
    assert {k: v for k, v in listing(out).items() if k.split("/")[0] not in own} == mine
    assert set(os.listdir(out)) == own | {"notes.md", "results"}
    assert (out / "experts.bin").read_bytes() != old_experts  # seed 2's weights
    with Pack(out) as pack:
        assert pack.synthetic["seed"] == 2
        pack.verify_all()
    assert sorted(os.listdir(tmp_path)) == ["pack"]


def test_pack_force_into_an_empty_directory_and_refusals(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OutputError, match="empty: already exists; give --force"):
        synthesize(TINY, empty)
    synthesize(TINY, empty, force=True)
    with Pack(empty) as pack:
        pack.verify_all()
    file_target = tmp_path / "a-file"
    file_target.write_text("not a directory")
    with pytest.raises(OutputError, match=r"a-file: is a regular file, not a pack directory"):
        synthesize(TINY, file_target, force=True)
    assert file_target.read_text() == "not a directory"


def test_pack_force_never_replaces_a_file_the_old_pack_did_not_own(tmp_path):
    """The new pack would write generation_config.json, the old one's manifest does not name it:
    the user's file of that name stays, the old pack stays, and the new pack is kept aside."""
    out = synthesize(TINY, tmp_path / "pack", seed=1)
    manifest = json.loads((out / MANIFEST).read_text())
    assert "generation_config.json" in manifest["tokenizer_files"]
    manifest["tokenizer_files"].remove("generation_config.json")
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "generation_config.json").write_text("the user's own")
    before = listing(out)
    with pytest.raises(OutputError, match=r"generation_config\.json in it is not the old pack's") as info:
        synthesize(TINY, out, seed=2, force=True)
    assert one_line(str(info.value)) and "kept as" in str(info.value)
    assert listing(out) == before
    kept = files.kept_path(out)
    assert sorted(os.listdir(tmp_path)) == ["pack", kept.name]
    with Pack(kept) as pack:
        assert pack.synthetic["seed"] == 2


def test_pack_force_refuses_a_link_the_manifest_names(tmp_path):
    out = synthesize(TINY, tmp_path / "pack", seed=1)
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    (out / "experts.bin").rename(elsewhere / "experts.bin")
    (out / "experts.bin").symlink_to(elsewhere / "experts.bin")
    before = listing(tmp_path)
    with pytest.raises(OutputError, match=r"experts\.bin in it is a symbolic link"):
        synthesize(TINY, out, seed=2, force=True)
    kept = files.kept_path(out)
    assert {k: v for k, v in listing(tmp_path).items() if not k.startswith(kept.name)} == before


def test_a_failed_swap_puts_the_old_pack_back(tmp_path, monkeypatch):
    out = synthesize(TINY, tmp_path / "pack", seed=1)
    (out / "notes.md").write_text("mine")
    before = listing(tmp_path)
    real = files.rename_noreplace
    failed = []

    def failing(src: Path, dst: Path) -> None:
        if dst == out / MANIFEST and not failed:  # the new manifest, the last file of the swap
            failed.append(src)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(files, "rename_noreplace", failing)
    with pytest.raises(OutputError, match=rf"{out}: cannot write the pack: Input/output error"):
        synthesize(TINY, out, seed=2, force=True)
    assert failed and listing(tmp_path) == before


# ---- the check just before the rename ------------------------------------------------------------


def test_a_directory_created_at_out_during_a_convert_is_not_destroyed(model_dirs, tmp_path):
    from tests.model_builder import WINDOWED

    out = tmp_path / "pack"

    def progress(done: int, total: int, what: str) -> None:
        if done == total:  # the user makes OUT while the last expert is written
            out.mkdir()
            (out / "thesis.txt").write_text("precious")

    with pytest.raises(OutputError, match=r"pack: a directory appeared there while the pack was being written") as info:
        convert(model_dirs[WINDOWED.name], out, progress=progress)
    kept = files.kept_path(out)
    assert one_line(str(info.value)) and f"the new output is kept as {kept}" in str(info.value)
    assert listing(out) == {"thesis.txt": b"precious"}
    assert sorted(os.listdir(tmp_path)) == sorted(["pack", kept.name])  # no temporary, no lock
    with Pack(kept) as pack:
        pack.verify_all()


def test_a_forced_pack_whose_directory_was_replaced_meanwhile_is_not_installed(tmp_path):
    out = synthesize(TINY, tmp_path / "pack", seed=1)

    def progress(done: int, total: int, what: str) -> None:
        if done == total:  # the old pack is moved away and a new folder of the user's is made there
            out.rename(tmp_path / "moved")
            out.mkdir()
            (out / "draft.txt").write_text("mine")

    with pytest.raises(OutputError, match="a directory appeared there"):
        synthesize(TINY, out, seed=2, force=True, progress=progress)
    assert listing(out) == {"draft.txt": b"mine"}
    with Pack(tmp_path / "moved") as pack:
        assert pack.synthetic["seed"] == 1


def test_a_file_created_at_the_target_during_a_trace_is_not_replaced(tmp_path):
    path = tmp_path / "run.jsonl"
    writer = TraceWriter(path, HEADER, force=True)  # --force given, but for what was there then: nothing
    writer.write_token(0, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    path.write_text("written by someone else meanwhile")
    with pytest.raises(OutputError, match=r"run\.jsonl: a regular file appeared there while the trace was being written"):
        writer.close()
    assert path.read_text() == "written by someone else meanwhile"
    assert load_trace(files.kept_path(path)).tokens() == 1  # the new trace, kept beside it
    assert sorted(os.listdir(tmp_path)) == sorted(["run.jsonl", files.kept_path(path).name])


def test_the_final_rename_never_replaces_even_after_the_check(tmp_path, monkeypatch):
    """A directory made at OUT after the last check, in the instant before the rename: the
    rename itself refuses (renameat2 RENAME_NOREPLACE; os.rename would replace an empty one)."""
    out = tmp_path / "pack"
    real_lstat = files._lstat

    def blind(path):  # the final check sees nothing at OUT; the directory is made right after
        if Path(path) == out and sys._getframe(1).f_code.co_name == "_install_dir" and not out.exists():
            out.mkdir()
            return None
        return real_lstat(path)

    monkeypatch.setattr(files, "_lstat", blind)
    with pytest.raises(OutputError, match="a directory appeared there"):
        synthesize(TINY, out)
    assert listing(out) == {}  # still the user's empty directory, not the pack
    src, dst = tmp_path / "a", tmp_path / "b"
    src.mkdir()
    dst.mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.is_dir() and dst.is_dir()


# ---- the lock: two writers into one target --------------------------------------------------------


def test_two_threads_converting_into_one_out_exactly_one_succeeds(tmp_path):
    out = tmp_path / "pack"
    started, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def progress(done: int, total: int, what: str) -> None:
        started.set()
        release.wait(30)

    def first() -> None:
        try:
            results["first"] = synthesize(TINY, out, seed=1, progress=progress)
        except Exception as exc:  # noqa: BLE001  (the test reports it)
            results["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    try:
        with pytest.raises(OutputError, match=rf"pack: another offload run \(pid {os.getpid()}\) is writing it now") as info:
            synthesize(TINY, out, seed=2)
        assert one_line(str(info.value))
    finally:
        release.set()
        thread.join(60)
    assert results["first"] == out
    with Pack(out) as pack:
        assert pack.synthetic["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["pack"]


def test_a_second_process_is_refused_naming_the_first(tmp_path):
    target = tmp_path / "run.jsonl"
    script = (
        "import sys\nfrom offload.files import AtomicFile\n"
        f"f = AtomicFile({str(target)!r}, what='trace')\nf.write('from the first\\n')\n"
        "print('ready', flush=True)\nsys.stdin.readline()\nf.commit()\n"
    )
    first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "ready"
        with pytest.raises(OutputError, match=rf"another offload run \(pid {first.pid}\) is writing it now"):
            write_file(target, "from the second\n", what="trace")
        assert not target.exists()
    finally:
        first.communicate("go\n", timeout=60)
    assert first.returncode == 0
    assert target.read_text() == "from the first\n" and sorted(os.listdir(tmp_path)) == ["run.jsonl"]


def test_a_lock_left_by_a_killed_writer_is_free(tmp_path):
    target = tmp_path / "p.toml"
    files.lock_path(target).write_text(f"{dead_pid()}\n")  # the file stays, the flock died with it
    save_profile(load_profile("cpu-only"), target)
    assert sorted(os.listdir(tmp_path)) == ["p.toml"]
    with WriteLock(target):
        assert files.lock_path(target).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match="is writing it now"):
            WriteLock(target)
    assert not files.lock_path(target).exists()


# ---- leftovers of interrupted runs ----------------------------------------------------------------


def test_leftovers_are_cleaned_only_when_ours_and_stale(tmp_path):
    gone, alive = dead_pid(), os.getppid()  # the parent (pytest's launcher) is running
    stale = [f".pack.partial-{gone}", f".pack.old-{gone}", f".pack.partial-{os.getpid()}"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "experts.bin").write_bytes(b"\0" * 4096)
    (tmp_path / ".pack.abc123_x.tmp").write_text("an earlier version's temporary")
    kept = {
        f".pack.partial-{alive}": "dir",  # a running process's: may be writing
        ".pack.partial-notapid": "dir",
        ".pack.notes": b"not our pattern",
        f".other.partial-{gone}": "dir",  # another target's
        f"pack.partial-{gone}": "dir",  # not hidden: not ours
        ".pack.abc.tmp": b"not the temporary pattern",
        f".pack.old-{gone}-copy": b"x",
    }
    for name, what in kept.items():
        if what == "dir":
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(what)
    (tmp_path / f".pack.old-{gone + 1}").symlink_to(tmp_path / ".pack.notes")  # a link is never ours
    synthesize(TINY, tmp_path / "pack")
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "pack", f".pack.old-{gone + 1}"])
    assert (tmp_path / ".pack.notes").read_bytes() == b"not our pattern"


def test_leftovers_are_not_cleaned_while_another_run_holds_the_lock(tmp_path):
    target = tmp_path / "run.jsonl"
    leftover = tmp_path / f".run.jsonl.partial-{dead_pid()}"
    leftover.write_text("x")
    with WriteLock(target):
        with pytest.raises(OutputError, match="is writing it now"):
            write_trace(target)
        assert leftover.exists()
    write_trace(target)
    assert not leftover.exists()
    assert clean_leftovers(target) == []


# ---- failed writes -----------------------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_trace_under_the_final_name(tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    writer = TraceWriter(path, HEADER)
    writer.write_token(0, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(OutputError, match=rf"{path}: cannot write the trace: No space left on device") as info:
        writer.close()
    assert one_line(str(info.value))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    writer.close()  # closing again after the failure does nothing
    assert os.listdir(tmp_path) == []


def test_a_full_disk_during_a_long_trace_fails_at_once(tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    writer = TraceWriter(path, HEADER)
    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(OutputError, match="No space left on device"):
        for t in range(100_000):  # past the write buffer: the write is tried, and fails
            writer.write_token(t, "decode", [[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    monkeypatch.undo()
    writer.close()
    assert os.listdir(tmp_path) == []


def test_a_full_disk_leaves_no_profile_and_no_pack(tmp_path, monkeypatch):
    old = tmp_path / "p.toml"
    old.write_text("# the old profile\n")
    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(OutputError, match=rf"{old}: cannot write the profile: No space left on device"):
        save_profile(load_profile("cpu-only"), old, force=True)
    monkeypatch.undo()
    assert listing(tmp_path) == {"p.toml": b"# the old profile\n"}

    out = tmp_path / "pack"
    real_pwrite = os.pwrite

    def records_fail(fd, data, offset):  # the expert records (the lock's pid line is written first)
        return enospc() if len(data) > 64 else real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", records_fail)
    with pytest.raises(OutputError, match=rf"{out}: cannot write the pack: No space left on device") as info:
        synthesize(TINY, out)
    monkeypatch.undo()
    assert one_line(str(info.value))
    assert sorted(os.listdir(tmp_path)) == ["p.toml"]


def test_a_write_without_permission_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args, **kwargs):  # (root ignores modes: the refusal is simulated)
        if ".partial-" in os.fspath(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    path = tmp_path / "run.jsonl"
    with pytest.raises(OutputError, match=rf"{path}: cannot write the trace: Permission denied"):
        write_trace(path)
    assert os.listdir(tmp_path) == []


def test_an_atomic_file_is_whole_or_absent(tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom(3 * files.WRITE_BUFFER + 17)
    with pytest.raises(RuntimeError), AtomicFile(path) as f:
        f.write(data)
        assert not path.exists()
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    write_file(path, data)
    assert path.read_bytes() == data and os.listdir(tmp_path) == ["big.bin"]


# ---- the command line --------------------------------------------------------------------------


runner = CliRunner()


def cli(*args: str):
    from cli.main import app

    return runner.invoke(app, [str(a) for a in args])


def test_generate_trace_needs_force_and_refuses_a_directory_in_one_line(tmp_path):
    trace = tmp_path / "run.jsonl"
    trace.write_text("mine\n")
    base = ["generate", "-p", "x", "-n", "2", "--device", "cpu", "--trace", trace]
    refused = cli(*base)
    assert refused.exit_code == 2 and "already exists; give --force to replace it" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and trace.read_text() == "mine\n"
    forced = cli(*base, "--force")
    assert forced.exit_code == 0, forced.output
    assert load_trace(trace).tokens() >= 1 and sorted(os.listdir(tmp_path)) == ["run.jsonl"]
    folder = tmp_path / "folder"
    folder.mkdir()
    onto_dir = cli("generate", "-p", "x", "-n", "2", "--device", "cpu", "--trace", folder, "--force")
    assert onto_dir.exit_code == 2 and "is a directory, not a regular file" in onto_dir.stderr
    assert len(onto_dir.stderr.strip().splitlines()) == 1 and "Traceback" not in onto_dir.output


def test_chat_trace_needs_force(tmp_path):
    first = tmp_path / "chat-1.jsonl"
    first.write_text("mine\n")
    args = ["chat", "-n", "2", "--temp", "0", "--device", "cpu", "--trace", tmp_path / "chat.jsonl"]
    refused = runner.invoke(__import__("cli.main", fromlist=["app"]).app, [str(a) for a in args], input="hi")
    assert refused.exit_code == 2 and f"{first}: already exists; give --force" in refused.stderr
    assert first.read_text() == "mine\n"
    forced = runner.invoke(__import__("cli.main", fromlist=["app"]).app, [str(a) for a in [*args, "--force"]],
                           input="hi")
    assert forced.exit_code == 0, forced.output
    assert load_trace(first).tokens() >= 1


def test_profile_out_needs_force_and_refuses_a_device(tmp_path):
    out = tmp_path / "mine.toml"
    out.write_text("# mine\n")
    refused = cli("profile", "--out", out, "--device", "cpu", "-p", "4", "-n", "2")
    assert refused.exit_code == 2 and "already exists; give --force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and out.read_text() == "# mine\n"
    device = cli("profile", "--out", "/dev/null", "--force", "--device", "cpu", "-p", "4", "-n", "2")
    assert device.exit_code == 2 and "/dev/null: is a device node" in device.stderr
    forced = cli("profile", "--out", out, "--force", "--device", "cpu", "-p", "4", "-n", "2")
    assert forced.exit_code == 0, forced.output
    assert load_profile(out).gpu == "none"


def test_cli_convert_force_keeps_other_files_and_error_is_one_line(model_dirs, tmp_path):
    from tests.model_builder import WINDOWED

    out = tmp_path / "pack"
    first = cli("convert", model_dirs[WINDOWED.name], out)
    assert first.exit_code == 0, first.output
    (out / "README.txt").write_text("what this pack is for" + " " * 2**22)
    again = cli("convert", model_dirs[WINDOWED.name], out)
    assert again.exit_code == 2 and "already exists; give --force" in again.stderr
    forced = cli("convert", model_dirs[WINDOWED.name], out, "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "README.txt").read_text().startswith("what this pack is for")
    in_all = [r.stdout.split(", ")[-2] for r in (first, forced)]  # "... 1.2 MiB in all, 0.3 s"
    assert in_all[0] == in_all[1] and in_all[0].endswith(" in all")  # the user's 4 MiB are not the pack's
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "a.txt").write_text("a")
    refused = cli("convert", model_dirs[WINDOWED.name], documents, "--force")
    assert refused.exit_code == 2 and "not an offload pack" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and listing(documents) == {"a.txt": b"a"}


def test_output_error_is_an_offload_error():
    assert issubclass(OutputError, OffloadError)
