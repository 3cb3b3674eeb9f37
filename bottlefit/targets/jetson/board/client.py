#!/usr/bin/env python3
"""The device side of split computing on a Jetson: the head's bottleneck to the tail server, coded or not.

Python >= 3.6 (JetPack 4), the standard library and numpy; the head runs in TensorRT through trtexec (the
engine build_engine.sh made), or its outputs come from a file. Same wire as the rpi bundle's client: the
Open Inference Protocol (KServe v2) REST with the binary tensor extension, to `bottlefit serve OUT` or NVIDIA
Triton (the repository of `bottlefit triton`: --wire context as to bottlefit serve; --wire fp32 with
--model-name <arch>_tail_fp32). Flag names are the host's `bottlefit run-head`'s.

  python3 client.py --server http://edge:8000 --engine engines/qdq.engine --golden
  python3 client.py --server http://edge:8000 --engine engines/qdq.engine --input x.bin --wire context
  python3 client.py --server http://edge:8000 --bottleneck golden/bottleneck.output.bin --json

--input: float32 little-endian input tensors (the golden/ format), one file per image; --bottleneck: the head's
float32 outputs (a .bin of that format or a trtexec --exportOutput JSON). Per image: head ms, payload bytes,
encode ms, round trip ms, server ms, the top-k classes with their softmax probabilities. Exit 0 when every image got logits, 1 when one failed (after
retries), 2 on bad usage or missing files.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import boardcodec  # noqa: E402 - the bundle's own module
import boardhttp  # noqa: E402 - the bundle's own module
from boardhttp import V2_TYPES, infer, request_body as kserve_body  # noqa: E402 - the bundle's own module

META = "client.json"


def read_meta(path):
    with open(path, "r") as f:
        return json.load(f)


def read_floats(path, shape):
    """A float32 tensor of ``shape``: raw little-endian bytes (.bin), .npy, or trtexec --exportOutput JSON."""
    if path.endswith(".npy"):
        x = np.load(path).astype(np.float32)
    elif path.endswith(".json"):
        sys.path.insert(0, HERE)
        from verify_on_board import read_export_output  # the bundle's own trtexec parser

        outputs = read_export_output(path)
        _, values = next(iter(outputs.values()))
        x = np.asarray(values, dtype=np.float32)
    else:
        x = np.fromfile(path, dtype="<f4")
    n = int(np.prod(shape))
    if x.size != n:
        raise ValueError("%s holds %d values, the head's tensor has %d %s" % (path, x.size, n, list(shape)))
    return x.reshape(shape)


def run_engine(trtexec, engine, input_name, input_file):
    """One inference of the engine on an input file (trtexec --loadInputs); returns (output JSON path, ms)."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    cmd = [trtexec, "--loadEngine=" + engine, "--loadInputs=%s:%s" % (input_name, input_file),
           "--exportOutput=" + out.name, "--iterations=1", "--warmUp=0", "--duration=0", "--avgRuns=1"]
    t0 = time.perf_counter()
    cp = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    ms = (time.perf_counter() - t0) * 1e3
    if cp.returncode != 0:
        raise RuntimeError("trtexec failed (exit %d): %s" % (cp.returncode, cp.stdout.strip().splitlines()[-1:]))
    return out.name, ms


def codes_of(y, meta):
    """The engine's bottleneck -> the contract's int8 codes: the codes themselves (an engine with int8 outputs),
    or floats that are exactly scale * (q - zp) (trtexec prints 6 digits: rounding recovers q)."""
    info = np.iinfo(meta["dtype"])
    if meta.get("head_outputs_codes"):
        return np.clip(np.round(y), info.min, info.max).astype(meta["dtype"])
    q = np.round(y.astype(np.float64) / meta["scale"]) + meta["zero_point"]
    return np.clip(q, info.min, info.max).astype(meta["dtype"])


