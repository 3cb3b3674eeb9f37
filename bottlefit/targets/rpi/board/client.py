#!/usr/bin/env python3
"""The device side of split computing on the Raspberry Pi: run the head, send its int8 codes to the tail server.

Python >= 3.9, numpy and the head's runtime (as run_head.py); the network part is the standard library only. It
speaks the Open Inference Protocol (KServe v2) REST with the binary tensor extension, so the server is
`bottlefit serve OUT` or NVIDIA Triton with the repository of `bottlefit triton` (--wire context as to bottlefit
serve; --wire fp32 with --model-name <arch>_tail_fp32). Flag names are the host's `bottlefit run-head`'s.

  python3 client.py --server http://edge:8000 --image digit.png
  python3 client.py --server http://edge:8000 --golden --json
  python3 client.py --server http://edge:8000 --golden --wire context   # ~0.45x the int8 bytes

--wire context sends the codes as one BYTES frame coded by the export's context model (boardcodec.py beside
this script, tables in ../codec/), which `bottlefit serve` decodes bit-exactly.

Per image: head ms, payload bytes, round trip ms, server ms, the top-k classes with their softmax probabilities.
Exit 0 when every image got logits, 1 when
one failed (after retries), 2 on bad usage or missing files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import boardcodec  # noqa: E402 - the bundle's own module
import boardhttp  # noqa: E402 - the bundle's own module
from boardhttp import V2_TYPES, infer, request_body as kserve_body  # noqa: E402 - the bundle's own module
from run_head import RUNTIMES, open_head, preprocess, wire_codes  # noqa: E402 - the bundle's own module


def load_codec_tables(entry, base=HERE):
    """The context codec's tables of this head (golden.json's codec_tables, relative to this folder)."""
    rel = entry.get("codec_tables")
    if not rel:
        raise ValueError("golden.json has no codec tables for %s: re-export with this bottlefit" % entry["model"])
    return boardcodec.load(os.path.join(base, rel))


def request_body(entry, codes, fp32, input_name, tables=None):
    """(body, header length): one image as the KServe v2 binary extension wants it; with ``tables``, the codes
    as a context-coded BYTES frame."""
    w = entry.get("wire") or entry["output"]
    if tables is not None:
        frame = boardcodec.context_frame(tables, codes, str(codes.dtype), entry["output"].get("layout", "NCHW"),
                                         w["scale"], w["zero_point"])
        blob, dtype, shape = len(frame).to_bytes(4, "little") + frame, "BYTES", [1]
        params = {"codec": "context", "contract_id": entry.get("contract_id")}
    elif fp32:
        x = (codes.astype(np.float32) - np.float32(w["zero_point"])) * np.float32(w["scale"])
        if entry["output"].get("layout") == "NHWC" and x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        blob, dtype, params = np.ascontiguousarray(x, dtype="<f4").tobytes(), V2_TYPES["float32"], {}
        shape = list(x.shape)
    else:
        blob, dtype, shape = np.ascontiguousarray(codes).tobytes(), V2_TYPES[str(codes.dtype)], list(codes.shape)
        params = {"scale": w["scale"], "zero_point": w["zero_point"], "layout": entry["output"].get("layout", "NCHW")}
        if entry.get("contract_id"):
            params["contract_id"] = entry["contract_id"]
    return kserve_body(input_name, shape, dtype, params, blob)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image files (.jpg/.png; needs Pillow) or .npy")
    src.add_argument("--golden", action="store_true", help="send the golden inputs next to this script")
    boardhttp.add_renamed(p, "--model-name", "--model",
                          help="the tail's model name on the server (default: golden.json's tail_model)")
    p.add_argument("--golden-json", default=os.path.join(HERE, "golden.json"))
    p.add_argument("--runtime", choices=RUNTIMES, help="which head to run (default: the board profile's)")
    p.add_argument("--head", help="the head file (default: the one golden.json names for the runtime)")
    p.add_argument("--threads", type=int, help="default: the board profile's (golden.json default_threads)")
    boardhttp.add_arguments(p)
    a = p.parse_args(argv)

    opened = open_head(a.golden_json, a.head, a.runtime, a.threads)
    if opened == 2:
        return 2
    meta, base, entry, head, _ = opened
    if a.golden:
        xs = np.load(os.path.join(base, entry["inputs_file"]))
        items = [(n, xs[i:i + 1]) for i, n in enumerate(meta.get("names") or range(len(xs)))]
    else:
        missing = [f for f in a.image if not os.path.isfile(f)]
        if missing:
            print("error: %s not found" % ", ".join(missing), file=sys.stderr)
            return 2
        items = [(f, preprocess(f, meta["preprocess"], entry["input"])) for f in a.image]
    url = "%s/v2/models/%s/infer" % (a.server.rstrip("/"), a.model_name or meta.get("tail_model", "bottlefit_tail"))
    tables = None
    if a.wire == "context":
        try:
            tables = load_codec_tables(entry, base)
        except (OSError, ValueError, KeyError) as e:
            print("error: %s" % e, file=sys.stderr)
            return 2
    failed = 0
    for i, (name, x) in enumerate(items):
        t0 = time.perf_counter()
        codes = wire_codes(head.run(x), entry)
        head_ms = (time.perf_counter() - t0) * 1e3
        t_enc = time.perf_counter()
        body, hl = request_body(entry, codes, a.wire == "fp32", meta.get("tail_input", "bottleneck"), tables)
        encode_ms = (time.perf_counter() - t_enc) * 1e3
        t1 = time.perf_counter()
        try:
            resp, logits = infer(url, body, hl, a.timeout, a.retries, a)
        except RuntimeError as e:  # reported, never silently dropped
            failed += 1
            print(json.dumps({"image": str(name), "error": str(e)}) if a.json else "FAIL %s: %s" % (name, e))
            continue
        rtt_ms = (time.perf_counter() - t1) * 1e3
        server_ms = (resp.get("parameters") or {}).get("server_ms")
        top = boardhttp.topk(logits[0], a.topk)
        payload = len(body) - hl - (4 if tables is not None else 0)
        rec = {"image": str(name), "head_ms": head_ms, "payload_bytes": payload, "encode_ms": encode_ms,
               "round_trip_ms": rtt_ms,
               "server_ms": server_ms,
               "topk": [{"class": c, "probability": pr, "logit": lg} for c, pr, lg in top],
               "logits": [float(v) for v in logits[0]]}
        if a.json:
            print(json.dumps(rec))
        else:
            print("[%d/%d] %s: head %.2f ms, %d B, round trip %.1f ms%s, top-%d class:probability %s"
                  % (i + 1, len(items), name, head_ms, rec["payload_bytes"], rtt_ms,
                     "" if server_ms is None else " (server %.1f ms)" % server_ms, a.topk,
                     " ".join("%d:%.3f" % (c, pr) for c, pr, _ in top)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
