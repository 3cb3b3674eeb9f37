"""The board's wire encoder (bottlefit/serve/boardcodec.py), counted: guest instructions per frame of each codec a
board encodes, before and after a change, side by side in one run, on the emulated Raspberry Pi cores (qemu arm64
user mode with the Pi OS Python 3.11 and numpy of the sysroot; bottlefit.serve.wirecost), with the predicted board
milliseconds.

Frames: ResNet-152 ver2 with 12 bottleneck channels (/work/ckpt/r152v2_12.pt, the authors' format, seed-0 weights),
exported to int8 ONNX with bottlefit's defaults; its int8 head's codes on the built-in held-out photos and the
export's shipped context tables are saved in bench/results/board_codec/frames_r152v2_12.npz (``--export OUT``
rebuilds that file from an export). "before" is boardcodec.py at git revision ``--before``; "after" is this
checkout's numpy path (numba not importable: what a board without the optional ``board`` extra runs); "numba" is
this checkout with numba 0.68.1 on the guest's path (wirecost.JIT_WHEELS, an overlay beside the sysroot): its
steady state, its first frame in a fresh process (numba's import and the kernels' compile), and its first frame in
a second process (numba's import and the compiled kernels loaded from numba's on-disk cache). All encoders' bytes
are compared on every saved frame first (on this host: the bytes are the format's, not the CPU's).

Predicted ms: bottlefit.emulation.devicetime.predict_ms(instructions, board, "python", "fp32") when that module
is present (Python + numpy at the IPC fitted for ncnn on the same core: an extrapolation, labelled so), else
instructions / (clock x an assumed IPC of 1.0).

    .venv/bin/python bench/bench_board_codec.py [--before REV] [--boards pi4,pi5] [--runs 3] [--export OUT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np

from bottlefit.emulation.arm64 import ensure_sysroot, get_core
from bottlefit.serve import boardcodec, wirecost

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "board_codec"
FRAMES = RESULTS / "frames_r152v2_12.npz"
BEFORE = "8df7cb7"  # main before the vectorised encoder (issue 22 item 4)
ASSUMED_IPC = 1.0
CLOCK_GHZ = {"pi4": 1.5, "pi5": 2.4, "pi3": 1.4, "zero2": 1.0}  # used only without devicetime


def save_frames(out: Path, path: Path) -> None:
    """The export's int8 head codes on the built-in held-out photos and its context tables -> ``path``."""
    from bottlefit.serve.contract import find_targets
    from bottlefit.serve.head import calibration_symbols, load_tables

    target = find_targets(out)[0]
    contract = next(c for c in target.contracts if c.quantized)
    t = load_tables(target, contract).arrays()
    sym = calibration_symbols(target, contract, "heldout")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, symbols=sym, contract_id=np.array(contract.contract_id), dtype=np.array(contract.dtype),
                        marginal_counts=t["marginal_counts"], **{k: t[k] for k in boardcodec.TABLE_KEYS})


def load_frames(path: Path) -> tuple[dict, np.ndarray, str]:
    with np.load(path, allow_pickle=False) as z:
        tables = {k: np.asarray(z[k], dtype=np.int64) for k in boardcodec.TABLE_KEYS + ("marginal_counts",)}
        tables["contract_id"] = str(z["contract_id"])
        return tables, np.asarray(z["symbols"], dtype=np.uint8), str(z["dtype"])


def module_at(rev: str, tmp: Path) -> tuple[Path, ModuleType]:
    """boardcodec.py at git ``rev``: its file and the module imported from it."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{rev}:bottlefit/serve/boardcodec.py"],
                         capture_output=True, text=True)
    if src.returncode != 0:
        sys.exit(f"error: git show {rev}:bottlefit/serve/boardcodec.py failed: {src.stderr.strip()}")
    path = tmp / "before" / "boardcodec.py"
    path.parent.mkdir()
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("boardcodec_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return path, mod


# the after-encoder's stages on one frame (frame 1, after a warm-up on frame 0), between marks
STAGES_GUEST = '''\
import os
import sys
import zlib

import numpy as np

import boardcodec as bc


def mark():
    try:
        os.close(@MARK_FD@)
    except OSError:
        pass


t = bc.load(sys.argv[1])
frames = np.load(sys.argv[2])
bc.encode(t, frames[0])
sym = np.asarray(frames[1], dtype=np.int64)
mark()
flat, bounds = bc.coding_order(*sym.shape)
model = bc.image_model(t, sym)
mark()
p, k, zk = (v.reshape(-1)[flat] for v in model)
s = sym.reshape(-1)[flat]
mark()
left, freq = bc.quantized_all(t, bc._cumulative(t), bounds, k, p, zk, s)
mark()
bc.ans_encode(left + s, freq + 1)
mark()
zlib.crc32(frames[1].tobytes())
mark()
'''
STAGES = ("image model (predictions, context rows)", "coding order (gathers)",
          "adaptive counts and quantized frequencies", "rANS loop (pure Python)", "crc32 of the frame")


def stages(sysroot, board: str, tables: dict, sym: np.ndarray, tmp: Path) -> dict[str, float]:
    """Guest instructions of each stage of this checkout's context encoder on one frame."""
    from bottlefit.emulation import cost

    lib = tmp / "stages"
    lib.mkdir()
    (lib / "boardcodec.py").write_bytes(Path(boardcodec.__file__).read_bytes())
    np.savez(lib / "tables.npz", contract_id=np.array(tables["contract_id"]),
             **{k: tables[k] for k in boardcodec.TABLE_KEYS + ("marginal_counts",)})
    np.save(lib / "sym.npy", sym[:2])
    c = cost.count_guest_script(sysroot, get_core(board), STAGES_GUEST.replace("@MARK_FD@", str(cost.MARK_FD)),
                                [str(lib / "tables.npz"), str(lib / "sym.npy")], extra_site=[lib], name="stages")
    return dict(zip(STAGES, cost.spans(c), strict=True))


