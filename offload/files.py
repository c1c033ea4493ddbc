"""How the tool writes what it writes: one rule for every file and pack directory it makes.

What it is: the target checks, the write lock, the atomic install and the clean-up of an
earlier run's leftovers that every writer uses (packs from ``offload.pack.convert`` and
``offload.synth``, traces from ``offload.trace.TraceWriter``, profiles from
``offload.profile.save_profile``). The rule:

1. Never replace or delete what the user did not ask to replace. A target that exists is refused
   unless ``force``. Even then only what the tool itself writes is replaced: a regular file, or,
   for a directory (a pack), only the files its writer owns (``owned(dir)``: for a pack, the
   files its manifest names), never the directory's other contents. A symbolic link (never
   followed either), a device node, fifo, socket, or a directory where a file belongs, is
   refused in one line naming the path and what it is, ``force`` or not; so is a directory
   that holds files but is not one of ours.
2. Atomic: the new content is written into a temporary sibling (``.NAME.partial-PID``), fsynced,
   then renamed into place; just before that rename the target is checked again, and a target
   that appeared meanwhile (or changed into something else) is left untouched: the new output
   is kept beside it as ``NAME.new-PID`` and the error says so. A rename into a name that was
   free uses ``renameat2(RENAME_NOREPLACE)`` (Linux), so even a target created in the last
   instant is not replaced. A pack replaced in a directory is swapped file by file, its
   manifest out first and in last, so the directory never looks like a half-new pack; the old
   pack's files wait in ``.NAME.old-PID`` until the new ones are in, and come back on failure.
3. Locked: ``flock`` on ``.NAME.lock`` beside the target, held from before the first byte to
   after the rename, so a second writer into one target refuses at once, naming the first's pid.
4. Leftovers of earlier interrupted runs (``.NAME.partial-PID``, ``.NAME.old-PID``, and the
   ``.NAME.XXXXXXXX.tmp`` files of earlier versions) are removed while holding the lock, and
   only when they are ours: our naming pattern, and for the pid forms a pid that is not running
   (or is this process, which holds the lock). Nothing else is ever removed.
5. A write that fails (a full disk, a directory where a file should be, no permission) removes
   the temporary and raises ``OutputError`` in one line naming the target and the reason;
   nothing truncated ever appears under the final name.

What it is not: a format writer (pack.py, trace.py, profile.py decide what the files hold), nor
a general file library. It never prints.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from offload.errors import OutputError

# owned(dir): the names of the files in ``dir`` that the tool wrote and may replace, or None when
# ``dir`` is not one of its outputs (for a pack: no manifest naming it a pack)
Owned = Callable[[Path], "set[str] | None"]

WRITE_BUFFER = 1 << 20  # AtomicFile hands the kernel at least this much per os.write


# ---- names -------------------------------------------------------------------------------------


def partial_path(target: Path) -> Path:
    """Where ``target`` is written before it is renamed into place."""
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def old_path(target: Path) -> Path:
    """Where a replaced pack's own files wait until the new ones are in."""
    return target.parent / f".{target.name}.old-{os.getpid()}"


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def kept_path(target: Path) -> Path:
    """Where new output is kept when its target appeared during the write (never cleaned up)."""
    return target.parent / f"{target.name}.new-{os.getpid()}"


