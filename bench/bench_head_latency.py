"""Head latency, batch 1, ONE thread: PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 (Q/DQ).

Variants run interleaved (round-robin, several calls per round) so machine noise hits all alike; the table
gives medians over rounds and ratios to ORT fp32. Untrained (random) weights: latency does not depend on
them. The int8 heads come from bottlefit.exporter.qdq.quantize_head (min/max observer, built-in calibration
photos); "no BN rewrite" keeps the BatchNorm after the max-pool as it is, to show why it is rewritten.

    .venv/bin/python bench/bench_head_latency.py [--rounds 15] [--calls 10] [--archs custom_resnet152 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.exporter.onnx import export_onnx
from bottlefit.exporter.qdq import quantize_head
from bottlefit.exporter.split import split
from bottlefit.models.checkpoint import untrained

PARAMS = {
    "custom_resnet152": {"bottleneck_channel": 12, "bottleneck_ver": "2"},
    "custom_densenet169": {"bottleneck_channel": 12},
    "custom_densenet201": {"bottleneck_channel": 12},
}


def ort_call(path: Path, x: np.ndarray) -> Callable[[], object]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def bench(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    for f in variants.values():  # warm-up: first calls allocate and pick kernels
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append((time.perf_counter() - t0) / calls * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run_arch(arch: str, rounds: int, calls: int, calib_count: int, tmp: Path) -> list[tuple[str, str, float, float]]:
    lm = untrained(arch, PARAMS[arch], seed=0)
    sm = split(lm.model, lm.card)
    x = torch.randn(1, *lm.card.input_shape, generator=torch.Generator().manual_seed(0))
    fp32 = export_onnx(sm.head, x, tmp / f"{arch}.onnx", 13, "input", "bottleneck").path
    calib = CalibrationSet.builtin(lm.card, part="calibration", count=calib_count, log=lambda _m: None).images
    q = {}
    for sym in (False, True):
        for rewrite in (True, False):
            name = f"ORT int8 {'sym int8' if sym else 'asym uint8'}{'' if rewrite else ', no BN rewrite'}"
            q[name] = quantize_head(fp32, tmp / f"{arch}.{sym}.{rewrite}.onnx", calib, sm.head, "minmax",
                                    symmetric=sym, rewrite_batchnorm=rewrite).path
    xn = x.numpy()

    def torch_call() -> object:
        with torch.no_grad():
            return sm.head(x)

    variants: dict[str, Callable[[], object]] = {"PyTorch fp32 (eager)": torch_call, "ORT fp32": ort_call(fp32, xn)}
    variants.update({k: ort_call(p, xn) for k, p in q.items()})
    med = bench(variants, rounds, calls)
    base = med["ORT fp32"]
    return [(arch, k, v, v / base) for k, v in med.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["custom_resnet152", "custom_densenet201"], choices=list(PARAMS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--calib-count", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch in args.archs:
            rows += run_arch(arch, args.rounds, args.calls, args.calib_count, Path(d))
    print(f"head latency, batch 1, 1 thread, median of {args.rounds} interleaved rounds x {args.calls} calls "
          "(untrained weights)")
    print("| model | variant | ms | vs ORT fp32 |")
    print("|---|---|---|---|")
    for arch, k, ms, ratio in rows:
        print(f"| {arch} | {k} | {ms:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