def predict(instructions: float, board: str) -> dict:
    try:
        from bottlefit.emulation import devicetime
    except ImportError:
        devicetime = None
    if devicetime is not None:
        return devicetime.predict_ms(instructions, board, "python", "fp32").to_dict()
    ms = instructions / (CLOCK_GHZ[board] * 1e9 * ASSUMED_IPC) * 1e3
    return {"ms": ms, "basis": "assumed", "why": f"{CLOCK_GHZ[board]} GHz x an assumed IPC of {ASSUMED_IPC} for "
            "Python + numpy (no fitted device-time model in this checkout)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE, help=f"git revision of the baseline boardcodec.py (default {BEFORE})")
    ap.add_argument("--boards", default="pi4,pi5", help="emulated boards (default pi4,pi5)")
    ap.add_argument("--runs", type=int, default=3, help="frames counted per codec after the warm-up (default 3)")
    ap.add_argument("--frames", type=Path, default=FRAMES, help=f"saved frames and tables (default {FRAMES})")
    ap.add_argument("--export", type=Path, metavar="OUT", help="rebuild --frames from this export first")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    a = ap.parse_args()
    if a.export is not None:
        save_frames(a.export, a.frames)
    if not a.frames.is_file():
        sys.exit(f"error: {a.frames} not found: pass --export OUT (an int8 export of r152v2_12.pt) to build it")
    tables, sym, dtype = load_frames(a.frames)
    boards = [b for b in a.boards.split(",") if b]
    with tempfile.TemporaryDirectory(prefix="bench-board-codec-") as d:
        before_src, before = module_at(a.before, Path(d))
        # 1. the same bytes: every saved frame, both encoders, on this host
        jit = boardcodec._kernels() is not None
        same = [before.encode(dict(tables), s) == boardcodec.encode(tables, s, jit=False) ==
                (boardcodec.encode(tables, s, jit=True) if jit else boardcodec.encode(tables, s, jit=False))
                for s in sym]
        payload = float(np.mean([len(boardcodec.encode(tables, s)) for s in sym]))
        print(f"frames: {len(sym)} x {list(sym.shape[1:])} symbols ({dtype} contract {tables['contract_id']}), "
              f"context payload {payload:.0f} B mean; before ({a.before}), after and "
              f"{'numba (this host)' if jit else 'not numba (not installed here)'} encode identical bytes: "
              f"{sum(same)}/{len(same)}")
        if not all(same):
            sys.exit("error: the encoders disagree: the wire format changed")
        sysroot = ensure_sysroot(print)
        rows = []
        for board in boards:
            core = get_core(board)
            counted = {}
            for label, src in (("before", before_src), ("after", Path(boardcodec.__file__))):
                counted[label] = wirecost.count_codecs(sysroot, core, tables, sym, runs=a.runs, dtype=dtype,
                                                       source=src)
            keep = Path(d) / f"numba-{board}"  # one folder: the second process loads what the first compiled
            numba = [wirecost.count_codecs(sysroot, core, tables, sym, ["context"], runs=a.runs, dtype=dtype,
                                           jit=True, numba_cache=keep)["context"] for _ in range(2)]
            if numba[0].frame_bytes != counted["after"]["context"].frame_bytes:
                sys.exit("error: the compiled encoder's frames differ")
            j = numba[0]
            pj = predict(j.instructions, board)
            numba_row = {"board": board, "core": core.cpu, "codec": "context (numba)", "frame_bytes": j.frame_bytes,
                         "before_instructions": counted["before"]["context"].instructions,
                         "after_instructions": j.instructions,
                         "ratio": counted["before"]["context"].instructions / j.instructions,
                         "before_first_frame": counted["before"]["context"].first_frame,
                         "after_first_frame": j.first_frame, "after_first_frame_cached": numba[1].first_frame,
                         "steady_cached_process": numba[1].instructions,
                         "before_ms": predict(counted["before"]["context"].instructions, board), "after_ms": pj,
                         "first_frame_ms": predict(j.first_frame, board),
                         "first_frame_cached_ms": predict(numba[1].first_frame, board)}
            for codec in wirecost.BOARD_CODECS:
                b, n = counted["before"][codec], counted["after"][codec]
                pb, pn = predict(b.instructions, board), predict(n.instructions, board)
                rows.append({"board": board, "core": core.cpu, "codec": codec, "frame_bytes": n.frame_bytes,
                             "before_instructions": b.instructions, "after_instructions": n.instructions,
                             "ratio": b.instructions / n.instructions, "before_first_frame": b.first_frame,
                             "after_first_frame": n.first_frame, "before_ms": pb, "after_ms": pn})
            rows.append(numba_row)
        split = stages(sysroot, boards[0], tables, sym, Path(d))
    head = ("| board | codec | frame B (counted frames) | before M instr/frame | after M instr/frame | before / after "
            "| predicted ms before | predicted ms after | basis |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head] + [f"| {r['board']} ({r['core']}) | {r['codec']} | {r['frame_bytes']:.0f} | "
                      f"{r['before_instructions'] / 1e6:.2f} | {r['after_instructions'] / 1e6:.2f} | "
                      f"{r['ratio']:.2f}x | {r['before_ms']['ms']:.1f} | {r['after_ms']['ms']:.1f} | "
                      f"{r['after_ms']['basis']} |" for r in rows]
    print("\n".join(lines))
    first = ["| board | numba first frame, fresh cache: M instr | predicted s | numba first frame, cached: M instr "
             "| predicted s |", "|---|---:|---:|---:|---:|"] + \
        [f"| {r['board']} ({r['core']}) | {r['after_first_frame'] / 1e6:.0f} | {r['first_frame_ms']['ms'] / 1e3:.1f} | "
         f"{r['after_first_frame_cached'] / 1e6:.0f} | {r['first_frame_cached_ms']['ms'] / 1e3:.1f} |"
         for r in rows if r["codec"] == "context (numba)"]
    print("\n".join(first))
    total = sum(split.values())
    stage_lines = ["| stage | M instr | share |", "|---|---:|---:|"] + \
        [f"| {name} | {v / 1e6:.2f} | {v / total:.0%} |" for name, v in split.items()]
    print(f"after-encoder stages on {boards[0]} (frame 1):")
    print("\n".join(stage_lines))
    whys = [f"{r['board']}: {r['after_ms']['why']}" for r in rows if r["codec"] == "context (numba)"]
    for w in whys:
        print(f"  {w}")
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"frames": str(a.frames.relative_to(HERE.parent)) if a.frames.is_relative_to(HERE.parent) else str(a.frames),
            "shape": list(sym.shape[1:]), "dtype": dtype, "contract_id": tables["contract_id"], "before": a.before,
            "runs": a.runs, "jit_wheels": list(wirecost.JIT_WHEELS),
            "identical_bytes": f"{sum(same)}/{len(same)}", "context_payload_bytes": payload,
            "after_stages": {"board": boards[0], "frame": 1, "instructions": split},
            "sysroot": sysroot.describe(), "rows": rows,
            "method": "guest instructions between marks around `runs` frames after one warm-up frame, per codec, "
                      "one guest process per (board, encoder); qemu-user + bottlefit's counting plugin"}
    (a.out / "board_codec.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    md = ["# The board's wire encoder, counted (bench/bench_board_codec.py)", "",
          f"{len(sym)} held-out frames of ResNet-152 v2 12 ch ({list(sym.shape[1:])} {dtype} symbols, contract "
          f"{tables['contract_id']}); counted: frames 0..{a.runs - 1} after a warm-up frame; before = boardcodec.py "
          f"at {a.before}, after = this commit's numpy path (no numba), context (numba) = this commit with "
          f"{' and '.join(wirecost.JIT_WHEELS)} (before: the same {a.before} baseline). Identical "
          f"bytes before/after/numba on {sum(same)}/{len(same)} frames (this host); context payload {payload:.0f} B "
          "mean.", "", *lines, "", *(f"- {w}" for w in whys), "",
          "numba compiles the kernels on a process's first frame (cold: nothing in numba's cache) or loads them "
          "from its on-disk cache (a later process on the same board); the import of numba is in both:", "",
          *first, "",
          f"The after-encoder's context frame by stage on {boards[0]} (frame 1, guest instructions between marks; "
          "the table id and the shape's plan are cached after the first frame):", "", *stage_lines, "",
          "Counted: guest instructions under qemu arm64 user-mode emulation (sysroot Python "
          f"{sysroot.describe()['python']}, {', '.join(w for w in sysroot.describe()['wheels'] if 'numpy' in w)}). "
          "Predicted: from those counts, not timed on a board."]
    (a.out / "board_codec.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
