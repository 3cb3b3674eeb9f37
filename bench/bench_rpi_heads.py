"""Latency of the Raspberry Pi head artifacts on this CPU, side by side.

For ResNet-152 (ver2, 12 ch) and DenseNet-201 (12 ch) heads with UNTRAINED (seeded random) weights — latency
does not depend on the weight values. Exports through the rpi target's own code, then times, batch 1:
TFLite int8 and fp32 (XNNPACK on and off), ONNX Runtime fp32 and int8 (every variant in ORT_VARIANTS, written by
the shared Q/DQ writer bottlefit.exporter.qdq.quantize_head; "qdq_s8" is the rpi target's head.int8.onnx),
the heads with the exact space-to-depth stem (head_rewrite ``space_to_depth=True``: TFLite int8 and ONNX Runtime
int8), and PyTorch eager fp32 — with 1 and 2 threads. Repeats are interleaved (one call of each runner per round)
so that background load hits all of them alike; medians and ratios vs PyTorch fp32 are printed, and with --out
written as a markdown table (rpi_heads.md). The Pi's own cost per core: bench/bench_pi_cost.py.

    PYTHONPATH=. .venv/bin/python bench/bench_rpi_heads.py [--rounds 60] [--threads 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.exporter import wire
from bottlefit.exporter.head_rewrite import rewrite_head
from bottlefit.exporter.onnx import DEFAULT_OPSET, export_onnx
from bottlefit.exporter.qdq import quantize_head
from bottlefit.models.checkpoint import untrained
from bottlefit.runtimes.litert import LiteRTRunner
from bottlefit.targets.rpi import ONNX_INPUT, ONNX_INT8_OPTIONS, ONNX_OUTPUT, write_int8_onnx
from bottlefit.targets.rpi.tflite import export_tflite

# name -> quantize_head options (QDQ, per-channel int8 weights in all of them)
ORT_VARIANTS: dict[str, dict[str, Any]] = {
    "qdq_s8": dict(ONNX_INT8_OPTIONS),  # the rpi target's: asymmetric int8 activations
    "qdq_u8": {"symmetric": False, "activation_dtype": "uint8"},  # the onnx target's
    "qdq_s8_sym": {"symmetric": True},  # the Jetson target's (TensorRT)
    "qdq_s8_conv": {**ONNX_INT8_OPTIONS, "op_types": ["Conv"]},
}

HEADS = {
    "resnet152-v2-12ch": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "2"}),
    "densenet201-12ch": ("custom_densenet201", {"bottleneck_channel": 12}),
}


def _ort(path: Path, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
    # Interleaved runs: an idle session's spinning worker threads would steal the cores from the next runtime
    # (PyTorch's 2-thread median went from ~9 to ~80 ms with spinning on).
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def runners(name: str, threads: int, tmp: Path, calib: int) -> dict[str, Callable[[], object]]:
    arch, params = HEADS[name]
    loaded = untrained(arch, params)
    head = loaded.model.get_submodule(loaded.card.bottleneck.module).eval()
    images = np.array(CalibrationSet.builtin(loaded.card, count=calib, log=lambda s: None).images)
    rw = rewrite_head(head, loaded.card.bottleneck.module)
    x = images[:1]
    out: dict[str, Callable[[], object]] = {}
    for prec in ("int8", "fp32"):
        p = tmp / f"{name}.{prec}.tflite"
        info = export_tflite(rw, images, p, int8=prec == "int8", log=lambda s: None)
        feed = {info.inputs[0].name: wire.encode(info.inputs[0], x)}
        for xnn in (True, False):
            r = LiteRTRunner(p, num_threads=threads, xnnpack=xnn)
            out[f"tflite {prec} xnnpack {'on' if xnn else 'off'}"] = lambda r=r, feed=feed: r.infer(feed)
    s2d = rewrite_head(head, loaded.card.bottleneck.module, space_to_depth=True)
    if any("space-to-depth" in c for c in s2d.changes):
        p = tmp / f"{name}.s2d.int8.tflite"
        info = export_tflite(s2d, images, p, int8=True, log=lambda s: None)
        feed = {info.inputs[0].name: wire.encode(info.inputs[0], x)}
        for xnn in (True, False):
            r = LiteRTRunner(p, num_threads=threads, xnnpack=xnn)
            out[f"tflite int8 s2d xnnpack {'on' if xnn else 'off'}"] = lambda r=r, feed=feed: r.infer(feed)
        q = write_int8_onnx(s2d.module, images, tmp / f"{name}.s2d.int8.onnx")
        s = _ort(q.path, threads)
        out["ort int8 s2d qdq_s8"] = lambda s=s: s.run(None, {ONNX_INPUT: x})
    # ONNX: the head itself (qdq.py rewrites the BatchNorm after the max-pool in the graph), as the rpi target does
    fp32 = export_onnx(head, torch.from_numpy(x).clone(), tmp / f"{name}.fp32.onnx", DEFAULT_OPSET, ONNX_INPUT,
                       ONNX_OUTPUT)
    s = _ort(fp32.path, threads)
    out["ort fp32"] = lambda s=s: s.run(None, {ONNX_INPUT: x})
    for v, kw in ORT_VARIANTS.items():
        q = quantize_head(fp32.path, tmp / f"{name}.{v}.onnx", images, head, "minmax", **kw)
        s = _ort(q.path, threads)
        out[f"ort int8 {v}"] = lambda s=s: s.run(None, {ONNX_INPUT: x})
    xt = torch.from_numpy(x)

    def eager() -> object:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return head(xt.clone())

    out["pytorch fp32 eager"] = eager
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--calib", type=int, default=16, help="calibration images for the int8 exports")
    ap.add_argument("--out", type=Path, help="folder for rpi_heads.md")
    a = ap.parse_args()
    md: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in HEADS:
            for threads in a.threads:
                rs = runners(name, threads, Path(tmp), a.calib)
                for f in rs.values():  # warm-up: first calls allocate and pack weights
                    for _ in range(3):
                        f()
                times: dict[str, list[float]] = {k: [] for k in rs}
                for _ in range(a.rounds):
                    for k, f in rs.items():
                        t0 = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t0)
                med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
                base = med["pytorch fp32 eager"]
                print(f"\n{name}, {threads} thread(s), median of {a.rounds} interleaved rounds (untrained weights)")
                print(f"{'runtime':34s} {'ms':>8s} {'vs pytorch':>11s}")
                md += [f"\n### {name}, {threads} thread(s), median of {a.rounds} interleaved rounds\n",
                       "| runtime | ms | x PyTorch eager |", "|---|---|---|"]
                for k, m in sorted(med.items(), key=lambda kv: kv[1]):
                    print(f"{k:34s} {m:8.3f} {m / base:10.2f}x")
                    md.append(f"| {k} | {m:.3f} | {m / base:.2f}x |")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "rpi_heads.md").write_text("\n".join(md).lstrip() + "\n")


if __name__ == "__main__":
    main()
