"""Fidelity of int8 heads: architecture x scheme x calibration technique -> bottleneck SQNR / cosine against the
fp32 head (SQNR both as the mean of per-image figures and pooled over the images, parity's definition), top-1
agreement of head -> fp32 tail with the fp32 model, and calibration time.

Schemes: ``sym`` (symmetric Q/DQ, the Jetson/TensorRT head), ``asym`` (asymmetric int8 Q/DQ, the ONNX Runtime
head of the rpi target), ``tflite`` (full-integer TFLite via litert-torch PT2E). Techniques: ``minmax``,
``search`` (per-tensor range search), ``search+eq`` (plus bottleneck channel equalization). Every int8 head runs
under reference semantics (ONNX Runtime with graph optimizations off; the TFLite interpreter's reference
kernels), on the built-in held-out photos (never the calibration photos; the demo: its validation digits).
Figures compare bottlenecks in the ORIGINAL (un-equalized) domain, so techniques are comparable. SQNR is the
mean over images of the per-image SQNR; cosine is the minimum over images (parity's definition).

    .venv/bin/python bench/bench_fidelity.py --out bench/out/fidelity            # everything (slow)
    .venv/bin/python bench/bench_fidelity.py --out /tmp/f --archs r152v2 --schemes sym asym
    .venv/bin/python bench/bench_fidelity.py --out bench/results/fidelity --budget --archs r152v2 demo

``--budget`` instead writes budget.md / budget.json: for the Q/DQ schemes (sym, asym) and the full recipe
(search+eq+gptq+bc), the error budget of the int8 head (bottlefit.parity.budget: the bottleneck's fidelity with one
activation grid kept at a time), once calibrated on the calibration images as usual and once on the held-out
images themselves: the second says what no choice of calibration photos can beat on those images, so a goal it
misses is out of reach of the recipe, not of its data.

The trained demo model is read from --demo-checkpoint (default out/demo/student/best.pt; `bottlefit demo`
writes it); it is skipped with a note when missing. Output: fidelity.md, fidelity.json, fidelity.png
(deterministic: seeded weights, fixed images, one thread) and timing.json (calibration wall seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "r152v1": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "1"}),
    "r152v2": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "2"}),
    "r152v3": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "3"}),
    "d169": ("custom_densenet169", {"bottleneck_channel": 12}),
    "d201": ("custom_densenet201", {"bottleneck_channel": 12}),
    "demo": ("", {}),
}
SCHEMES = ("sym", "asym", "tflite")
# cumulative recipes; every one folds the stand-alone BN through the max-pool (the export's default) except
# "minmax/keep-bn", the graph as it was before that fold
TECHNIQUES = ("minmax/keep-bn", "minmax", "search", "search+eq", "search+eq+bc", "search+eq+gptq",
              "search+eq+gptq+bc")


def _quiet(msg: str) -> None:
    return None


def load(name: str, demo_ckpt: Path) -> tuple[Any, np.ndarray, np.ndarray] | None:
    """(split, calibration images, held-out images) of one architecture, or None when unavailable."""
    from bottlefit.calibration.dataset import CalibrationSet
    from bottlefit.exporter.split import split
    from bottlefit.models.checkpoint import load as load_ckpt
    from bottlefit.models.checkpoint import untrained

    if name == "demo":
        if not demo_ckpt.is_file():
            print(f"note: {demo_ckpt} missing (run `bottlefit demo`); the demo row is skipped", file=sys.stderr)
            return None
        from bottlefit.demo import N_TRAIN, N_VAL
        from bottlefit.training import mnist_splits

        lm = load_ckpt(demo_ckpt)
        data = mnist_splits(lm.card, n_train=N_TRAIN, n_val=N_VAL)
        x_val = torch.stack([data.val[i][0] for i in range(len(data.val))]).numpy().astype(np.float32)
        # the demo's own recipe (bottlefit demo): 256 training digits calibrate, the validation digits judge
        calib = torch.stack([data.train[i][0] for i in range(256)]).numpy().astype(np.float32)
        return split(lm.model, lm.card), calib, x_val
    arch, params = ARCHS[name]
    lm = untrained(arch, params, seed=0)
    calib = CalibrationSet.builtin(lm.card, "calibration", log=_quiet).images
    held = CalibrationSet.builtin(lm.card, "heldout", log=_quiet).images
    return split(lm.model, lm.card), calib, held


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner

    r = OnnxRuntimeRunner(path, num_threads=1, reference=True)
    name = next(iter(r.input_specs()))
    out = next(iter(r.output_specs()))
    return np.concatenate([r.infer({name: x[i : i + 1]})[out] for i in range(len(x))])


def _run_tflite(data: bytes, x: np.ndarray) -> np.ndarray:
    from bottlefit.runtimes.litert import interpreter_module

    mod = interpreter_module()
    it = mod.Interpreter(model_content=data,
                         experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    (si, zi), (so, zo) = i["quantization"], o["quantization"]
    outs = []
    for k in range(len(x)):
        xin = np.transpose(x[k : k + 1], (0, 2, 3, 1))
        it.set_tensor(i["index"], np.clip(np.rint(xin / si) + zi, -128, 127).astype(np.int8))
        it.invoke()
        outs.append(np.transpose((it.get_tensor(o["index"]).astype(np.float32) - zo) * so, (0, 3, 1, 2)))
    return np.concatenate(outs)


def head_output(sm: Any, scheme: str, observer: str, calib: np.ndarray, held: np.ndarray,
                tmp: Path, head: Any = None) -> tuple[np.ndarray, float]:
    """(int8 head's output on ``held`` in the head's own domain, calibration seconds). ``head``: the head to
    quantize when it is not ``sm.head`` (weights already rounded)."""
    head = sm.head if head is None else head
    if scheme == "tflite":
        from bottlefit.exporter.head_rewrite import rewrite_head
        from bottlefit.targets.rpi.tflite import convert_bytes

        rw = rewrite_head(head.encoder, sm.card.bottleneck.module)
        t = time.perf_counter()
        data = convert_bytes(rw, calib, int8=True, layout="NHWC", observer=observer)
        return _run_tflite(data, held), time.perf_counter() - t
    t = time.perf_counter()
    q = qdq_head(head, scheme, observer, calib, tmp)
    return _run_onnx(q.path, held), time.perf_counter() - t


def qdq_head(head: Any, scheme: str, observer: str, calib: np.ndarray, tmp: Path) -> Any:
    """The Q/DQ int8 head (``quantize_head``'s result) of scheme sym or asym, written into ``tmp``."""
    from bottlefit.exporter.onnx import export_onnx
    from bottlefit.exporter.qdq import quantize_head

    fp32 = export_onnx(head, torch.from_numpy(calib[:1]).clone(), tmp / "head.onnx", 13, "input", "bottleneck")
    return quantize_head(fp32.path, tmp / "head.q.onnx", calib, head, observer, symmetric=scheme == "sym",
                         activation_dtype="int8")


def recipe(sm: Any, images: np.ndarray, tech: str, check: np.ndarray) -> tuple[Any, Any, float]:
    """(the split as technique ``tech`` leaves it, the head its int8 heads quantize (None: ``split.head``), the
    seconds equalization and rounding took), calibrated on ``images``; ``check``: images to prove the folds on."""
    from bottlefit.exporter.equalize import equalize_split
    from bottlefit.exporter.rounding import round_head
    from bottlefit.exporter.split import check_split, fold_head

    s, secs = sm, 0.0
    if "+eq" in tech:
        t = time.perf_counter()
        s, _ = equalize_split(sm, images)
        secs = time.perf_counter() - t
    if tech != "minmax/keep-bn":
        s, _ = fold_head(s)
    check_split(s, torch.from_numpy(check[:2]))  # the folds are exact: tail(head(x)) == model(x)
    head = None
    if "+bc" in tech or "+gptq" in tech:
        t = time.perf_counter()
        head, _ = round_head(s.head, images, "gptq" if "+gptq" in tech else "nearest", bias_correction="+bc" in tech)
        secs += time.perf_counter() - t
    return s, head, secs


def measure(name: str, sm: Any, calib: np.ndarray, held: np.ndarray, schemes: list[str],
            techniques: list[str]) -> list[dict[str, Any]]:
    from bottlefit.exporter.equalize import unequalize
    from bottlefit.parity.metrics import cosine, mean_sqnr_db, sqnr_db

    with torch.no_grad():
        z_ref = sm.head(torch.from_numpy(held)).numpy()
        logits = sm.tail(torch.from_numpy(z_ref)).numpy()
    rows = []
    for tech in techniques:
        s, head, eq_s = recipe(sm, calib, tech, held)
        observer = "minmax" if tech.startswith("minmax") else "search"
        for scheme in schemes:
            with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
                z, secs = head_output(s, scheme, observer, calib, held, Path(tmp), head)
            with torch.no_grad():
                got = s.tail(torch.from_numpy(z)).numpy()  # the equalized tail reads the equalized wire
            z0 = unequalize(z, getattr(s.head, "equalization", None))
            rows.append({"arch": name, "scheme": scheme, "technique": tech,
                         "sqnr_db": round(mean_sqnr_db(z_ref, z0), 2),
                         "sqnr_db_pooled": round(sqnr_db(z_ref, z0), 2), "cosine": round(cosine(z_ref, z0), 5),
                         "top1_agreement": round(float(np.mean(got.argmax(1) == logits.argmax(1))), 4),
                         "calib_s": round(secs + eq_s, 1), "images": len(held), "calib_images": len(calib)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


BUDGET_TECHNIQUE = "search+eq+gptq+bc"


def budget(name: str, sm: Any, calib: np.ndarray, held: np.ndarray, schemes: list[str]) -> list[dict[str, Any]]:
    """Error-budget rows of the full recipe per Q/DQ scheme, calibrated on ``calib`` and on ``held`` itself."""
    from bottlefit.exporter.equalize import unequalize
    from bottlefit.parity.budget import error_budget

    with torch.no_grad():
        z_ref = sm.head(torch.from_numpy(held)).numpy()
    rows = []
    for calibrated_on, images in (("calibration", calib), ("held-out (oracle)", held)):
        s, head, _ = recipe(sm, images, BUDGET_TECHNIQUE, held)
        record = getattr(s.head, "equalization", None)
        for scheme in [x for x in schemes if x != "tflite"]:
            with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
                q = qdq_head(head, scheme, "search", images, Path(tmp))
                for r in error_budget(q.path, held, z_ref, q.tensor_modules,
                                      decode=lambda z, rec=record: unequalize(z, rec)):
                    rows.append({"arch": name, "scheme": scheme, "calibrated_on": calibrated_on,
                                 "technique": BUDGET_TECHNIQUE, **r.to_dict()})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def write_budget(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    lines = ["# Error budget of the int8 heads (reference semantics, held-out images)", "",
             f"Recipe {BUDGET_TECHNIQUE}. Each row keeps one activation grid (the int8 weights are in every row); "
             "SQNR of the bottleneck against the fp32 head, in the model's own (un-equalized) domain. "
             "'calibrated on held-out (oracle)' calibrates, equalizes and rounds on the judged images themselves.",
             "", "| arch | scheme | calibrated on | grid kept | module | SQNR dB (mean/img) | SQNR dB (pooled) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['scheme']} | {r['calibrated_on']} | {r['grids']} | {r['module'] or '-'} | "
              f"{r['sqnr_db_mean']:.2f} | {r['sqnr_db']:.2f} |" for r in rows]
    (out / "budget.md").write_text("\n".join(lines) + "\n")


def _key(r: dict[str, Any]) -> str:
    return f"{r['arch']}/{r['scheme']}/{r['technique']}"


def write_outputs(rows: list[dict[str, Any]], out: Path, note: str) -> None:
    """fidelity.md / .json / .png (deterministic: same rows, same bytes) and timing.json (wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    fixed = [{k: v for k, v in r.items() if k != "calib_s"} for r in rows]
    (out / "fidelity.json").write_text(json.dumps(fixed, indent=1, sort_keys=True) + "\n")
    (out / "timing.json").write_text(json.dumps({_key(r): r.get("calib_s") for r in rows}, indent=1) + "\n")
    lines = ["# int8 head fidelity (reference semantics, held-out images)", "", note, "",
             "| arch | scheme | technique | SQNR dB (mean/img) | SQNR dB (pooled) | cosine (min) | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['scheme']} | {r['technique']} | {r['sqnr_db']:.2f} | "
              f"{r.get('sqnr_db_pooled', math.nan):.2f} | {r['cosine']:.5f} | {100 * r['top1_agreement']:.1f}% |"
              for r in rows]
    lines += ["", "Calibration wall times (this machine, shared CPU; not deterministic) are in timing.json."]
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    combos = list(dict.fromkeys((r["scheme"], r["technique"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(archs) + 2), 4))
    width = 0.8 / max(1, len(combos))
    for k, (sch, tech) in enumerate(combos):
        ys = [next((r["sqnr_db"] for r in rows if (r["arch"], r["scheme"], r["technique"]) == (a, sch, tech)),
                   math.nan) for a in archs]
        ax.bar(np.arange(len(archs)) + k * width, ys, width, label=f"{sch} / {tech}")
    ax.set_xticks(np.arange(len(archs)) + 0.4 - width / 2, archs)
    ax.set_ylabel("bottleneck SQNR, dB (mean per image)")
    ax.set_title("int8 head fidelity by scheme and technique")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    # no timestamps in the PNG: same rows, same bytes
    fig.savefig(out / "fidelity.png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    p.add_argument("--demo-checkpoint", type=Path, default=ROOT / "out" / "demo" / "student" / "best.pt")
    p.add_argument("--budget", action="store_true",
                   help="write the error budget of the full recipe's Q/DQ heads instead (budget.md / budget.json)")
    p.add_argument("--append", action="store_true",
                   help="add to the rows already in OUT/fidelity.json (a run of other archs or schemes)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.budget:
        brows: list[dict[str, Any]] = []
        for name in args.archs:
            loaded = load(name, args.demo_checkpoint)
            if loaded is not None:
                brows += budget(name, *loaded, args.schemes)
        write_budget(brows, args.out)
        print((args.out / "budget.md").read_text())
        return 0
    rows: list[dict[str, Any]] = []
    if args.append and (args.out / "fidelity.json").is_file():
        rows = json.loads((args.out / "fidelity.json").read_text())
        times = json.loads((args.out / "timing.json").read_text()) if (args.out / "timing.json").is_file() else {}
        for r in rows:
            r["calib_s"] = times.get(_key(r), r.get("calib_s"))
    for name in args.archs:
        loaded = load(name, args.demo_checkpoint)
        if loaded is None:
            continue
        sm, calib, held = loaded
        new = measure(name, sm, calib, held, args.schemes, args.techniques)
        keys = {(r["arch"], r["scheme"], r["technique"]) for r in new}
        rows = [r for r in rows if (r["arch"], r["scheme"], r["technique"]) not in keys] + new
    order = {a: i for i, a in enumerate(ARCHS)}
    rows.sort(key=lambda r: (order[r["arch"]], SCHEMES.index(r["scheme"]), TECHNIQUES.index(r["technique"])))
    archs = ", ".join(dict.fromkeys(r["arch"] for r in rows))
    note = (f"archs {archs}; untrained archs: seeded random weights (seed 0), built-in calibration "
            "(49 images) and held-out (21 images) photos; demo: 256 training digits calibrate, its 1,000 "
            "validation digits judge.")
    write_outputs(rows, args.out, note)
    print((args.out / "fidelity.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
