"""Files charlstm writes: atomic, durable, never over anything but a regular file.

* ``atomic_write_bytes``: a temporary file beside the target, written, flushed and fsynced,
  renamed over the target, then the folder fsynced, so a reader never sees half a file and a
  crash or a full disk never destroys the previous one.
* ``writable_target``: never a device, FIFO or folder where a file is meant (the checks made
  before any work starts are in ``checks``).
* ``RunLock``: one training per output folder; an ``flock`` that dies with its process, so a
  killed run never leaves it stuck.
* ``remove_stale_temporaries``: the hidden ``.NAME.PID.tmp`` files a killed writer left.
* ``user_cache_dir``: where downloaded books and the compiled kernel are cached.
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
    path = writable_target(Path(path))
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


def writable_target(path: Path) -> Path:
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


def user_cache_dir(kind: str, env: str) -> Path:
    """Where charlstm caches ``kind`` (downloaded books, the compiled kernel): ``$env`` if set,
    else the platform's user cache folder."""
    if os.environ.get(env):
        return Path(os.environ[env])
    import platformdirs

    return Path(platformdirs.user_cache_dir("charlstm")) / kind
