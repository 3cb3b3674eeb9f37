"""Atomic file and directory writes: a reader sees the old content or the whole new one, never half of it, nor
nothing. Everything written gets the modes the user's umask asks for, as ``open`` and ``mkdir`` give (a shared
output folder read by another user, e.g. an uploader or a Triton container, needs that)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process' umask, read without changing it where the kernel says it (/proc, Linux 4.7+)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:  # os.umask can only be read by setting it: set it straight back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open(path, "w")`` creates: 0o666 less the umask (0o644 under umask 022, 0o600 under 077)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """What ``mkdir`` creates: 0o777 less the umask (0o755 under umask 022, 0o700 under 077)."""
    return 0o777 & ~umask()


def executable_mode() -> int:
    """A script the user runs (a board bundle's): 0o777 less the umask, as ``install`` or a compiler gives."""
    return 0o777 & ~umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a unique temporary file beside ``path``, fsync it, then rename it into place. The file gets
    the umask's mode (mkstemp alone would leave it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
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


def read_data_file(path: str | os.PathLike[str], schema: str, what: str, remake: str) -> dict[str, Any]:
    """A JSON data file the package ships (or a bench writes), checked to be of ``schema``; a file that cannot be
    read or is of another schema is a one-line UserError naming it, ``what`` it holds and the command that
    ``remake``s it."""
    from bottlefit.errors import UserError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read {what} ({e}); reinstall bottlefit or rerun {remake}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise UserError(f"{path}: schema {found!r}, not {schema!r}")
    return doc


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def make_private_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named directory in ``parent`` with the umask's mode (mkdtemp alone gives 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, dir_mode())
    return path


def lock_dir(path: Path, *, blocking: bool = True) -> int | None:
    """A file descriptor holding an exclusive flock on directory ``path`` (close it to release), or None: another
    process holds it (when not ``blocking``), the directory is gone, or its filesystem cannot lock (some network
    filesystems; callers never take None for "free"). The kernel drops the lock when its holder dies, SIGKILL
    included."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def dir_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """``lock_dir`` for a block; yields whether the lock is held."""
    fd = lock_dir(path, blocking=blocking)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


@functools.cache
def _renameat2() -> object | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE): each name always names one of
    the two trees. False where the kernel, libc or filesystem cannot (nothing changed then); OSError otherwise
    (FileNotFoundError when either is missing)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # type: ignore[operator]
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory ``new`` at ``final`` and remove what was there, so that a reader opening any path
    under ``final`` finds the old tree's file or the new one's, never nothing; any number of processes may replace
    the same ``final`` at once (the last one wins). ``new`` and ``final`` must be on one filesystem.

    A rename cannot replace a non-empty directory, so an older ``final`` is swapped with ``new`` in one step and
    the old tree, now at ``new``'s path, is removed. Where the swap is not supported (not Linux, or a filesystem
    without RENAME_EXCHANGE) the old tree is renamed away first: writers are serialised by a lock on the parent,
    but a reader can find no ``final`` for that instant."""
    while True:
        try:
            if exchange(new, final):
                break
        except FileNotFoundError:
            if not new.exists():
                raise
            try:
                os.rename(new, final)  # nothing was there
                return
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another process published meanwhile: swap with that one
                raise
        else:
            _replace_by_two_renames(new, final)
            return
    remove_tree(new)


def _replace_by_two_renames(new: Path, final: Path) -> None:
    with dir_lock(final.parent):
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            old = None
        os.rename(new, final)
    if old is not None:
        remove_tree(old)


def user_cache_dir() -> Path:
    """Where bottlefit keeps what it can rebuild (the arm64 sysroot, codec tables): $BOTTLEFIT_CACHE, else
    $XDG_CACHE_HOME/bottlefit, else ~/.cache/bottlefit."""
    if path := os.environ.get("BOTTLEFIT_CACHE"):
        return Path(path).expanduser()
    if path := os.environ.get("XDG_CACHE_HOME"):
        return Path(path).expanduser() / "bottlefit"
    return Path.home() / ".cache" / "bottlefit"