def kind(mode: int) -> str:
    """What a file is, for messages: "a regular file", "a directory", "a symbolic link"..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _same(st: os.stat_result, initial: os.stat_result | None) -> bool:
    """Whether ``st`` is the file that was checked at the start (same device and inode)."""
    return initial is not None and (st.st_dev, st.st_ino) == (initial.st_dev, initial.st_ino)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ---- checks ------------------------------------------------------------------------------------


def check_file(path: str | os.PathLike, force: bool, what: str = "file") -> os.stat_result | None:
    """Refuse ``path`` as the target of a file write unless it is free, or a regular file and
    ``force``; returns its lstat (None when free)."""
    path = Path(path)
    st = _lstat(path)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(
            f"{path}: is {kind(st.st_mode)}, not a regular file; offload never writes through or replaces one "
            f"(--force or not): give another {what} file name"
        )
    if not force:
        raise OutputError(f"{path}: already exists; give --force to replace it")
    return st


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def check_dir(path: str | os.PathLike, force: bool, what: str, owned: Owned) -> os.stat_result | None:
    """Refuse ``path`` as the target of a directory write (a pack) unless it is free, or, with
    ``force``, a directory that is ours (``owned``) or empty; returns its lstat (None when free)."""
    path = Path(path)
    st = _lstat(path)
    if st is None:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(
            f"{path}: is {kind(st.st_mode)}, not a {what} directory; offload never writes through or replaces "
            f"one (--force or not): choose another directory"
        )
    try:
        ours = owned(path) is not None or _is_empty_dir(path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read it: {_reason(exc)}") from None
    if not ours:
        raise OutputError(
            f"{path}: exists and is not an offload {what}; --force replaces only a {what}'s own files, never "
            f"other contents: remove it yourself or choose another directory"
        )
    if not force:
        raise OutputError(f"{path}: already exists; give --force to replace it")
    return st


# ---- the lock ----------------------------------------------------------------------------------


class WriteLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``target``, holding the
    writer's pid; the file is removed on release. A second writer (another process, or another
    thread: each lock is its own open file) is refused at once, naming the first's pid."""

    def __init__(self, target: Path, what: str = "file"):
        self.target = target
        self.path = lock_path(target)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"{target}: cannot write the {what}: {_reason(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "pid unknown"
                raise OutputError(
                    f"{target}: another offload run ({who}) is writing it now (lock {self.path}); "
                    f"wait for it to finish or choose another name"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"{target}: cannot write the {what}: {_reason(exc)}") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
        self.fd: int | None = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.release()
            raise OutputError(f"{target}: cannot write the {what}: {_reason(exc)}") from None

    def _same_file(self, fd: int) -> bool:
        st = _lstat(self.path)
        mine = os.fstat(fd)
        return st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                os.unlink(self.path)  # while still locked: a waiting opener re-checks and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# ---- leftovers ---------------------------------------------------------------------------------


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def leftovers(target: Path) -> list[Path]:
    """The siblings of ``target`` that interrupted runs of this tool left and that may go now:
    ``.NAME.partial-PID`` and ``.NAME.old-PID`` whose pid is not running (or is this process's:
    call this only while holding the target's lock), and ``.NAME.XXXXXXXX.tmp`` files (the
    temporaries of earlier versions). Symbolic links are never ours."""
    name = re.escape(target.name)
    with_pid = re.compile(rf"\.{name}\.(?:partial|old)-([1-9][0-9]{{0,9}})")
    legacy_tmp = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")
    found = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        if entry.is_symlink():
            continue
        match = with_pid.fullmatch(entry.name)
        if match:
            pid = int(match.group(1))
            if pid == os.getpid() or not _running(pid):
                found.append(Path(entry.path))
        elif legacy_tmp.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            found.append(Path(entry.path))
    return sorted(found)


def clean_leftovers(target: Path) -> list[Path]:
    """Remove ``leftovers(target)``; call only while holding the target's ``WriteLock``.
    Returns what was removed (best effort: what cannot be removed stays)."""
    removed = []
    for path in leftovers(target):
        st = _lstat(path)
        if st is None:
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            elif stat.S_ISREG(st.st_mode):
                path.unlink()
            else:
                continue
        except OSError:
            continue
        removed.append(path)
    return removed


# ---- renames -----------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):  # not Linux, or a C library without it
    _renameat2 = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if anything is at ``dst`` (checked by
    the kernel in the rename itself where ``renameat2`` works, else just before it)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # else: this filesystem lacks it
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if _lstat(dst) is not None:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep(temp: Path, target: Path) -> str:
    """Keep new output whose target appeared meanwhile: renamed to ``NAME.new-PID`` when that is
    free, else left at its temporary name; returns the sentence that says where."""
    kept = kept_path(target)
    try:
        rename_noreplace(temp, kept)
    except OSError:
        return f"the new output is kept as {temp} (the next write to {target.name} removes it)"
    return f"the new output is kept as {kept}"


