"""Where an export's time and memory go: wall seconds, CPU seconds and peak RSS of each stage.

Used by bench/bench_export_profile.py (the command line below). Runs ``bottlefit export ARGS`` in this
process with a profiling ``Progress`` (bottlefit.pipeline.export): every
stage boundary the pipeline marks (load, split, calibration images, held-out images, per target: rung setup, split
check, build, parity, emulation, manifest) and, inside a target's build, every progress line the target prints
(``rpi: head.int8.tflite ...`` starts that head's stage: a line names the work that follows it) closes one interval
and opens the next. An export without marks (older versions) is cut by its progress lines alone (``LINES``). Per
interval: wall (perf_counter), CPU (this process and its reaped children: the emulated board's guest processes),
and peak RSS of this process in it (Linux: VmHWM, reset at each boundary through /proc/self/clear_refs, which is
why ``/usr/bin/time -v``'s maximum RSS of a profiled run is wrong: measure that on a run without this script).

    PYTHONPATH=. .venv/bin/python bench/bench_export_profile.py [--json FILE] [--check BASELINE] -- \\
        /work/ckpt/r152v2_12.pt --target jetson,rpi --profile orin --out /tmp/o

``--check BASELINE`` (a ``--json`` file of an earlier run of the same command): exit 1 when the total CPU seconds,
a stage's CPU seconds (stages of at least 2 CPU s in the baseline) or the peak RSS grew beyond ``--margin`` (default
50% for CPU, a third of it for RSS). CPU seconds, not wall: a shared CI box's wall clock says little.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import Any

# progress line -> the stage of the work that follows it (None: the current stage goes on); the first match wins
LINES: tuple[tuple[str, str | None], ...] = (
    (r"^loading ", "load + split"),
    (r"^(NOTE|warning): ", None),
    (r"^target \S+ \(", "target setup"),
    (r"^recipe \S+ \(observer", "rung setup"),
    (r"^(folded|equalized) ", "split check"),
    (r"^split at ", "build setup"),
    (r"^calibration set: ", None),
    (r"^held-out", None),
    (r"^exporting head\.onnx", "head.onnx"),
    (r"^exporting tail\.onnx", "tail.onnx"),
    (r"^ONNX Runtime vs PyTorch", "head.int8.onnx"),
    (r"^quantizing head\.qdq\.onnx", "head.qdq.onnx"),
    (r"^quantizing head\.onnx ->", "head.int8.onnx"),
    (r"^wrote head\.calib\.cache", "golden I/O"),
    (r"^golden I/O", "board files"),
    (r"^Triton model repository", "board files"),
    (r"^rpi: board profile", "head rewrite"),
    (r"^rpi: head\.int8\.tflite", "head.int8.tflite"),
    (r"^rpi: \d+ float ops", "head.fp32.tflite"),
    (r"^rpi: head\.int8\.onnx", "head.int8.onnx"),
    (r"^rpi: head\.int8\.ncnn", "head.int8.ncnn"),
    (r"^\S+: codec tables for ", "codec tables + board files"),
    (r"^parity: ", "parity"),
    (r"^rpi: board/verify_on_board\.py on an emulated", "emulation"),
    (r"^recipe \S+ (passed|failed)", "manifest"),
    (r"^wrote /", "done"),
)
_LINES = [(re.compile(p), s) for p, s in LINES]
_TARGET = re.compile(r"^target (\S+) \(")


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: peaks then run from the start
        pass


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Recorder:
    """Intervals between stage boundaries: (target, stage, wall s, CPU s, peak RSS MB)."""

    def __init__(self, target: str) -> None:
        self.target, self.stack, self.sub, self.marked = target, ["startup"], None, False
        self.rows: list[dict[str, Any]] = []
        self.t, self.c = time.perf_counter(), _cpu()
        _reset_hwm()

    def _label(self) -> str:
        top = self.stack[-1]
        return f"{top}: {self.sub}" if self.sub and top == "build" else (self.sub or top)

    def _close(self) -> None:
        t, c = time.perf_counter(), _cpu()
        self.rows.append({"target": self.target, "stage": self._label(), "wall_s": t - self.t, "cpu_s": c - self.c,
                          "peak_rss_mb": _hwm_kb() / 1024})
        self.t, self.c = t, c
        _reset_hwm()

    def line(self, msg: str) -> None:
        m = _TARGET.match(msg)
        label = next((s for rx, s in _LINES if rx.match(msg)), None) if not m else None
        if m and not self.marked:
            self._close()
            self.target, self.sub = m[1], "target setup"
            return
        if label is None or (self.marked and self.stack[-1] != "build"):
            return  # a marked export: lines only cut a target's build into its heads
        self._close()
        self.sub = None if self.marked and label == "build setup" else label

    def mark(self, stage: str) -> None:
        self.marked = True
        self._close()
        self.sub = None
        if stage.startswith("+"):
            self.stack.append(stage[1:])
        elif stage.startswith("/"):
            self.stack.pop()
        elif stage.startswith("target "):
            self.target, self.stack = stage.split()[1], ["target setup"]
        else:
            self.stack = [stage]

    def finish(self) -> None:
        self._close()


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["stage"] in ("startup", "done") and r["cpu_s"] < 0.05:
            continue
        a = out.setdefault((r["target"], r["stage"]), {"target": r["target"], "stage": r["stage"], "wall_s": 0.0,
                                                        "cpu_s": 0.0, "peak_rss_mb": 0.0, "intervals": 0})
        a["wall_s"] += r["wall_s"]
        a["cpu_s"] += r["cpu_s"]
        a["peak_rss_mb"] = max(a["peak_rss_mb"], r["peak_rss_mb"])
        a["intervals"] += 1
    return [{**v, "wall_s": round(v["wall_s"], 2), "cpu_s": round(v["cpu_s"], 2),
             "peak_rss_mb": round(v["peak_rss_mb"], 1)} for v in out.values()]


def profile(args: list[str]) -> dict[str, Any]:
    from bottlefit import cli
    from bottlefit.pipeline import export as pipeline

    base = pipeline.Progress
    target = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--target"), "?")
    rec = Recorder(target if "," not in target else "-")

    class Profiled(base):  # type: ignore[misc, valid-type]
        def __call__(self, msg: str) -> None:
            rec.line(msg)
            super().__call__(msg)

        def mark(self, stage: str) -> None:
            rec.mark(stage)

    pipeline.Progress = Profiled  # type: ignore[misc]
    t0, c0 = time.perf_counter(), _cpu()
    try:
        rc = cli.main(["export", *args])
    finally:
        pipeline.Progress = base  # type: ignore[misc]
    rec.finish()
    stages = _aggregate(rec.rows)
    return {"command": ["bottlefit", "export", *args], "exit_code": rc,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(),
                     "python": platform.python_version()},
            "total": {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(_cpu() - c0, 2),
                      "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rec.rows), 1)},
            "stages": stages}


def render(d: dict[str, Any]) -> str:
    tot = d["total"]
    lines = [f"`{' '.join(d['command'])}` (exit {d['exit_code']}; load average after "
             f"{', '.join(f'{x:.1f}' for x in d['host']['loadavg_after'])} on {d['host']['cpus']} CPUs)", "",
             "| target | stage | wall s | CPU s | CPU share | peak RSS MB |", "|---|---|---:|---:|---:|---:|"]
    for s in d["stages"]:
        share = s["cpu_s"] / tot["cpu_s"] if tot["cpu_s"] else 0.0
        lines.append(f"| {s['target']} | {s['stage']} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} | {share:.1%} | "
                     f"{s['peak_rss_mb']:.0f} |")
    lines.append(f"| **total** | | **{tot['wall_s']:.2f}** | **{tot['cpu_s']:.2f}** | | **{tot['peak_rss_mb']:.0f}** |")
    return "\n".join(lines) + "\n"


def regressions(now: dict[str, Any], base: dict[str, Any], margin: float) -> list[str]:
    """What grew beyond ``margin`` over ``base``: total and per-stage CPU seconds, peak RSS (a third of it)."""
    out = []
    if now["total"]["cpu_s"] > base["total"]["cpu_s"] * (1 + margin):
        out.append(f"total CPU {now['total']['cpu_s']:.1f} s > {base['total']['cpu_s']:.1f} s x {1 + margin:g}")
    if now["total"]["peak_rss_mb"] > base["total"]["peak_rss_mb"] * (1 + margin / 3):
        out.append(f"peak RSS {now['total']['peak_rss_mb']:.0f} MB > {base['total']['peak_rss_mb']:.0f} MB x "
                   f"{1 + margin / 3:.3g}")
    cur = {(s["target"], s["stage"]): s for s in now["stages"]}
    for s in base["stages"]:
        n = cur.get((s["target"], s["stage"]))
        if s["cpu_s"] >= 2.0 and n is not None and n["cpu_s"] > s["cpu_s"] * (1 + margin):
            out.append(f"{s['target']} {s['stage']}: CPU {n['cpu_s']:.1f} s > {s['cpu_s']:.1f} s x {1 + margin:g}")
    return out