def request_body(meta, codes, fp32, tables=None):
    """(body, header length, coded bytes): one image as the KServe v2 binary extension wants it."""
    if tables is not None:
        frame = boardcodec.context_frame(tables, codes, meta["dtype"], meta["layout"], meta["scale"],
                                         meta["zero_point"])
        blob, dtype, shape = len(frame).to_bytes(4, "little") + frame, "BYTES", [1]
        params = {"codec": "context", "contract_id": meta["contract_id"]}
        coded = len(frame)
    elif fp32:
        x = (codes.astype(np.float32) - np.float32(meta["zero_point"])) * np.float32(meta["scale"])
        blob, dtype, shape, params = np.ascontiguousarray(x, dtype="<f4").tobytes(), V2_TYPES["float32"], list(x.shape), {}
        coded = len(blob)
    else:
        blob, dtype, shape = np.ascontiguousarray(codes).tobytes(), V2_TYPES[meta["dtype"]], list(codes.shape)
        params = {"scale": meta["scale"], "zero_point": meta["zero_point"], "layout": meta["layout"],
                  "contract_id": meta["contract_id"]}
        coded = len(blob)
    body, header_len = kserve_body(meta["tail_input"], shape, dtype, params, blob)
    return body, header_len, coded


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="float32 input tensors (.bin little-endian or .npy), run by --engine")
    src.add_argument("--golden", action="store_true", help="run the golden input (golden/) through --engine")
    src.add_argument("--bottleneck", nargs="+", help="the head's float32 outputs (.bin, .npy or trtexec JSON)")
    p.add_argument("--engine", help="the TensorRT engine build_engine.sh wrote (with --input/--golden)")
    p.add_argument("--trtexec", default="/usr/src/tensorrt/bin/trtexec")
    boardhttp.add_renamed(p, "--model-name", "--model",
                          help="the tail's model name on the server (default: client.json's tail_model)")
    p.add_argument("--meta", default=os.path.join(HERE, META))
    boardhttp.add_arguments(p)
    a = p.parse_args(argv)

    try:
        meta = read_meta(a.meta)
        tables = None
        if a.wire == "context":
            if not meta.get("codec_tables"):
                raise ValueError("%s names no codec tables: re-export with this bottlefit" % a.meta)
            tables = boardcodec.load(os.path.join(os.path.dirname(os.path.abspath(a.meta)), meta["codec_tables"]))
        if a.bottleneck:
            items = [(f, f, None) for f in a.bottleneck]
        else:
            if not a.engine:
                raise ValueError("--input/--golden run the head in TensorRT: pass --engine (build_engine.sh wrote it)")
            files = a.input or [os.path.join(HERE, meta["golden_input"])]
            items = [(f, None, f) for f in files]
        missing = [f for _, b, i in items for f in (b, i) if f and not os.path.isfile(f)]
        if missing:
            raise ValueError("%s not found" % ", ".join(missing))
    except (OSError, ValueError, KeyError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    url = "%s/v2/models/%s/infer" % (a.server.rstrip("/"), a.model_name or meta["tail_model"])
    shape = [1] + list(meta["shape"])
    failed = 0
    for i, (name, bottleneck, input_file) in enumerate(items):
        try:
            head_ms = None
            if input_file is not None:
                bottleneck, head_ms = run_engine(a.trtexec, a.engine, meta["head_input"], input_file)
            codes = codes_of(read_floats(bottleneck, shape), meta)
            t0 = time.perf_counter()
            body, hl, coded = request_body(meta, codes, a.wire == "fp32", tables)
            encode_ms = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            resp, logits = infer(url, body, hl, a.timeout, a.retries, a)
        except (RuntimeError, ValueError, OSError) as e:  # reported, never silently dropped
            failed += 1
            print(json.dumps({"image": str(name), "error": str(e)}) if a.json else "FAIL %s: %s" % (name, e))
            continue
        rtt_ms = (time.perf_counter() - t1) * 1e3
        server_ms = (resp.get("parameters") or {}).get("server_ms")
        top = boardhttp.topk(logits[0], a.topk)
        rec = {"image": str(name), "head_ms": head_ms, "payload_bytes": coded, "encode_ms": encode_ms,
               "round_trip_ms": rtt_ms, "server_ms": server_ms,
               "topk": [{"class": c, "probability": pr, "logit": lg} for c, pr, lg in top], "logits": [float(v) for v in logits[0]]}
        if a.json:
            print(json.dumps(rec))
        else:
            print("[%d/%d] %s: %s%d B (encode %.1f ms), round trip %.1f ms%s, top-%d class:probability %s"
                  % (i + 1, len(items), name, "" if head_ms is None else "head %.1f ms (trtexec), " % head_ms,
                     coded, encode_ms, rtt_ms, "" if server_ms is None else " (server %.1f ms)" % server_ms,
                     a.topk, " ".join("%d:%.3f" % (c, pr) for c, pr, _ in top)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
