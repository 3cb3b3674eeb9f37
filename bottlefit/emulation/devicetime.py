"""A board's milliseconds from the guest instructions it retires: ``ms = instructions / (clock × IPC)``.

The effective instructions per cycle (IPC) is fitted per (core, runtime, precision) on published single-board
timings of named models (ncnn's ``benchmark/README.md``: Raspberry Pi 3 B+, 4, 5, Zero 2 W and RK3399 rows), whose
instructions per inference were counted under qemu arm64 emulation on the matching core with the ncnn this project
pins (:func:`bottlefit.emulation.cost.ncnn_bench_instructions`). Everything lives in one data file,
``boards.json`` beside this module: the board table, the published timings with their source (repository, path,
commit), the counted instructions, the fitted IPCs, thread speed-ups and their leave-one-model-out errors.
``bench/bench_device_model.py --count --fit`` rewrites it.

Every figure says how it was had (:class:`Basis`): ``measured`` on the board, ``predicted`` from counted
instructions at a fitted IPC of the same runtime, ``extrapolated`` where the runtime (ONNX Runtime, LiteRT, plain
Python) has no published timings and the ncnn IPC of the same core stands in, ``assumed`` for a stated factor.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.files import read_data_file

DATA = Path(__file__).with_name("boards.json")
SCHEMA = "bottlefit.devicetime/1"
FITTED_RUNTIMES = ("ncnn",)  # runtimes with published timings the IPC is fitted on


class Basis(StrEnum):
    MEASURED = "measured"  # timed on the board itself (run-head --json, a measured factor)
    PREDICTED = "predicted"  # counted under emulation, at a fitted IPC of the same runtime and precision
    EXTRAPOLATED = "extrapolated"  # counted, at the IPC fitted for another runtime (no published timings)
    ASSUMED = "assumed"  # a stated factor or placeholder, not fitted and not measured


@dataclass(frozen=True)
class Prediction:
    ms: float
    basis: Basis
    why: str  # one line: the fit (or measurement) the figure comes from

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "basis": str(self.basis), "why": self.why}


@dataclass(frozen=True)
class Board:
    name: str  # "pi4"
    title: str  # "Raspberry Pi 4 Model B"
    core: str  # qemu's CPU name, "cortex-a72"
    clock_ghz: float
    cores: int
    profile: str | None  # the bottlefit rpi profile emulating it, None for a calibration-only board
    note: str = ""
    # a board with a profile: what its emulated /proc/cpuinfo shows (bottlefit.emulation.arm64.CORES) and the rpi
    # profile records (bottlefit.targets.rpi.profiles)
    short_name: str = ""  # "Raspberry Pi 4": the cpuinfo Model line
    cpu_part: str = ""  # "0xd08": the cpuinfo CPU part (the core's MIDR part number)
    features: tuple[str, ...] = ()  # the cpuinfo Features line as the board's kernel prints it


def data(path: Path | None = None) -> dict[str, Any]:
    """The data file (``boards.json``), parsed; one clear line if it is missing or not this schema."""
    return _load(str(path or DATA))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    return read_data_file(path, SCHEMA, "the device-time data", "bench/bench_device_model.py --fit")


def boards(doc: Mapping[str, Any] | None = None) -> list[Board]:
    """The board table, the one source of every board's core, clock, cores and (boards with a bottlefit profile)
    emulated /proc/cpuinfo: every board with published timings or a bottlefit profile."""
    doc = doc or data()
    return [Board(name=k, title=v["title"], core=v["core"], clock_ghz=float(v["clock_ghz"]), cores=int(v["cores"]),
                  profile=v.get("profile"), note=v.get("note", ""), short_name=v.get("short_name", ""),
                  cpu_part=v.get("cpu_part", ""), features=tuple(v.get("features", "").split()))
            for k, v in doc["boards"].items()]


def board(name: str, doc: Mapping[str, Any] | None = None) -> Board:
    table = {b.name: b for b in boards(doc)}
    if name not in table:
        raise UserError(f"unknown board {name!r}: known boards are {', '.join(table)}")
    return table[name]


def ipc(core: str, runtime: str, precision: str, doc: Mapping[str, Any] | None = None) -> tuple[float, Basis, str]:
    """(IPC, basis, why) for ``runtime``/``precision`` on ``core``: the fit of that runtime, else the ncnn fit of
    the same core (extrapolated). Precision "int8" uses the int8 fit; anything else the fp32 one."""
    doc = doc or data()
    prec = "int8" if precision == "int8" else "fp32"
    fits = doc["fit"]["ipc"]
    own = runtime in FITTED_RUNTIMES
    src = runtime if own else FITTED_RUNTIMES[0]
    try:
        row = fits[src][core][prec]
    except KeyError:
        raise UserError(f"no fitted IPC for {src}/{prec} on {core}: rerun bench/bench_device_model.py --fit") \
            from None
    basis = Basis(row.get("basis", "predicted"))
    if basis is Basis.PREDICTED and not own:
        basis = Basis.EXTRAPOLATED
    why = (f"{src} {prec} IPC {row['ipc']:.3f} on {core} fitted on {row['rows']} published timings "
           f"(leave-one-model-out error median {row['loo_median_pct']:.0f}%, worst {row['loo_worst_pct']:.0f}%)"
           if basis is not Basis.ASSUMED else f"{src} {prec} IPC {row['ipc']:.3f} on {core}: placeholder, not fitted")
    if not own:
        why += f"; {runtime} has no published board timings here: its instructions at ncnn's IPC (extrapolation)"
    return float(row["ipc"]), basis, why


def thread_speedup(core: str, threads: int, doc: Mapping[str, Any] | None = None) -> float:
    """The fitted speed-up of ``threads`` over one thread on ``core`` (1.0 for one thread)."""
    if threads < 1:
        raise UserError(f"threads {threads}: must be >= 1")
    if threads == 1:
        return 1.0
    doc = doc or data()
    table = doc["fit"]["threads"].get(core, {})
    if str(threads) not in table:
        raise UserError(f"no published {threads}-thread timings on {core} to fit a speed-up from (have "
                        f"{', '.join(['1', *sorted(table)])}); predict with threads=1")
    return float(table[str(threads)]["speedup"])


def predict_ms(instructions: float, board: str, runtime: str, precision: str, threads: int = 1) -> Prediction:
    """Milliseconds of ``instructions`` (guest instructions counted on ``board``'s core) on ``board``."""
    doc = data()
    b = _board(board, doc)
    if not math.isfinite(instructions) or instructions < 0:
        raise UserError(f"instructions {instructions!r}: must be a finite count >= 0")
    value, basis, why = ipc(b.core, runtime, precision, doc)
    speed = thread_speedup(b.core, threads, doc)
    ms = ms_from(instructions, b.clock_ghz, value, speed)
    tail = f", {threads} threads x{speed:.2f}" if threads > 1 else ""
    return Prediction(ms, basis, f"{instructions / 1e6:.1f} M instructions / ({b.clock_ghz:g} GHz x {why}){tail}")


def ms_from(instructions: float, clock_ghz: float, ipc_value: float, speedup: float = 1.0) -> float:
    """The model's arithmetic: instructions / (clock_GHz x 1e6 x IPC) / thread speed-up, in milliseconds."""
    return instructions / (clock_ghz * 1e6 * ipc_value) / speedup


def measured(ms: float, why: str) -> Prediction:
    """A figure timed on the board itself."""
    return Prediction(float(ms), Basis.MEASURED, why)


def assumed_factor(host_ms: float, factor: float, why: str) -> Prediction:
    """This host's milliseconds times a stated factor."""
    return Prediction(float(host_ms) * factor, Basis.ASSUMED, f"this host's {host_ms:.2f} ms x {factor:g}: {why}")


def _board(name: str, doc: Mapping[str, Any]) -> Board:
    return board(name, doc)


# -- the fit (bench/bench_device_model.py --fit writes its results into the data file)


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def row_ipc(instructions: float, clock_ghz: float, ms: float) -> float:
    """The IPC one published timing implies: instructions / (clock x time)."""
    return instructions / (clock_ghz * 1e6 * ms)


def fit(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The fit from the data file's published timings and counted instructions: per (runtime, core, precision) the
    geometric-mean IPC of the one-thread rows and its leave-one-model-out error (each model's rows predicted at the
    IPC of the other models); per (core, threads) the geometric-mean speed-up over one thread, with its own
    leave-one-model-out error. Pure arithmetic on the file's numbers: a test recomputes it."""
    table = {b.name: b for b in boards(doc)}
    counts = doc["counts"]
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in doc["published"]:
        b = table[r["board"]]
        n = counts.get(r["runtime"], {}).get(b.core, {}).get(r["model"])
        if n is None or r["threads"] != 1:
            continue
        rows.setdefault((r["runtime"], b.core, r["precision"]), []).append(
            {**r, "instructions": float(n), "ipc": row_ipc(float(n), b.clock_ghz, float(r["ms"]))})
    out: dict[str, Any] = {"ipc": {}, "threads": {}, "loo": {}}
    for (runtime, core, prec), rs in sorted(rows.items()):
        value = geomean([r["ipc"] for r in rs])
        errs = _loo(rs, lambda r: r["ipc"])
        out["ipc"].setdefault(runtime, {}).setdefault(core, {})[prec] = {
            "ipc": round(value, 6), "rows": len(rs), "models": len({r["model"] for r in rs}), "basis": "predicted",
            **_summary(errs)}
        out["loo"].setdefault(runtime, {}).setdefault(core, []).extend(errs)
    for runtime, per_core in out["loo"].items():
        for core, errs in per_core.items():
            out["ipc"][runtime][core]["all"] = _summary(errs)
    speed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    ones = {(r["board"], r["model"], r["runtime"]): float(r["ms"]) for r in doc["published"] if r["threads"] == 1}
    for r in doc["published"]:
        one = ones.get((r["board"], r["model"], r["runtime"]))
        if r["threads"] > 1 and one is not None:
            speed.setdefault((table[r["board"]].core, int(r["threads"])), []).append(
                {**r, "speedup": one / float(r["ms"])})
    for (core, n), rs in sorted(speed.items()):
        errs = _loo(rs, lambda r: r["speedup"])
        out["threads"].setdefault(core, {})[str(n)] = {"speedup": round(geomean([r["speedup"] for r in rs]), 6),
                                                        "rows": len(rs), **_summary(errs)}
    del out["loo"]
    return out


def _loo(rs: Sequence[Mapping[str, Any]], key: Any) -> list[dict[str, Any]]:
    """Each row's signed error (%) when its model is left out: the quantity fitted (IPC or speed-up) is inversely
    proportional to time, so predicted / published = the row's own value / the others' geometric mean."""
    out = []
    for r in rs:
        others = [key(o) for o in rs if o["model"] != r["model"]]
        if not others:
            continue
        out.append({"board": r["board"], "model": r["model"], "precision": r["precision"],
                    "err_pct": round(100.0 * (key(r) / geomean(others) - 1.0), 4)})
    return out


def _summary(errs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not errs:
        return {"loo_median_pct": float("nan"), "loo_worst_pct": float("nan"), "loo_worst": ""}
    worst = max(errs, key=lambda e: abs(e["err_pct"]))
    return {"loo_median_pct": round(statistics.median(abs(e["err_pct"]) for e in errs), 4),
            "loo_worst_pct": round(abs(worst["err_pct"]), 4), "loo_worst": f"{worst['board']}/{worst['model']}"}
