#!/usr/bin/env python3
"""The device side of split computing on a board: run the head, send its bottleneck to the tail server.

One client for every board (copied verbatim as client.py into the jetson and rpi bundles). Python >= 3.6 (JetPack
4's), the standard library and numpy. What differs per board is which runtime produces the bottleneck: that is
boardhead.py beside this file (a Jetson's: TensorRT through trtexec; a Raspberry Pi's: LiteRT, ONNX Runtime or
ncnn through run_head.py). It offers:

  boardhead.add_arguments(parser)    the board's own flags (what to run: images, golden inputs, the runtime)
  boardhead.load(args, config, base) -> an object with .file (the head, as client.json names it), .items
                                     [(name, input)], .run(input) -> (int codes, head ms or None), .describe
                                     (what ran the head); ValueError/OSError/KeyError: bad usage (exit 2)

client.json (written at export) holds the tail's model and input name and each head's wire contract (contract id,
dtype, shape, layout, scale, zero point, the context codec's tables). The wire is the host's `bottlefit run-head
--wire`: int8 (the codes), context (the codes as one frame coded by the export's context model, boardcodec.py) or
fp32 (dequantized here), over the Open Inference Protocol (KServe v2) REST with the binary tensor extension, to
`bottlefit serve OUT` or NVIDIA Triton (the repository of `bottlefit triton`; --wire fp32 with --model-name
<arch>_tail_fp32). Per image: head ms, payload bytes, encode ms, round trip ms, server ms, the top-k classes with
their softmax probabilities. Exit 0 when every image got logits, 1 when one failed (after retries), 2 on bad
usage or missing files.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import boardcodec  # noqa: E402 - the bundle's own module
import boardhead  # noqa: E402 - the bundle's own module: this board's runtime
import boardhttp  # noqa: E402 - the bundle's own module
from boardhttp import V2_TYPES  # noqa: E402 - the bundle's own module

CONFIG = "client.json"


def read_config(path):
    """client.json: {tail_model, tail_input, heads: [{head, contract_id, dtype, shape, layout, scale, zero_point,
    head_outputs_codes, codec_tables}]} with paths relative to its folder."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != "bottlefit-client" or "heads" not in config:
        raise ValueError(f"{path} is not a bottlefit client config of this version: re-export with this bottlefit")
    return config


def wire_of(config, head_file, path=CONFIG):
    """The wire contract of the head ``head_file`` (as client.json names it)."""
    for w in config["heads"]:
        if w["head"] == head_file:
            return w
    heads = ", ".join(w["head"] for w in config["heads"])
    raise ValueError(f"{path} has no wire contract for {head_file} (heads: {heads})")


def request_body(wire, codes, kind, input_name, tables=None):
    """(body, header length, payload bytes): one image's codes as the KServe v2 binary extension wants them, sent
    as ``kind`` (int8 | context | fp32; context needs ``tables``)."""
    layout = wire.get("layout", "NCHW")
    if kind == "context":
        frame = boardcodec.context_frame(tables, codes, str(codes.dtype), layout, wire["scale"], wire["zero_point"])
        blob, dtype, shape = len(frame).to_bytes(4, "little") + frame, "BYTES", [1]
        params = {"codec": "context", "contract_id": wire.get("contract_id")}
        payload = len(frame)
    elif kind == "fp32":
        x = (codes.astype(np.float32) - np.float32(wire["zero_point"])) * np.float32(wire["scale"])
        if layout == "NHWC" and x.ndim == 4:  # the tail takes NCHW
            x = x.transpose(0, 3, 1, 2)
        blob, dtype, params = np.ascontiguousarray(x, dtype="<f4").tobytes(), V2_TYPES["float32"], {}
        shape, payload = list(x.shape), len(blob)
    else:
        blob, dtype, shape = np.ascontiguousarray(codes).tobytes(), V2_TYPES[str(codes.dtype)], list(codes.shape)
        params = {"scale": wire["scale"], "zero_point": wire["zero_point"], "layout": layout}
        if wire.get("contract_id"):
            params["contract_id"] = wire["contract_id"]
        payload = len(blob)
    body, header_len = boardhttp.request_body(input_name, shape, dtype, params, blob)
    return body, header_len, payload


def load_tables(wire, base, path=CONFIG):
    """The context codec's tables of this head (client.json's codec_tables, relative to its folder)."""
    rel = wire.get("codec_tables")
    if not rel:
        raise ValueError(f"{path} names no codec tables for {wire['head']}: re-export with this bottlefit")
    return boardcodec.load(os.path.join(base, rel))


def main(argv=None):
    p = argparse.ArgumentParser(description=(boardhead.__doc__ or __doc__).splitlines()[0],
                                epilog=getattr(boardhead, "EXAMPLES", None),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    boardhead.add_arguments(p)
    boardhttp.add_renamed(p, "--model-name", "--model",
                          help="the tail's model name on the server (default: client.json's tail_model)")
    boardhttp.add_renamed(p, "--client-json", "--meta", default=os.path.join(HERE, CONFIG),
                          help="the wire contracts (default: client.json beside this script)")
    boardhttp.add_arguments(p)
    a = p.parse_args(argv)

    try:
        config = read_config(a.client_json)
        base = os.path.dirname(os.path.abspath(a.client_json))
        head = boardhead.load(a, config, base)
        wire = wire_of(config, head.file, a.client_json)
        tables = load_tables(wire, base, a.client_json) if a.wire == "context" else None
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = f"{a.server.rstrip('/')}/v2/models/{a.model_name or config['tail_model']}/infer"
    failed = 0
    for i, (name, x) in enumerate(head.items):
        try:
            codes, head_ms = head.run(x)
            t0 = time.perf_counter()
            body, hl, payload = request_body(wire, codes, a.wire, config.get("tail_input", "bottleneck"), tables)
            encode_ms = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            resp, logits = boardhttp.infer(url, body, hl, a.timeout, a.retries, a)
        except (RuntimeError, ValueError, OSError) as e:  # reported, never silently dropped
            failed += 1
            print(json.dumps({"image": str(name), "error": str(e)}) if a.json else f"FAIL {name}: {e}")
            continue
        rtt_ms = (time.perf_counter() - t1) * 1e3
        server_ms = (resp.get("parameters") or {}).get("server_ms")
        top = boardhttp.topk(logits[0], a.topk)
        rec = {"image": str(name), "head_ms": head_ms, "payload_bytes": payload, "encode_ms": encode_ms,
               "round_trip_ms": rtt_ms, "server_ms": server_ms,
               "topk": [{"class": c, "probability": pr, "logit": lg} for c, pr, lg in top],
               "logits": [float(v) for v in logits[0]]}
        if a.json:
            print(json.dumps(rec))
        else:
            ran = "" if head_ms is None else f"head {head_ms:.2f} ms ({head.describe}), "
            server = "" if server_ms is None else f" (server {server_ms:.1f} ms)"
            classes = " ".join(f"{c}:{pr:.3f}" for c, pr, _ in top)
            print(f"[{i + 1}/{len(head.items)}] {name}: {ran}{payload} B (encode {encode_ms:.1f} ms), round trip "
                  f"{rtt_ms:.1f} ms{server}, top-{a.topk} class:probability {classes}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
