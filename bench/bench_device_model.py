"""Re-fit the device-time model (bottlefit/emulation/devicetime.py) and write its one data file,
bottlefit/emulation/boards.json.

Three steps, each rewriting the data file in place (the board table it holds is edited by hand):

* ``--table README.md --commit SHA``: import the published timings from ncnn's ``benchmark/README.md`` (the rows of
  the boards in CALIBRATION: Raspberry Pi 3 B+, 4, 5, Zero 2 W, and RK3399's big and little cores; 1 and n threads;
  every model benchncnn times except the ones in SKIP) and each model's input shape from ``benchmark/benchncnn.cpp``
  (``--benchncnn``), with the source (repository, path, commit).
* ``--count --params DIR``: count the guest instructions of one inference of each model (``DIR/<model>.param``,
  zero weights, benchncnn's options) under qemu arm64 emulation on each calibration core, with the ncnn the arm64
  sysroot pins (bottlefit.emulation.cost.ncnn_bench_instructions); counts already in the file are kept unless
  ``--recount``. Slow: seconds to a minute per model and core (``--models`` / ``--cores`` narrow it).
* ``--fit``: fit IPC per (core, precision) and thread speed-ups, with leave-one-model-out errors
  (devicetime.fit), into the file; ``--out DIR`` writes device_model.md / device_model.json there.

    git -C ncnn show SHA:benchmark/README.md > /tmp/README.md   # and benchncnn.cpp, benchmark/models/*.param
    PYTHONPATH=. .venv/bin/python bench/bench_device_model.py --table /tmp/README.md --benchncnn /tmp/benchncnn.cpp \\
        --commit SHA --count --params /tmp/params --fit --out bench/results/device_model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from bottlefit.emulation import devicetime

# (board in the data file, the README section's title starts with, powersave value of the rows to take or None)
CALIBRATION: tuple[tuple[str, str, int | None], ...] = (
    ("pi3", "Raspberry Pi 3 Model B+", None),
    ("pi4", "Raspberry Pi 4 Model B", None),
    ("pi5", "Raspberry Pi 5 Broadcom BCM2712, Cortex-A76", None),
    ("zero2", "Raspberry Pi Zero 2 W", None),
    ("rk3399-a72", "Rockchip RK3399 (Cortex-A72", 2),  # powersave 2: the big cores
    ("rk3399-a53", "Rockchip RK3399 (Cortex-A72", 1),  # powersave 1: the little cores
)
# When each board's rows entered the README (`git blame` of their lines): the ncnn each was measured with is about
# that date's release; this project counts with the wheel ncnn 1.0.20250503, 1.5 to 3.5 years newer
ROWS_ADDED = {"pi3": "3a74ae4d3 2023-06-23 (update rpi3b+ benchmark data)",
              "pi4": "cc37c1099 2023-06-15 (update rpi4b benchmark)",
              "pi5": "070dac995 2023-12-12 (RPi 5 refreshed, #5216)",
              "zero2": "71f377e9e 2022-01-17 (update benchmark from Q-engineering)",
              "rk3399-a72": "7b222a19a 2022-01-03 (update benchmark, #3465)",
              "rk3399-a53": "7b222a19a 2022-01-03 (update benchmark, #3465)"}
# vision_transformer takes minutes per count and has one row per board; its weights-free run is not an image model
SKIP = ("vision_transformer",)
RUNTIME = "ncnn"
ROW = re.compile(r"\s*([\w.-]+)\s+min\s*=\s*[\d.]+\s+max\s*=\s*[\d.]+\s+avg\s*=\s*([\d.]+)")
REPOSITORY = "Tencent/ncnn"


def parse_table(text: str) -> dict[str, list[dict[str, Any]]]:
    """{section title: [{"threads", "powersave", "model", "ms"} ...]} from benchmark/README.md (avg column; CPU
    rows only: gpu_device = -1)."""
    out: dict[str, list[dict[str, Any]]] = {}
    title, threads, powersave, gpu = "", 0, 0, -1
    for line in text.splitlines():
        if line.startswith("### "):
            title, gpu = line[4:].strip(), -1
            out[title] = []
            continue
        if m := re.match(r"\s*num_threads\s*=\s*(\d+)", line):
            threads = int(m.group(1))
        elif m := re.match(r"\s*powersave\s*=\s*(\d+)", line):
            powersave = int(m.group(1))
        elif m := re.match(r"\s*gpu_device\s*=\s*(-?\d+)", line):
            gpu = int(m.group(1))
        elif title and gpu == -1 and (m := ROW.match(line)):
            out[title].append({"threads": threads, "powersave": powersave, "model": m.group(1),
                               "ms": float(m.group(2))})
    return out


def parse_shapes(cpp: str) -> dict[str, list[int]]:
    """{model: [w, h, c]} from benchncnn.cpp's ``benchmark("name", ncnn::Mat(w, h, c), ...)`` calls."""
    return {m.group(1): [int(m.group(2)), int(m.group(3)), int(m.group(4))]
            for m in re.finditer(r'benchmark\("([\w.-]+)",\s*ncnn::Mat\((\d+),\s*(\d+),\s*(\d+)\)', cpp)}


