"""Where an export writes, and how it gets there.

  OUT/<target>/             the last export that passed parity (or that ``--replace-failed`` let in). A real
                            directory, never a link: ``cp -r``, tar, zip and rsync copy its files as they are.
  OUT/<target>.failed/      the latest attempt that failed parity, beside the passing one (replaced by the next
                            failure, removed by the next pass).
  OUT/.<target>.tmp-<id>/   an export in progress: its process holds a lock on it. One whose lock is free was left
                            by a process that died (SIGKILL, a crash, power loss); the next export removes it.

Each attempt is built in its own tmp directory and swapped into place in one step (``files.replace_dir``): a reader
of OUT/<target>/manifest.json (``verify``, ``serve``, Triton, an upload) finds the old file or the new one, never
none, however many exports run at once. SIGTERM and SIGHUP become an exception while an attempt is open, so its
directory is removed as on Ctrl-C; folders of OUT that the attempt created are removed when it fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bottlefit.errors import Terminated, UserError
from bottlefit.exporter.manifest import FAILED_SUFFIX
from bottlefit.files import dir_lock, lock_dir, make_private_dir, remove_tree, replace_dir

Log = Callable[[str], None]
_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def failed_dir(out_root: Path, target: str) -> Path:
    return out_root / f"{target}{FAILED_SUFFIX}"


@dataclass(frozen=True)
class OutRoot:
    """``--out``, checked; ``missing``: its folders that do not exist yet (made when the first attempt opens)."""

    path: Path
    missing: tuple[Path, ...] = ()


def prepare_out_dir(out: Path, target: str | None = None) -> OutRoot:
    """Check ``--out`` before any work, creating nothing: it is a directory, or can be made in a writable one.
    ``target``: OUT/<target> must be a directory if it exists."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; pass --out a directory path")
    missing = []
    probe = out
    while not probe.is_dir():
        if probe.exists() or probe.is_symlink():
            raise UserError(f"{probe}: exists and is not a directory; pass --out a directory path")
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "output directory is not writable" if probe == out else f"cannot create {out} in it (not writable)"
        raise UserError(f"{probe}: {what}; choose another --out")
    if target is not None and not missing:
        final = out / target
        if final.exists() and not final.is_dir():
            raise UserError(f"{final}: exists and is not a directory; move it away or choose another --out")
    return OutRoot(out, tuple(reversed(missing)))


_STALE = re.compile(r"^\.(?P<target>.+)\.(?:tmp|old)-[^/]+$")


def remove_stale(out_root: Path, targets: Iterable[str], log: Log) -> list[Path]:
    """Remove OUT/.<target>.tmp-* (and .old-* of older versions) whose process is gone: a directory nobody holds
    the lock of. A live export's, locked by its process, is never touched."""
    names = set(targets)
    removed = []
    with contextlib.suppress(OSError):
        entries = sorted(out_root.iterdir())
        for p in entries:
            m = _STALE.match(p.name)
            if not m or m["target"] not in names or p.is_symlink() or not p.is_dir():
                continue
            with dir_lock(p, blocking=False) as free:
                if free:
                    remove_tree(p)
                    removed.append(p)
    for p in removed:
        log(f"removed {p}: an unfinished export whose process is gone")
    return removed


@dataclass
class Attempt:
    """One export's private directory in OUT, locked by this process while it is open (``open_attempt``)."""

    out: OutRoot
    target: str
    path: Path | None  # None until made
    log: Log
    created: list[Path] = field(default_factory=list)
    published: Path | None = None
    _lock: int | None = None  # the fd holding the flock on ``path``
    _handlers: dict[int, Any] = field(default_factory=dict)

    def publish(self, passed: bool, replace_failed: bool = False) -> Path:
        """Swap the finished attempt into place: OUT/<target> when it passed (or ``replace_failed``), else
        OUT/<target>.failed beside the kept one. Returns where it went."""
        assert self.path is not None, "publish() of an attempt open_attempt did not make"
        final = self.out.path / self.target
        failed = failed_dir(self.out.path, self.target)
        if passed or replace_failed:
            replace_dir(self.path, final)
            self.published = final
            if failed.exists():
                # the earlier failure no longer describes OUT/<target>: away in one step, then removed
                gone = failed.with_name(f".{self.target}.old-failed-{os.getpid()}")
                with contextlib.suppress(OSError):
                    os.rename(failed, gone)
                    remove_tree(gone)
                    self.log(f"removed {failed}: an earlier attempt that failed parity")
            return final
        replace_dir(self.path, failed)
        self.published = failed
        if final.is_dir():
            self.log(f"parity FAILED: kept the last passing export in {final}; this attempt is in {failed} "
                     "(--replace-failed lets a failing export replace it)")
        else:
            self.log(f"parity FAILED: this attempt is in {failed}; {final} holds only an export that passed "
                     "(--replace-failed puts a failing one there)")
        return failed

    def close(self) -> None:
        """Remove what this attempt leaves behind: its directory (unpublished, or the old tree the swap put there),
        and, when it was not published, the folders of OUT it created if they are empty. A SIGTERM or SIGHUP that
        arrives meanwhile is raised once this is done."""
        pending: list[int] = []
        for sig in self._handlers:
            signal.signal(sig, lambda s, f: pending.append(s))
        try:
            if self.path is not None:
                remove_tree(self.path)
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            if self.published is None:
                for d in reversed(self.created):
                    with contextlib.suppress(OSError):
                        d.rmdir()  # only when empty: another export may have written there meanwhile
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
            self._handlers.clear()
        if pending:
            raise Terminated(pending[0])


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def open_attempt(out: OutRoot, target: str, log: Log, sweep: Iterable[str] = ()) -> Attempt:
    """Create OUT (as far as missing) and OUT/.<target>.tmp-<id>/, locked by this process; first remove what dead
    exports of ``sweep`` targets (default: this one) left. Close it with ``Attempt.close`` in a ``finally``."""
    created = []
    for d in out.missing:
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            pass
        except OSError as e:
            raise UserError(f"{d}: cannot create the output directory ({e.strerror}); choose another --out") from None
    remove_stale(out.path, {target, *sweep}, log)
    attempt = Attempt(out, target, None, log, created)
    # signals become an exception from here on (main thread only; a handler the user installed, or SIG_IGN under
    # nohup, is left alone), so that close() runs
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                attempt._handlers[sig] = signal.signal(sig, _raise_terminated)
    try:
        while True:
            path = make_private_dir(out.path, f".{target}.tmp-")
            attempt.path, attempt._lock = path, lock_dir(path)
            # a concurrent export's sweep may have taken it for a dead one's between mkdir and flock: gone then
            if path.is_dir():
                break
            if attempt._lock is not None:
                os.close(attempt._lock)
                attempt._lock = None
    except BaseException:
        attempt.close()
        raise
    return attempt
