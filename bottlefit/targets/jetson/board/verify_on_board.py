#!/usr/bin/env python3
"""Compare a TensorRT engine's outputs (trtexec --exportOutput) with golden outputs made on the host.

Runs on the board's own python3 (3.6 on JetPack 4.6) with the standard library only: numpy is not
guaranteed on stock JetPack images. Keep it Python 3.6 compatible (tests check with vermin).

Usage:
  python3 verify_on_board.py --golden=golden --output=results/qdq.output.json --precision=int8
                             [--engine-output=int8]
Exit codes: 0 PASS, 1 FAIL, 2 missing/unreadable files or bad usage (one line on stderr).

golden/golden.json (format "bottlefit-golden-1", written by the host):
  {"outputs": [{"name", "file", "shape", "dtype": "float32", "scale": float|null}, ...],
   "tolerances": {"fp32"|"fp16"|"int8": {"max_abs_error", "mean_abs_error", "cosine", "sqnr_db"}}}
(errors must stay <= their tolerance, cosine and sqnr_db >= theirs, as in bottlefit.parity)
each output file is little-endian float32 in C order.
"""

import argparse
import array
import json
import math
import os
import re
import sys

GOLDEN_FORMAT = "bottlefit-golden-1"
# trtexec prints 6 significant digits: even a bit-exact engine is off by up to ~5e-6 relative.
PRINT_RTOL = 1e-5


class Unreadable(Exception):
    """A file is missing or not in the expected format: exit 2."""


# ------------------------------------------------------------------------------------------------ reading


def read_golden(golden_dir):
    path = os.path.join(golden_dir, "golden.json")
    try:
        with open(path, "r") as f:
            doc = json.load(f)
    except (OSError, IOError) as e:
        raise Unreadable("cannot read {}: {}".format(path, e.strerror or e))
    except ValueError as e:
        raise Unreadable("{} is not valid JSON: {}".format(path, e))
    if not isinstance(doc, dict) or doc.get("format") != GOLDEN_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise Unreadable("{}: format {!r}, expected {!r}".format(path, found, GOLDEN_FORMAT))
    outputs = doc.get("outputs")
    if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and {"name", "file", "shape"} <= set(o) for o in outputs):
        raise Unreadable("{}: 'outputs' must list objects with name, file and shape".format(path))
    return doc


def read_float32(path, count):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (OSError, IOError) as e:
        raise Unreadable("cannot read {}: {}".format(path, e.strerror or e))
    if len(raw) != 4 * count:
        raise Unreadable("{}: {} bytes, expected {} (float32 x {})".format(path, len(raw), 4 * count, count))
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()  # golden files are little-endian
    return values


_NAME_RE = re.compile(r'^\s*,?\s*\{\s*"name"\s*:\s*"(.*)"\s*$')  # names are not escaped: greedy to the last "
_DIMS_RE = re.compile(r'^\s*,\s*"dimensions"\s*:\s*"([0-9x]*)"\s*$')
_VALUES_RE = re.compile(r'^\s*,\s*"values"\s*:\s*\[(.*)\]\s*$')
_TOKEN_RE = re.compile(r"^-?(?:nan|inf|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)$", re.IGNORECASE)


