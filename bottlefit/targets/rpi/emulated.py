"""The rpi bundle's own board scripts on the Pi's instruction set, without a Pi: arm64 user-mode emulation.

The board's verify_on_board.py runs on Debian's arm64 Python with the aarch64 wheels of ai-edge-litert, ncnn and
onnxruntime (bottlefit.emulation.arm64), so the kernels that judge the heads are the ones a Pi runs. The result
is recorded as emulated, with the CPU model qemu emulated, never as "on board".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bottlefit.exporter.artifact import Artifact
from bottlefit.runtimes.execution import Execution

DEFAULT_PROFILES = ("pi4",)  # the paper's board
VERIFY_TIMEOUT_S = 900


def execute(target_dir: Path, heads: Sequence[Artifact], emulate: Any,
            log: Callable[[str], object]) -> list[Execution]:
    if emulate.mode == "off" or not heads:
        return []
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot, get_core, last_line, run_python

    cores = [get_core(p) for p in (emulate.profiles or DEFAULT_PROFILES)]
    try:
        sysroot = ensure_sysroot(log=lambda m: log(f"rpi: {m}"))
    except EmulationUnavailable as e:
        if emulate.mode == "on":
            raise
        return [Execution(a.file, a.runtime, "emulated", f"aarch64 {c.cpu} ({c.board})", False, "not run", {},
                          f"emulation unavailable here: {e}") for c in cores for a in heads]
    env = sysroot.describe()
    out: list[Execution] = []
    for core in cores:
        isa = f"aarch64 {core.cpu} ({core.board}, qemu-user)"
        log(f"rpi: board/verify_on_board.py on an emulated {core.cpu} ({core.board})")
        cp = run_python(sysroot, core, target_dir / "board" / "verify_on_board.py", ["--json"],
                        cwd=target_dir / "board", timeout=VERIFY_TIMEOUT_S)
        try:
            doc = json.loads(last_line(cp.stdout))
            results = {Path(r["model"]).name: r for r in doc["results"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            why = last_line(cp.stderr) or last_line(cp.stdout) or "no output"
            out += [Execution(a.file, a.runtime, "emulated", isa, True, "failed", {},
                              f"verify_on_board.py exited {cp.returncode}: {why}") for a in heads]
            continue
        for a in heads:
            r = results.get(a.file)
            if r is None or r.get("status") not in ("pass", "fail"):
                why = "not listed in golden.json" if r is None else r.get("reason", r.get("status"))
                out.append(Execution(a.file, a.runtime, "emulated", isa, True, "failed", {}, str(why)))
                continue
            metrics = {"max_abs_lsb": r["max_abs_lsb"], "cosine_vs_reference": r["cosine"],
                       "mismatch_fraction": r["mismatch_fraction"], "images": len(r["images"])}
            note = (f"board/verify_on_board.py on {doc.get('machine')} Python {doc.get('python')} "
                    f"({r.get('kernels')}; wheels {', '.join(env.get('wheels', []))}; {env.get('qemu', 'qemu')}) "
                    "against golden outputs made under reference semantics")
            out.append(Execution(a.file, a.runtime, "emulated", isa, True,
                                 "agrees" if r["status"] == "pass" else "deviates", metrics, note))
    return out