def _remove(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


# ---- a file ------------------------------------------------------------------------------------


class AtomicFile:
    """A regular file written whole or not at all, under the rule above: ``write`` text or
    bytes, then ``commit()`` (fsync, check the target again, rename into place) or
    ``discard()``. Every failure is an ``OutputError`` naming the target; after one the
    temporary is gone and the lock released. As a context manager, an exception discards."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, what: str = "file",
                 make_parents: bool = False):
        self.path = Path(path)
        self.force = force
        self.what = what
        self.closed = True
        check_file(self.path, force, what)
        if make_parents:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._error(exc) from None
        self._lock = WriteLock(self.path, what)
        self.temp = partial_path(self.path)
        self._fd: int | None = None
        self._buffer = bytearray()
        try:
            self._initial = check_file(self.path, force, what)  # again, under the lock
        except OutputError:
            self._lock.release()
            raise
        try:
            clean_leftovers(self.path)
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            self._lock.release()
            raise self._error(exc) from None
        self.closed = False

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"{self.path}: cannot write the {self.what}: {_reason(exc)}")

    def write(self, data: str | bytes) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: write to a closed {self.what}")
        self._buffer += data.encode("utf-8") if isinstance(data, str) else data
        if len(self._buffer) >= WRITE_BUFFER:
            self._drain()

    def _drain(self) -> None:
        try:
            done = 0
            with memoryview(self._buffer) as view:
                while done < len(view):
                    done += os.write(self._fd, view[done:])
            self._buffer = bytearray()
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None

    def commit(self) -> Path:
        """Make the file appear under its name; returns the path."""
        if self.closed:
            return self.path
        try:
            self._drain()
            try:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                self._install()
                fsync_dir(self.path.parent)
            except OSError as exc:
                raise self._error(exc) from None
        finally:
            self._finish()
        return self.path

    def _install(self) -> None:
        st = _lstat(self.path)  # the check just before the rename
        if st is not None and stat.S_ISREG(st.st_mode) and _same(st, self._initial):
            os.replace(self.temp, self.path)  # the regular file the user asked to replace (--force)
            return
        if st is None:
            try:
                rename_noreplace(self.temp, self.path)
                return
            except FileExistsError:
                st = _lstat(self.path)
        what = kind(st.st_mode) if st is not None else "something"
        raise OutputError(
            f"{self.path}: {what} appeared there while the {self.what} was being written; it is left "
            f"untouched and {_keep(self.temp, self.path)}"
        )

    def discard(self) -> None:
        """Forget the file: the temporary is removed and nothing appears under the name."""
        if not self.closed:
            self._finish()

    def _finish(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        st = _lstat(self.temp)
        if st is not None and stat.S_ISREG(st.st_mode):
            try:
                self.temp.unlink()
            except OSError:
                pass
        self._buffer = bytearray()
        self._lock.release()
        self.closed = True

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_file(path: str | os.PathLike, data: str | bytes, *, force: bool = False, what: str = "file",
               make_parents: bool = False) -> Path:
    """Write ``data`` to ``path`` as one ``AtomicFile``; returns the path."""
    with AtomicFile(path, force=force, what=what, make_parents=make_parents) as f:
        f.write(data)
    return Path(path)


# ---- a directory -------------------------------------------------------------------------------


@contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool, what: str, owned: Owned, marker: str) -> Iterator[Path]:
    """A temporary sibling directory to write ``path``'s new contents into (yielded), installed
    when the block ends: renamed into place when ``path`` is free, or, with ``force``, swapped
    file by file into the existing directory (``owned`` names the old files that go; the
    directory's other contents stay). ``marker`` is the file whose presence marks complete
    contents (a pack's manifest): moved out first and in last. On any error, or an exception
    in the block, the temporary is removed and ``path`` is as it was."""
    path = Path(path)
    initial = check_dir(path, force, what, owned)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the {what}: {_reason(exc)}") from None
    with WriteLock(path, what):
        initial = check_dir(path, force, what, owned)  # again, under the lock
        temp = partial_path(path)
        try:
            clean_leftovers(path)
            os.mkdir(temp)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the {what}: {_reason(exc)}") from None
        try:
            try:
                yield temp
                _install_dir(temp, path, initial, what, owned, marker)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write the {what}: {_reason(exc)}") from None
        finally:
            _remove(temp)


def _install_dir(temp: Path, path: Path, initial: os.stat_result | None, what: str, owned: Owned,
                 marker: str) -> None:
    st = _lstat(path)  # the check just before the rename
    if st is None:
        try:
            rename_noreplace(temp, path)
        except FileExistsError:
            st = _lstat(path)
        else:
            fsync_dir(path.parent)
            return

    def refuse(why: str) -> OutputError:
        return OutputError(f"{path}: {why}; it is left untouched and {_keep(temp, path)}")

    if st is None:
        raise refuse(f"something appeared there while the {what} was being written")
    if not stat.S_ISDIR(st.st_mode):
        raise refuse(f"{kind(st.st_mode)} appeared there while the {what} was being written")
    if not _same(st, initial):
        raise refuse(f"a directory appeared there while the {what} was being written")
    old = owned(path)
    if old is None:
        if not _is_empty_dir(path):
            raise refuse(f"files that are not a {what}'s appeared in it while the {what} was being written")
        old = set()
    for name in sorted(old):
        there = _lstat(path / name)
        if there is not None and not stat.S_ISREG(there.st_mode):
            raise refuse(f"{name} in it is {kind(there.st_mode)}; --force replaces only a {what}'s own regular files")
    new = sorted(os.listdir(temp))
    for name in new:
        if name not in old and _lstat(path / name) is not None:
            raise refuse(f"{name} in it is not the old {what}'s; --force never replaces other files")
    _swap(temp, path, old, new, marker)


def _swap(temp: Path, path: Path, old: Iterable[str], new: Iterable[str], marker: str) -> None:
    """The old own files of ``path`` out (marker first) into ``.NAME.old-PID``, the new ones in
    from ``temp`` (marker last); on failure everything goes back."""
    aside = old_path(path)
    os.mkdir(aside)
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in sorted(old, key=lambda n: n != marker):
            if _lstat(path / name) is not None:
                os.rename(path / name, aside / name)
                moved_out.append(name)
        for name in sorted(new, key=lambda n: n == marker):
            rename_noreplace(temp / name, path / name)
            moved_in.append(name)
        fsync_dir(path)
    except BaseException:
        restored = True
        for name in reversed(moved_in):
            try:
                os.rename(path / name, temp / name)
            except OSError:
                restored = False
        for name in reversed(moved_out):  # the marker last
            try:
                rename_noreplace(aside / name, path / name)
            except OSError:
                restored = False
        if restored:
            _remove(aside)
        raise
    _remove(aside)
