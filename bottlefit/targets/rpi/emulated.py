"""The rpi bundle's own board scripts on the Pi's instruction set, without a Pi: arm64 user-mode emulation.

The board's verify_on_board.py runs on Debian's arm64 Python with the aarch64 wheels of ai-edge-litert, ncnn and
onnxruntime (bottlefit.emulation.arm64), so the kernels that judge the heads are the ones a Pi runs. The result
is recorded as emulated, with the CPU model qemu emulated, never as "on board".

One guest process per board checks every head of the bundle (the guest's imports are paid once), and the guests
of several boards run at once. :func:`start` launches them and returns at once, so a caller can run its own work
(parity) while they run; :meth:`Running.collect` waits and gives the records. :func:`execute` is both in a row.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bottlefit.exporter.artifact import Artifact
from bottlefit.runtimes.execution import Execution, Status, Where

DEFAULT_PROFILES = ("pi4",)  # the paper's board
VERIFY_TIMEOUT_S = 900


def execute(target_dir: Path, heads: Sequence[Artifact], emulate: Any,
            log: Callable[[str], object]) -> list[Execution]:
    return start(target_dir, heads, emulate, log).collect()


@dataclass
class Running:
    """The board checks :func:`start` launched: one guest per board, every head in it."""

    target_dir: Path
    heads: list[Artifact]
    log: Callable[[str], object]
    guests: list[tuple[Any, Any]] = field(default_factory=list)  # (Core, Popen) per board, in profile order
    env: dict[str, Any] = field(default_factory=dict)  # Sysroot.describe()
    ready: list[Execution] = field(default_factory=list)  # records made without a guest (emulation unavailable)
    started: float = field(default_factory=time.monotonic)

    def collect(self) -> list[Execution]:
        """Wait for every guest and read its verify_on_board.py --json report into one record per head."""
        from bottlefit.emulation.arm64 import finish_python, last_line

        out = list(self.ready)
        for core, proc in self.guests:
            isa = f"aarch64 {core.cpu} ({core.board}, qemu-user)"
            left = max(1.0, VERIFY_TIMEOUT_S - (time.monotonic() - self.started))
            try:
                cp = finish_python(proc, core, timeout=left)
            except subprocess.TimeoutExpired:
                out += [Execution(a.file, a.runtime, Where.EMULATED, isa, True, Status.FAILED, {},
                                  f"verify_on_board.py took over {VERIFY_TIMEOUT_S} s under emulation")
                        for a in self.heads]
                continue
            out += self._records(core, isa, cp, last_line)
        self.guests = []
        return out

    def cancel(self) -> None:
        """Stop the guests (their results are not wanted: the bundle changed or the export gave up)."""
        for _, proc in self.guests:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        self.guests = []

    def _records(self, core: Any, isa: str, cp: Any, last_line: Callable[[str], str]) -> list[Execution]:
        heads, env = self.heads, self.env
        try:
            doc = json.loads(last_line(cp.stdout))
            results = {Path(r["model"]).name: r for r in doc["results"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            why = last_line(cp.stderr) or last_line(cp.stdout) or "no output"
            return [Execution(a.file, a.runtime, Where.EMULATED, isa, True, Status.FAILED, {},
                              f"verify_on_board.py exited {cp.returncode}: {why}") for a in heads]
        out: list[Execution] = []
        for a in heads:
            r = results.get(a.file)
            if r is None or r.get("status") not in ("pass", "fail"):
                why = "not listed in golden.json" if r is None else r.get("reason", r.get("status"))
                out.append(Execution(a.file, a.runtime, Where.EMULATED, isa, True, Status.FAILED, {}, str(why)))
                continue
            metrics = {"max_abs_lsb": r["max_abs_lsb"], "cosine_vs_reference": r["cosine"],
                       "mismatch_fraction": r["mismatch_fraction"], "images": len(r["images"])}
            note = (f"board/verify_on_board.py on {doc.get('machine')} Python {doc.get('python')} "
                    f"({r.get('kernels')}; wheels {', '.join(env.get('wheels', []))}; {env.get('qemu', 'qemu')}) "
                    "against golden outputs made under reference semantics")
            out.append(Execution(a.file, a.runtime, Where.EMULATED, isa, True,
                                 Status.AGREES if r["status"] == "pass" else Status.DEVIATES, metrics, note))
        return out


def start(target_dir: Path, heads: Sequence[Artifact], emulate: Any, log: Callable[[str], object]) -> Running:
    """Launch board/verify_on_board.py under emulation for every board ``emulate`` names (one guest each, all of
    them at once) and return without waiting. Emulation unavailable: with ``--emulate auto`` every record is "not
    run" with the reason; with named boards, EmulationUnavailable."""
    running = Running(Path(target_dir), list(heads), log)
    if emulate.mode == "off" or not heads:
        return running
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot, get_core, start_python

    cores = [get_core(p) for p in (emulate.profiles or DEFAULT_PROFILES)]
    try:
        sysroot = ensure_sysroot(log=lambda m: log(f"rpi: {m}"))
    except EmulationUnavailable as e:
        if emulate.mode == "on":
            raise
        running.ready = [Execution(a.file, a.runtime, Where.EMULATED, f"aarch64 {c.cpu} ({c.board})", False,
                                   Status.NOT_RUN, {}, f"emulation unavailable here: {e}")
                         for c in cores for a in heads]
        return running
    running.env = sysroot.describe()
    try:
        for core in cores:
            log(f"rpi: board/verify_on_board.py on an emulated {core.cpu} ({core.board})")
            board = running.target_dir / "board"
            running.guests.append((core, start_python(sysroot, core, board / "verify_on_board.py", ["--json"],
                                                      cwd=board)))
    except BaseException:
        running.cancel()
        raise
    return running