def import_table(doc: dict[str, Any], readme: Path, benchncnn: Path, commit: str) -> None:
    sections = parse_table(readme.read_text())
    shapes = parse_shapes(benchncnn.read_text())
    published, used = [], {}
    for name, prefix, powersave in CALIBRATION:
        title = next((t for t in sections if t.startswith(prefix)), None)
        if title is None:
            sys.exit(f"{readme}: no section starting {prefix!r}")
        used[name] = title
        for r in sections[title]:
            if (powersave is not None and r["powersave"] != powersave) or r["model"] in SKIP:
                continue
            if r["model"] not in shapes:
                sys.exit(f"{benchncnn}: no input shape for {r['model']}")
            published.append({"board": name, "model": r["model"], "runtime": RUNTIME,
                              "precision": "int8" if r["model"].endswith("_int8") else "fp32",
                              "threads": r["threads"], "ms": r["ms"], "source": "ncnn-benchmark"})
    doc["sources"] = {"ncnn-benchmark": {
        "repository": REPOSITORY, "path": "benchmark/README.md", "commit": commit,
        "sections": used, "rows_added": ROWS_ADDED, "shapes_from": "benchmark/benchncnn.cpp", "column": "avg",
        "tool": "benchncnn LOOP THREADS POWERSAVE -1 COOLING (fp16 storage/arithmetic where the core has it, int8, "
                "winograd, sgemm, packing, light mode; zero weights)"}}
    doc["published"] = published
    models = sorted({r["model"] for r in published})
    old = doc.get("models", {})
    doc["models"] = {m: {"input_whc": shapes[m], "precision": "int8" if m.endswith("_int8") else "fp32",
                         **({"param_sha256": old[m]["param_sha256"]} if "param_sha256" in old.get(m, {}) else {})}
                     for m in models}


def count(doc: dict[str, Any], params: Path, cores: list[str], models: list[str] | None, recount: bool) -> None:
    from bottlefit.emulation.arm64 import CORES, Core, ensure_sysroot
    from bottlefit.emulation.cost import ensure_plugin, ncnn_bench_instructions

    sysroot = ensure_sysroot()
    plugin = ensure_plugin()
    info = sysroot.describe()
    ncnn_wheel = next(w for w in info["wheels"] if w.startswith("ncnn-"))
    doc["counted_with"] = {"ncnn_wheel": ncnn_wheel, "sysroot_key": info["key"], "qemu": info["qemu"],
                           "qemu_plugin_source": plugin.qemu_source_version, "runs": 1, "threads": 1,
                           "how": "bottlefit.emulation.cost.ncnn_bench_instructions: one warm-up, then the marked "
                                  "span of one inference"}
    by_cpu = {c.cpu: c for c in CORES.values()}
    counts = doc.setdefault("counts", {}).setdefault(RUNTIME, {})
    # model by model, every core in turn: a run cut short still leaves every core the same models
    for m in models or sorted(doc["models"]):
        for cpu in cores:
            core: Core = by_cpu[cpu]
            have = counts.setdefault(cpu, {})
            if m in have and not recount:
                continue
            param = params / f"{m}.param"
            sha = hashlib.sha256(param.read_bytes()).hexdigest()
            old = doc["models"][m].get("param_sha256")
            if old and old != sha:
                sys.exit(f"{param}: sha256 {sha[:12]} differs from the data file's {old[:12]}: recount all cores")
            doc["models"][m]["param_sha256"] = sha
            t0 = time.monotonic()
            n = ncnn_bench_instructions(sysroot, core, param, tuple(doc["models"][m]["input_whc"]))
            have[m] = round(n)
            print(f"  {cpu:11s} {m:20s} {n / 1e6:10.1f} M instructions  ({time.monotonic() - t0:.0f} s)", flush=True)
            merge_counts(doc)
            write(doc)


