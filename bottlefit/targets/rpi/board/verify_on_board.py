#!/usr/bin/env python3
"""Verify the BottleFit heads on the Raspberry Pi against the golden outputs made on the export host.

Runs each head golden.json lists (head.int8.tflite in ai-edge-litert, head.int8.onnx in onnxruntime,
head.int8.ncnn.param in ncnn) on the
golden inputs and compares with the golden outputs, which the host computed under each artifact's reference
semantics (never with the host's own int8 kernels), using the tolerances in golden.json (max abs error in LSB
of the output scale, cosine similarity). A head whose runtime is not installed is skipped and said so.
Prints PASS or FAIL per image and overall (--json: one JSON object); exit 0 on pass, 1 on failure, 2 when a
file is missing or no head could run.
Needs Python >= 3.9, numpy, and ai-edge-litert (or tflite-runtime), onnxruntime and/or ncnn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run_head import (  # noqa: E402 - the bundle's own module
    RUNTIMES,
    Head,
    MissingRuntime,
    add_kernel_arguments,
    add_renamed,
    defaults,
    ncnn_weights,
    ort_config,
    read_golden,
)


def dequantize(y, spec):
    y = y.astype(np.float32)
    if spec["dtype"] in ("int8", "uint8"):
        return (y - np.float32(spec["zero_point"])) * np.float32(spec["scale"])
    return y


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def check_model(meta, base, entry, model, threads, xnnpack, say, ort_options=()):
    """One head against its golden outputs: a result dict (status pass | fail | skip | missing). ONNX Runtime
    runs with the board profile's session config (its kernel choice), as run_head.py does."""
    res = {"model": entry["model"], "runtime": entry["runtime"], "images": []}
    paths = [model, os.path.join(base, entry["inputs_file"]), os.path.join(base, entry["outputs_file"])]
    if entry["runtime"] == "ncnn":  # its weights live beside the .param
        paths.append(ncnn_weights(model))
    missing = [q for q in paths if not os.path.isfile(q)]
    if missing:
        res.update(status="missing", reason="missing file(s): %s" % ", ".join(missing))
        return res
    try:
        head = Head(entry, model, threads, xnnpack, ort_config(meta, ort_options))
    except MissingRuntime as e:
        res.update(status="skip", reason=str(e))
        return res
    xs, golden = np.load(paths[1]), np.load(paths[2])
    spec, tol = entry["output"], entry["tolerances"]
    lsb = float(entry.get("lsb") or spec.get("scale") or 1.0)
    names = meta.get("names") or [str(i) for i in range(len(xs))]
    worst_lsb, worst_cos, mismatched, total = 0.0, 1.0, 0, 0
    ok_all = True
    for i in range(len(xs)):
        got = dequantize(head.run(xs[i : i + 1]), spec)
        want = dequantize(golden[i : i + 1], spec)
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        max_abs, cos = float(diff.max()), cosine(got, want)
        mismatched += int(np.count_nonzero(diff))
        total += diff.size
        ok = max_abs <= tol["max_abs_lsb"] * lsb + 1e-12 and cos >= tol["cosine_min"]
        ok_all = ok_all and ok
        worst_lsb, worst_cos = max(worst_lsb, max_abs / lsb), min(worst_cos, cos)
        res["images"].append({"name": names[i], "max_abs_lsb": max_abs / lsb, "cosine": cos, "passed": ok})
        say("%s %s %s: max_abs %.4g (%.2f LSB, tol %.2f), cosine %.6f (min %.4f)"
            % ("PASS" if ok else "FAIL", os.path.basename(model), names[i], max_abs, max_abs / lsb,
               tol["max_abs_lsb"], cos, tol["cosine_min"]))
    res.update(status="pass" if ok_all else "fail", max_abs_lsb=worst_lsb, cosine=worst_cos,
               mismatch_fraction=mismatched / float(max(1, total)), kernels=head.describe)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden-json", default=os.path.join(HERE, "golden.json"))
    p.add_argument("--runtime", choices=RUNTIMES, help="check only this head (default: every head listed)")
    add_renamed(p, "--head", "--model", help="with --runtime: the head file (default: the one golden.json names)")
    p.add_argument("--threads", type=int, default=1, help="default 1 (int8 results do not depend on it)")
    add_kernel_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    a = p.parse_args(argv)
    try:
        ort_config(meta={}, options=a.ort_option)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2

    golden = read_golden(a.golden_json, a.head, a.runtime)
    if golden is None:
        return 2
    meta, base = golden[0], golden[1]
    chosen = [(golden[2], golden[3])] if a.runtime else [(e, os.path.join(base, e["model"])) for e in meta["models"]]
    say = (lambda s: None) if a.json else print
    results = []
    for e, m in chosen:
        threads, xnnpack = defaults(meta, e["runtime"], a.threads, a.xnnpack)
        results.append(check_model(meta, base, e, m, threads, xnnpack, say, a.ort_option))
    for r in results:
        if r["status"] in ("skip", "missing"):
            (say if r["status"] == "skip" else (lambda s: print(s, file=sys.stderr)))(
                "%s %s: %s" % ("SKIP" if r["status"] == "skip" else "error:", r["model"], r["reason"]))
    ran = [r for r in results if r["status"] in ("pass", "fail")]
    if any(r["status"] == "missing" for r in results) or not ran:
        code = 2
    else:
        code = 0 if all(r["status"] == "pass" for r in ran) else 1
    if a.json:
        print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                          "profile": (meta.get("profile") or {}).get("name"),
                          "numpy": np.__version__, "passed": code == 0, "results": results}))
    else:
        print("PASS" if code == 0 else "FAIL")
    return code


if __name__ == "__main__":
    sys.exit(main())
