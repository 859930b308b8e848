"""Files charlstm writes: atomic, durable, never over anything but a regular file.

* ``atomic_write_bytes``: a temporary file beside the target, written, flushed and fsynced,
  renamed over the target, then the folder fsynced, so a reader never sees half a file and a
  crash or a full disk never destroys the previous one.
* ``check_output_file`` / ``check_output_dir``: refuse, before any work starts, outputs that
  would replace a device, a FIFO or a folder, or that cannot be written at all.
* ``RunLock``: one training per output folder; an ``flock`` that dies with its process, so a
  killed run never leaves it stuck.
* ``remove_stale_temporaries``: the hidden ``.NAME.PID.tmp`` files a killed writer left.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from pathlib import Path

from .errors import CharLSTMError

TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")
LOCK_NAME = ".charlstm.lock"
CHUNK = 1 << 20
NAME_MAX = 255


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it and its folder, then publish it
    with a rename. On failure (a full disk, say) the temporary file goes and the old file stays."""
    path = _writable_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        raise CharLSTMError(f"{path}: could not write ({_reason(err)}); the previous file, if any, "
                            f"is unchanged") from None
    finally:
        _remove_quietly(tmp)
    return path


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until everything is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        written = write_chunk(fd, view[:CHUNK])
        view = view[written:]


def write_chunk(fd: int, chunk: memoryview) -> int:
    """One write; a seam where tests put a disk that fills up."""
    return os.write(fd, chunk)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the data itself is synced
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # cleanup must never hide the real error


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _writable_target(path: Path) -> Path:
    """The path a write really goes to: a symlink's regular-file target, or the path itself.
    Anything but a regular file (a device, FIFO, socket or folder) is never replaced."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return path
    except OSError as err:
        raise CharLSTMError(f"{path}: cannot write here ({_reason(err)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CharLSTMError(f"{path}: is a folder; give a file name")
    if not stat.S_ISREG(info.st_mode):
        raise CharLSTMError(f"{path}: is not a regular file (a device, FIFO or socket); "
                            f"charlstm only replaces regular files")
    return path.resolve() if path.is_symlink() else path


# --------------------------------------------------------------------------- checks before work


def check_name(name: str, what: str) -> None:
    """A file name (one path component) the file system will take."""
    if not name or name in (".", ".."):
        raise CharLSTMError(f"{what}: {name!r} is not a file name")
    if "/" in name or "\0" in name:
        raise CharLSTMError(f"{what}: {name!r} must be a plain file name (no '/' or NUL)")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise CharLSTMError(f"{what}: the file name is {len(name.encode('utf-8', 'surrogateescape'))} "
                            f"bytes long; at most {NAME_MAX} are allowed")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output file that cannot be written or is not a file, before any work starts."""
    text = os.fspath(path)
    if not text:
        raise CharLSTMError(f"{what}: an empty path is not a file name")
    path = Path(text)
    check_name(path.name, f"{what} {path}")
    target = _writable_target(path)
    check_output_dir(target.parent, what=f"{what} {path}", create=False)
    return path


def check_output_dir(folder: str | os.PathLike, what: str = "-o", create: bool = True) -> Path:
    """A folder that exists (or is created) and takes a new file, proven by writing one."""
    text = os.fspath(folder)
    if not text:
        raise CharLSTMError(f"{what}: an empty path is not a folder")
    folder = Path(text)
    for part in folder.parts:
        if part not in ("/", "..", ".") and len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise CharLSTMError(f"{what}: a folder name in {folder} is longer than {NAME_MAX} bytes")
    if folder.exists() and not folder.is_dir():
        raise CharLSTMError(f"{what}: {folder} exists and is not a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise CharLSTMError(f"{what}: the folder {folder} does not exist")
        probe = folder / f".charlstm-probe.{os.getpid()}.tmp"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except CharLSTMError:
        raise
    except OSError as err:
        raise CharLSTMError(f"{what}: cannot write in {folder} ({_reason(err)})") from None
    return folder


# --------------------------------------------------------------------------- one run per folder


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.charlstm.lock`` for the life of a training.

    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a
    crashed run never leaves it stuck; the file's text only says who holds it.
    """

    def __init__(self, folder: str | os.PathLike, run_id: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self, force: bool = False) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CharLSTMError(f"{self.path}: cannot create the lock file ({_reason(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise CharLSTMError(f"{self.path}: cannot lock ({_reason(err)})") from None
            holder = self._holder(fd)
            if not force:
                os.close(fd)
                raise CharLSTMError(f"{self.path.parent}: another training is writing here ({holder}); "
                                    f"use another -o, or --ignore-lock to write here anyway")
            self._fd = fd  # told to go on: share the folder, without the lock
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "run_id": self.run_id}).encode() + b"\n")
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info.get('pid')}, run {info.get('run_id')}"
        except (OSError, ValueError, AttributeError):
            return "unknown process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmlessly
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.PID.tmp`` files whose writer is gone (call while holding the RunLock)."""
    removed = []
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TMP_RE.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            try:
                if entry.is_file() and not entry.is_symlink():
                    entry.unlink()
                    removed.append(entry)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