def merge_counts(doc: dict[str, Any]) -> None:
    """Take in counts another --count run wrote into the file meanwhile (this run's own win where both have one)."""
    try:
        disk = json.loads(devicetime.DATA.read_text())
    except (OSError, ValueError):
        return
    for cpu, per in disk.get("counts", {}).get(RUNTIME, {}).items():
        mine = doc["counts"][RUNTIME].setdefault(cpu, {})
        for m, n in per.items():
            mine.setdefault(m, n)
    for m, rec in disk.get("models", {}).items():
        if m in doc["models"] and "param_sha256" in rec:
            doc["models"][m].setdefault("param_sha256", rec["param_sha256"])


def write(doc: dict[str, Any], path: Path = devicetime.DATA) -> None:
    from bottlefit.files import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
    devicetime._load.cache_clear()


def markdown(doc: dict[str, Any]) -> str:
    table = {b.name: b for b in devicetime.boards(doc)}
    src = doc["sources"]["ncnn-benchmark"]
    lines = ["# Device-time model: ncnn IPC fitted on published board timings", "",
             f"Published timings: {src['repository']} `{src['path']}` at `{src['commit']}` ({src['column']} of "
             f"benchncnn, {src['tool']}).", "",
             f"Counted: {doc['counted_with']['ncnn_wheel']} under {doc['counted_with']['qemu']} on the matching "
             "emulated core, one inference after one warm-up (the guest instructions between two marks).", "",
             "The published rows were measured with the ncnn of their day (rows added: " +
             "; ".join(f"{k} {v}" for k, v in src.get("rows_added", {}).items()) + "); the counts use the pinned "
             "wheel, 1.5 to 3.5 years newer (its kernels may differ: part of the error below). benchncnn's options "
             "(fp16 storage and arithmetic where the core has them: the A76) are the guest's.", "",
             "`ms = instructions / (clock_GHz x 1e6 x IPC)`; IPC is the geometric mean of the one-thread rows' "
             "implied IPC; the leave-one-model-out (LOO) error predicts each model's rows at the IPC of the other "
             "models.", "", "## Fitted IPC per core", "",
             "| core | precision | rows (models) | IPC | LOO median | LOO worst |", "|---|---|---|---|---|---|"]
    for core, per in doc["fit"]["ipc"][RUNTIME].items():
        for prec in ("fp32", "int8", "all"):
            if prec not in per:
                continue
            f = per[prec]
            rows = f"{f['rows']} ({f['models']})" if prec != "all" else ""
            ipc = f"{f['ipc']:.3f}" if prec != "all" else "(both)"
            lines.append(f"| {core} | {prec} | {rows} | {ipc} | {f['loo_median_pct']:.1f}% | "
                         f"{f['loo_worst_pct']:.1f}% ({f['loo_worst']}) |")
    lines += ["", "## Thread speed-up (over one thread, same board and model)", "",
              "| core | threads | rows | speed-up | LOO median | LOO worst |", "|---|---|---|---|---|---|"]
    for core, per in doc["fit"]["threads"].items():
        for n, f in per.items():
            lines.append(f"| {core} | {n} | {f['rows']} | {f['speedup']:.2f} | {f['loo_median_pct']:.1f}% | "
                         f"{f['loo_worst_pct']:.1f}% ({f['loo_worst']}) |")
    lines += ["", "## Published one-thread timings, counted instructions, implied IPC", "",
              "| board | core | GHz | model | published ms | counted M instr. | implied IPC | predicted ms | err |",
              "|---|---|---|---|---|---|---|---|---|"]
    counts = doc["counts"][RUNTIME]
    for r in doc["published"]:
        b = table[r["board"]]
        n = counts.get(b.core, {}).get(r["model"])
        if r["threads"] != 1 or n is None:
            continue
        fit = doc["fit"]["ipc"][RUNTIME][b.core][r["precision"]]["ipc"]
        pred = devicetime.ms_from(n, b.clock_ghz, fit)
        lines.append(f"| {r['board']} | {b.core} | {b.clock_ghz:g} | {r['model']} | {r['ms']:.2f} | {n / 1e6:.1f} | "
                     f"{devicetime.row_ipc(n, b.clock_ghz, r['ms']):.3f} | {pred:.2f} | "
                     f"{100 * (pred / r['ms'] - 1):+.0f}% |")
    lines += applied()
    return "\n".join(lines) + "\n"