def read_export_output(path):
    """trtexec's --exportOutput file -> {name: (shape, [float])}.

    Not JSON (bare nan/inf, unescaped names), so read its fixed layout: per tensor one line each for
    name, dimensions ("1x12x29x29") and values, then "}".
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, IOError) as e:
        raise Unreadable("cannot read {}: {}".format(path, e.strerror or e))
    except UnicodeDecodeError:
        raise Unreadable("{}: not text (TensorRT 8.2 writes int8 outputs as raw bytes)".format(path))
    lines = text.split("\n")
    if not lines or lines[0].strip() != "[":
        raise Unreadable("{}:1: expected '[' (not a trtexec --exportOutput file?)".format(path))
    out = {}
    i = 1
    while i < len(lines) and lines[i].strip() not in ("]", ""):
        block = lines[i:i + 4]
        m_name = _NAME_RE.match(block[0])
        m_dims = _DIMS_RE.match(block[1]) if len(block) > 1 else None
        m_vals = _VALUES_RE.match(block[2]) if len(block) > 2 else None
        if not (m_name and m_dims and m_vals and len(block) > 3 and block[3].strip() == "}"):
            raise Unreadable("{}:{}: unexpected layout".format(path, i + 1))
        dims = m_dims.group(1)
        shape = [int(d) for d in dims.split("x")] if dims else []
        inner = m_vals.group(1).strip()
        tokens = [t.strip() for t in inner.split(",")] if inner else []
        for t in tokens:
            if not _TOKEN_RE.match(t):
                raise Unreadable("{}:{}: value {!r} is not a number".format(path, i + 3, t[:20]))
        name = m_name.group(1)
        count = 1
        for d in shape:
            count *= d
        if len(tokens) != count:  # a truncated values line would otherwise be compared over what is left
            raise Unreadable("{}:{}: {} values for dimensions {} ({} expected)".format(
                path, i + 3, len(tokens), dims or "scalar", count))
        if name in out:
            raise Unreadable("{}:{}: tensor {!r} appears twice".format(path, i + 1, name))
        out[name] = (shape, [float(t) for t in tokens])
        i += 4
    if i >= len(lines) or lines[i].strip() != "]":
        raise Unreadable("{}: missing the closing ']' (truncated?)".format(path))
    return out


# ------------------------------------------------------------------------------------------------ metrics


def compare(golden, got, batch):
    """Metrics named and defined as in bottlefit.parity.metrics: max/mean abs error, SQNR (dB) over the
    whole tensor, cosine per sample (dim 0) then the minimum. A non-finite output gives NaN metrics."""
    n = len(golden)
    if not all(math.isfinite(v) for v in got):
        nan = float("nan")
        return {"max_abs_error": nan, "mean_abs_error": nan, "cosine": nan, "sqnr_db": nan, "amax": 0.0}
    max_abs = sum_abs = gg = err2 = amax = 0.0
    for g, o in zip(golden, got):
        d = abs(o - g)
        max_abs = max(max_abs, d)
        sum_abs += d
        gg += g * g
        err2 += d * d
        amax = max(amax, abs(g))
    cosines = []
    per = n // batch if batch > 0 else n
    for start in range(0, n, per or 1):
        r, o = golden[start:start + per], got[start:start + per]
        dot = sum(a * b for a, b in zip(r, o))
        den = math.sqrt(sum(a * a for a in r) * sum(b * b for b in o))
        cosines.append(dot / den if den > 0 else (1.0 if list(r) == list(o) else 0.0))
    if err2 == 0:
        sqnr = math.inf
    elif gg == 0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(gg / err2)
    return {"max_abs_error": max_abs, "mean_abs_error": sum_abs / n if n else 0.0,
            "cosine": min(cosines) if cosines else 1.0, "sqnr_db": sqnr, "amax": amax}


def failures(m, tol):
    """Which tolerances m breaks: errors must stay at or below theirs, similarities at or above theirs
    (parity's rule). A NaN metric breaks every bound it is checked against."""
    bad = []
    for key in ("max_abs_error", "mean_abs_error"):
        if key in tol:
            limit = tol[key]
            if key == "max_abs_error":
                limit = max(limit, PRINT_RTOL * m["amax"])
            if not m[key] <= limit:
                bad.append("{} {:.3g} > {:.3g}".format(key, m[key], limit))
    for key in ("cosine", "sqnr_db"):
        if key in tol and not m[key] >= tol[key]:
            bad.append("{} {:.6g} < {:.6g}".format(key, m[key], tol[key]))
    return bad


# ----------------------------------------------------------------------------------------------- the check


def verify(golden_dir, output_path, precision, engine_output):
    doc = read_golden(golden_dir)
    tol = doc.get("tolerances", {}).get(precision)
    if tol is None:
        raise Unreadable("golden.json has no tolerances for precision {!r}".format(precision))
    produced = read_export_output(output_path)
    rows = []
    ok = True
    for spec in doc["outputs"]:
        name = spec["name"]
        shape = [int(d) for d in spec["shape"]]
        count = 1
        for d in shape:
            count *= d
        golden = read_float32(os.path.join(golden_dir, spec["file"]), count)
        dims = "x".join(str(d) for d in shape)
        if name not in produced:
            rows.append((name, dims, None, ["missing from the trtexec output"]))
            ok = False
            continue
        got_shape, got = produced[name]
        if got_shape != shape:
            rows.append((name, dims, None, ["shape {} != golden {}".format("x".join(map(str, got_shape)), dims)]))
            ok = False
            continue
        if engine_output == "int8":
            scale = spec.get("scale")
            if not scale:
                raise Unreadable("golden.json has no int8 scale for output {!r}".format(name))
            got = [q * scale for q in got]  # the engine emits raw int8 codes: float = scale * q
        m = compare(golden, got, shape[0] if shape else 1)
        bad = failures(m, tol)
        if not all(math.isfinite(v) for v in got):
            bad.insert(0, "non-finite values")
        ok = ok and not bad
        rows.append((name, dims, m, bad))
    print_table(rows, precision, engine_output)
    return ok


def print_table(rows, precision, engine_output):
    print("precision {}, engine output {}".format(precision, engine_output))
    width = max([len("output")] + [len(r[0]) for r in rows])
    header = "{:<{w}}  {:<14} {:>10} {:>10} {:>9} {:>8}  {}".format(
        "output", "shape", "max_abs", "mean_abs", "cosine", "sqnr_dB", "verdict", w=width)
    print(header)
    for name, dims, m, bad in rows:
        if m is None:
            cells = ("-", "-", "-", "-")
        else:
            cells = ("{:.3g}".format(m["max_abs_error"]), "{:.3g}".format(m["mean_abs_error"]),
                     "{:.6f}".format(m["cosine"]), "{:.1f}".format(m["sqnr_db"]))
        verdict = "PASS" if not bad else "FAIL: " + "; ".join(bad)
        print("{:<{w}}  {:<14} {:>10} {:>10} {:>9} {:>8}  {}".format(name, dims, *cells, verdict, w=width))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check trtexec --exportOutput against golden outputs.")
    parser.add_argument("--golden", required=True, help="folder with golden.json and output.*.bin")
    parser.add_argument("--output", required=True, help="the file trtexec --exportOutput wrote")
    parser.add_argument("--precision", required=True, choices=["fp32", "fp16", "int8"])
    parser.add_argument("--engine-output", default="float", choices=["float", "int8"],
                        help="int8: the engine emits int8 codes, dequantized with golden.json's scale")
    args = parser.parse_args(argv)
    try:
        ok = verify(args.golden, args.output, args.precision, args.engine_output)
    except Unreadable as e:
        sys.stderr.write("verify_on_board: {}\n".format(e))
        return 2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
