"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a unique temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's SHA-256 (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def user_cache_dir() -> Path:
    """Where bottlefit keeps what it can rebuild (the arm64 sysroot, codec tables): $BOTTLEFIT_CACHE, else
    $XDG_CACHE_HOME/bottlefit, else ~/.cache/bottlefit."""
    if path := os.environ.get("BOTTLEFIT_CACHE"):
        return Path(path).expanduser()
    if path := os.environ.get("XDG_CACHE_HOME"):
        return Path(path).expanduser() / "bottlefit"
    return Path.home() / ".cache" / "bottlefit"