def applied() -> list[str]:
    """The model applied to the R152 v2 (12 ch) heads whose counts the rpi profiles read (rpi/costs.json)."""
    from bottlefit.targets.rpi.profiles import COST_HEAD, PROFILES

    lines = ["", f"## Applied: the Pi heads of {COST_HEAD} (counts from bottlefit/targets/rpi/costs.json)", "",
             "| board | head | runtime | M instr. | predicted ms (1 thread) | basis |", "|---|---|---|---|---|---|"]
    for name, prof in PROFILES.items():
        for key in (prof.default_key, "head.int8.onnx/cpu-u8", "head.fp32.tflite/xnnpack"):
            model = key.partition("/")[0]
            runtime = {".onnx": "onnxruntime", ".param": "ncnn"}.get(Path(model).suffix, "litert")
            n = prof.costs[key] * 1e6
            p = devicetime.predict_ms(n, name, runtime, "int8" if "int8" in model else "fp32")
            lines.append(f"| {name} | {key} | {runtime} | {n / 1e6:.1f} | {p.ms:.1f} | {p.basis} |")
    return lines


def loo_points(doc: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(core, precision, published ms, leave-one-model-out predicted ms) per one-thread row."""
    table = {b.name: b for b in devicetime.boards(doc)}
    counts = doc["counts"][RUNTIME]
    rows = [(r, table[r["board"]]) for r in doc["published"]
            if r["threads"] == 1 and r["model"] in counts.get(table[r["board"]].core, {})]
    out = []
    for r, b in rows:
        n = counts[b.core][r["model"]]
        others = [devicetime.row_ipc(counts[o.core][q["model"]], o.clock_ghz, q["ms"]) for q, o in rows
                  if o.core == b.core and q["precision"] == r["precision"] and q["model"] != r["model"]]
        out.append((b.core, r["precision"], r["ms"], devicetime.ms_from(n, b.clock_ghz, devicetime.geomean(others))))
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = loo_points(doc)
    fig, ax = plt.subplots(figsize=(6, 6))
    colors = {"cortex-a53": "#4c72b0", "cortex-a72": "#dd8452", "cortex-a76": "#55a868"}
    for core, color in colors.items():
        for prec, marker in (("fp32", "o"), ("int8", "^")):
            xs = [p[2] for p in pts if p[0] == core and p[1] == prec]
            ys = [p[3] for p in pts if p[0] == core and p[1] == prec]
            if xs:
                ax.scatter(xs, ys, s=14, c=color, marker=marker, label=f"{core} {prec}")
    lo, hi = min(p[2] for p in pts) * 0.8, max(p[2] for p in pts) * 1.25
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    for f in (0.8, 1.2):
        ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published ms (ncnn benchmark/README.md, 1 thread)")
    ax.set_ylabel("predicted ms, leave-one-model-out (counted instr. / clock x IPC)")
    ax.set_title("Device-time model: ncnn on Pi 3 B+/4/5/Zero 2 W, RK3399")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, help="ncnn's benchmark/README.md")
    ap.add_argument("--benchncnn", type=Path, help="ncnn's benchmark/benchncnn.cpp (input shapes)")
    ap.add_argument("--commit", help="the ncnn commit both files are from")
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--params", type=Path, help="folder of ncnn's benchmark/models/*.param")
    ap.add_argument("--cores", default="cortex-a72,cortex-a53,cortex-a76")
    ap.add_argument("--models", help="comma-separated subset to count")
    ap.add_argument("--recount", action="store_true")
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    doc = json.loads(devicetime.DATA.read_text())
    if a.table:
        if not (a.benchncnn and a.commit):
            ap.error("--table needs --benchncnn and --commit")
        import_table(doc, a.table, a.benchncnn, a.commit)
        write(doc)
    if a.count:
        if not a.params:
            ap.error("--count needs --params")
        count(doc, a.params, a.cores.split(","), a.models.split(",") if a.models else None, a.recount)
    if a.fit:
        doc["fit"] = devicetime.fit(doc)
        write(doc)
        text = markdown(doc)
        print(text)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "device_model.md").write_text(text)
            plot(doc, a.out / "device_model.png")
            (a.out / "device_model.json").write_text(json.dumps({k: doc[k] for k in ("sources", "counted_with",
                                                                                     "fit")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
