#!/usr/bin/env python3
"""Verify the BottleFit head on the Raspberry Pi against the golden outputs made on the export host.

Runs the .tflite on the golden inputs and compares with the golden outputs using the metrics and tolerances
the host wrote into golden.json (max abs error in LSB of the output scale, cosine similarity).
Prints PASS or FAIL per image and overall; exit 0 on pass, 1 on failure, 2 when a file is missing.
Needs Python >= 3.9, numpy, and ai-edge-litert (falls back to tflite-runtime).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run_head import load_interpreter, read_golden  # noqa: E402 - the bundle's own module, beside this file


def dequantize(y, spec):
    y = y.astype(np.float32)
    if spec["dtype"] in ("int8", "uint8"):
        return (y - np.float32(spec["zero_point"])) * np.float32(spec["scale"])
    return y


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden-json", default=os.path.join(HERE, "golden.json"))
    p.add_argument("--model", help="the .tflite head (default: the one golden.json names)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-xnnpack", action="store_true")
    a = p.parse_args(argv)

    golden = read_golden(a.golden_json, a.model)
    if golden is None:
        return 2
    meta, base, model = golden
    paths = [model, os.path.join(base, meta["inputs_file"]), os.path.join(base, meta["outputs_file"])]
    missing = [q for q in paths if not os.path.isfile(q)]
    if missing:
        print("error: missing file(s): %s" % ", ".join(missing), file=sys.stderr)
        return 2

    interp = load_interpreter(model, a.threads, not a.no_xnnpack)
    ind, outd = interp.get_input_details()[0], interp.get_output_details()[0]
    xs, golden = np.load(paths[1]), np.load(paths[2])
    spec, tol = meta["output"], meta["tolerances"]
    lsb = float(spec["scale"]) if spec.get("scale") else 1.0
    ok_all = True
    names = meta.get("names") or [str(i) for i in range(len(xs))]
    for i in range(len(xs)):
        interp.set_tensor(ind["index"], np.ascontiguousarray(xs[i : i + 1]))
        interp.invoke()
        got = dequantize(interp.get_tensor(outd["index"]), spec)
        want = dequantize(golden[i : i + 1], spec)
        max_abs = float(np.max(np.abs(got - want)))
        cos = cosine(got, want)
        ok = max_abs <= tol["max_abs_lsb"] * lsb + 1e-12 and cos >= tol["cosine_min"]
        ok_all = ok_all and ok
        print("%s %s: max_abs %.4g (%.2f LSB, tol %.2f), cosine %.6f (min %.4f)"
              % ("PASS" if ok else "FAIL", names[i], max_abs, max_abs / lsb, tol["max_abs_lsb"], cos,
                 tol["cosine_min"]))
    print("PASS" if ok_all else "FAIL")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
