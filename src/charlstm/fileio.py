"""Atomic file writes (a reader never sees half a file, a crash never destroys the old one) and
the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def user_cache_dir(kind: str, env: str) -> Path:
    """Where charlstm caches ``kind`` (downloaded books, the compiled kernel): ``$env`` if set,
    else the platform's user cache folder."""
    if os.environ.get(env):
        return Path(os.environ[env])
    import platformdirs

    return Path(platformdirs.user_cache_dir("charlstm")) / kind
