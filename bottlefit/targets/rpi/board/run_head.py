#!/usr/bin/env python3
"""Run the BottleFit head on the Raspberry Pi: one image (or .npy), or the golden inputs.

Needs Python >= 3.9 and numpy, plus the runtime of the head it runs: ai-edge-litert (or tflite-runtime) for
head.int8.tflite, onnxruntime for head.int8.onnx, ncnn for head.int8.ncnn.param (+ its .bin); Pillow only for
image files. Prints the median latency of
--runs invocations; with --out FILE, writes the head's output there (the bytes that go on the wire, C order, in the
model's layout; nothing is written without it). Flag names are the host's (`bottlefit run-head --head`).

  python3 run_head.py --image digit.png --out payload.bin
  python3 run_head.py --golden --runs 50
  python3 run_head.py --golden --runtime onnxruntime
  python3 run_head.py --golden --runtime ncnn

Defaults (head, delegate, threads) are the board profile's that the export chose by measured cost (golden.json's
"profile", "default_runtime", "default_delegate", "default_threads"); --runtime, --xnnpack/--no-xnnpack and
--threads override them. ONNX Runtime gets the profile's session config entries ("profile" ->
"ort_session_config", e.g. session.qdqisint8allowed=0: its uint8 kernels, cheaper on a Pi 4's and Pi 3's cores,
same outputs); --ort-option KEY=VALUE adds to or overrides them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIMES = ("litert", "onnxruntime", "ncnn")


class MissingRuntime(Exception):
    """The Python package this head needs is not installed on this board."""


def load_interpreter(model, threads, xnnpack=True):
    try:
        from ai_edge_litert import interpreter as tfl
    except ImportError:
        try:
            from tflite_runtime import interpreter as tfl
        except ImportError:
            raise MissingRuntime("install ai-edge-litert (pip install ai-edge-litert) or tflite-runtime") from None
    kwargs = {"model_path": model, "num_threads": threads}
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = tfl.Interpreter(**kwargs)
    interp.allocate_tensors()
    return interp


def ncnn_weights(model):
    """The .bin beside an ncnn .param (NAME.param -> NAME.bin)."""
    return model[: -len(".param")] + ".bin" if model.endswith(".param") else model + ".bin"


class Head:
    """One head artifact in its runtime: ``run(x) -> y`` on arrays encoded as golden.json's specs say."""

    def __init__(self, entry, model, threads=1, xnnpack=True, ort_config=None):
        self.entry, self.runtime = entry, entry["runtime"]
        if self.runtime == "litert":
            self.interp = load_interpreter(model, threads, xnnpack)
            self.ind = self.interp.get_input_details()[0]
            self.outd = self.interp.get_output_details()[0]
            self.describe = "xnnpack %s" % ("on" if xnnpack else "off")
        elif self.runtime == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError:
                raise MissingRuntime("install onnxruntime (pip install onnxruntime)") from None
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            config = sorted((ort_config or {}).items())
            for key, value in config:
                opts.add_session_config_entry(key, str(value))
            self.sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
            self.describe = "onnxruntime %s%s" % (
                ort.__version__, " (%s)" % ", ".join("%s=%s" % kv for kv in config) if config else "")
        elif self.runtime == "ncnn":
            try:
                import ncnn
            except ImportError:
                raise MissingRuntime("install ncnn (pip install ncnn)") from None
            self.ncnn, self.net = ncnn, ncnn.Net()
            opt = self.net.opt
            opt.num_threads, opt.use_int8_inference = threads, True
            # float32 semantics, as verified: ncnn turns fp16 storage and arithmetic on by itself where the core
            # has them (a Pi 5's), which changes the numerics
            opt.use_fp16_packed = opt.use_fp16_storage = opt.use_fp16_arithmetic = False
            weights = ncnn_weights(model)
            if self.net.load_param(model) != 0 or self.net.load_model(weights) != 0:
                raise MissingRuntime("ncnn could not load %s and %s" % (model, weights))
            self.describe = "ncnn %s" % getattr(ncnn, "__version__", "")
        else:
            raise MissingRuntime("unknown runtime %r in golden.json" % self.runtime)

    def set_input(self, x):
        self.x = np.ascontiguousarray(x)
        if self.runtime == "litert":
            self.interp.set_tensor(self.ind["index"], self.x)
        elif self.runtime == "ncnn":
            self.mat = self.ncnn.Mat(np.ascontiguousarray(self.x[0]))  # CHW: ncnn's Mat has no batch axis

    def invoke(self):
        if self.runtime == "litert":
            self.interp.invoke()
        elif self.runtime == "ncnn":
            ex = self.net.create_extractor()
            ex.input(self.entry["input"]["name"], self.mat)
            ret, out = ex.extract(self.entry["output"]["name"])
            if ret != 0:
                raise RuntimeError("ncnn failed to compute %s (error %d)" % (self.entry["output"]["name"], ret))
            self.y = np.array(out, dtype=np.float32).reshape(self.entry["output"]["shape"])
        else:
            self.y = self.sess.run([self.entry["output"]["name"]], {self.entry["input"]["name"]: self.x})[0]

    def output(self):
        if self.runtime == "litert":
            return self.interp.get_tensor(self.outd["index"])
        return self.y

    def run(self, x):
        self.set_input(x)
        self.invoke()
        return self.output()


def wire_codes(y, entry):
    """What goes on the wire: the head's int8 codes. A Q/DQ head ends in DequantizeLinear (float out); its codes are
    recovered exactly with the output's scale and zero point (golden.json "wire"), so the payload stays 1 byte
    per element whichever runtime ran the head."""
    w = entry.get("wire")
    if not w or y.dtype == np.dtype(w["dtype"]):
        return y
    lo, hi = (-128, 127) if w["dtype"] == "int8" else (0, 255)
    q = np.round(y.astype(np.float32) / np.float32(w["scale"])) + w["zero_point"]
    return np.clip(q, lo, hi).astype(w["dtype"])


def read_golden(golden_json, model=None, runtime=None):
    """(golden.json contents, its folder, the model entry, the model path), or None after saying on stderr what
    is missing. ``runtime`` picks the model entry (default: golden.json's default_runtime)."""
    if not os.path.isfile(golden_json):
        print("error: %s not found" % golden_json, file=sys.stderr)
        return None
    with open(golden_json) as f:
        meta = json.load(f)
    base = os.path.dirname(os.path.abspath(golden_json))
    want = runtime or meta.get("default_runtime")
    entries = [e for e in meta["models"] if e["runtime"] == want] or meta["models"][:1]
    if runtime and entries[0]["runtime"] != runtime:
        print("error: %s has no %s model" % (golden_json, runtime), file=sys.stderr)
        return None
    entry = entries[0]
    return meta, base, entry, model or os.path.join(base, entry["model"])


def preprocess(path, pre, in_spec):
    """Image file -> the model's input array, exactly as the host preprocessed (resize, crop, normalize)."""
    if path.endswith(".npy"):
        x = np.load(path)
        if x.dtype == np.dtype(in_spec["dtype"]) and x.size == int(np.prod(in_spec["shape"])):
            return x.reshape(in_spec["shape"])  # already encoded for the model
        x = x.astype(np.float32)  # a float NCHW image, preprocessed elsewhere
    else:
        try:
            from PIL import Image
        except ImportError:
            sys.exit("error: Pillow is not installed: pass a .npy input or pip install pillow")
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = pre["resize"] / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            ch, cw = pre["crop"]
            left, top = int(round((im.size[0] - cw) / 2.0)), int(round((im.size[1] - ch) / 2.0))
            im = im.crop((left, top, left + cw, top + ch))
            x = np.asarray(im, dtype=np.float32) / 255.0
        x = ((x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32))
        x = x.transpose(2, 0, 1)[None]
    if in_spec["layout"] == "NHWC" and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    if in_spec["dtype"] in ("int8", "uint8"):
        lo, hi = (-128, 127) if in_spec["dtype"] == "int8" else (0, 255)
        q = np.round(x / np.float32(in_spec["scale"])) + in_spec["zero_point"]
        x = np.clip(q, lo, hi).astype(in_spec["dtype"])
    return np.ascontiguousarray(x.astype(in_spec["dtype"])).reshape(in_spec["shape"])


def defaults(meta, runtime=None, threads=None, xnnpack=None):
    """(threads, xnnpack) from the flags, else the board profile's choice in golden.json, else (1, True). The
    profile's delegate applies only to its own runtime's head."""
    if threads is None:
        threads = int(meta.get("default_threads") or 1)
    if xnnpack is None:
        delegate = meta.get("default_delegate")
        same = runtime in (None, meta.get("default_runtime"))
        xnnpack = not (same and delegate == "builtin")
    return threads, xnnpack


def ort_config(meta, options=()):
    """ONNX Runtime session config entries: the board profile's (golden.json "profile" -> "ort_session_config"),
    then ``options`` ("KEY=VALUE" strings) over them. ValueError naming an option without "="."""
    config = dict((meta.get("profile") or {}).get("ort_session_config") or {})
    for opt in options or ():
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise ValueError("--ort-option %r: write KEY=VALUE, e.g. session.qdqisint8allowed=0" % opt)
        config[key] = value
    return config


def open_head(golden_json, model=None, runtime=None, threads=None, xnnpack=None, ort_options=()):
    """(golden.json, its folder, the model entry, the Head, threads) with the board profile's defaults, or exit
    code 2 after saying on stderr what is missing or wrong."""
    golden = read_golden(golden_json, model, runtime)
    if golden is None:
        return 2
    meta, base, entry, model = golden
    if not os.path.isfile(model):
        print("error: model %s not found" % model, file=sys.stderr)
        return 2
    threads, xnnpack = defaults(meta, runtime, threads, xnnpack)
    try:
        config = ort_config(meta, ort_options)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    try:
        return meta, base, entry, Head(entry, model, threads, xnnpack, config), threads
    except MissingRuntime as e:
        print("error: %s" % e, file=sys.stderr)
        return 2


def add_kernel_arguments(p):
    """The kernel choices over the board profile's, for run_head.py and verify_on_board.py alike."""
    p.add_argument("--xnnpack", dest="xnnpack", action="store_true", default=None,
                   help="litert: XNNPACK (default: the board profile's delegate)")
    p.add_argument("--no-xnnpack", dest="xnnpack", action="store_false",
                   help="litert: the built-in kernels instead of XNNPACK")
    p.add_argument("--ort-option", action="append", default=[], metavar="KEY=VALUE",
                   help="onnxruntime: a session config entry over the board profile's (repeatable)")


def add_renamed(p, new, old, **kwargs):
    """``new`` with ``old`` as its deprecated spelling (boardhttp.add_renamed: one warning line, still works)."""
    from boardhttp import add_renamed as renamed  # the bundle's own module, beside this one

    return renamed(p, new, old, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (.jpg/.png; needs Pillow) or .npy")
    src.add_argument("--golden", action="store_true", help="run the golden inputs next to this script")
    p.add_argument("--golden-json", default=os.path.join(HERE, "golden.json"))
    p.add_argument("--runtime", choices=RUNTIMES, help="which head to run (default: golden.json's default)")
    add_renamed(p, "--head", "--model", help="the head file (default: the one golden.json names for the runtime)")
    p.add_argument("--runs", type=int, default=20, help="timed invocations per input (default %(default)s)")
    p.add_argument("--threads", type=int, help="default: the board profile's (golden.json default_threads)")
    add_kernel_arguments(p)
    p.add_argument("--out", metavar="FILE",
                   help="write the payload bytes (the wire codes of every input, in order) to FILE (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object (latency in ms) instead of lines")
    a = p.parse_args(argv)

    opened = open_head(a.golden_json, a.head, a.runtime, a.threads, a.xnnpack, a.ort_option)
    if opened == 2:
        return 2
    meta, base, entry, head, threads = opened
    model = os.path.join(base, entry["model"]) if a.head is None else a.head
    if a.golden:
        xs = np.load(os.path.join(base, entry["inputs_file"]))
        xs = [xs[i : i + 1] for i in range(len(xs))]
    else:
        if not os.path.isfile(a.image):
            print("error: %s not found" % a.image, file=sys.stderr)
            return 2
        xs = [preprocess(a.image, meta["preprocess"], entry["input"])]
    times, payload, y = [], b"", None
    for x in xs:
        head.set_input(x)
        for _ in range(max(1, a.runs)):
            t0 = time.perf_counter()
            head.invoke()
            times.append(time.perf_counter() - t0)
        y = wire_codes(head.output(), entry)
        payload += np.ascontiguousarray(y).tobytes()
    if a.out:
        with open(a.out, "wb") as f:
            f.write(payload)
    times.sort()
    out = entry["output"]
    ms = [t * 1e3 for t in times]
    if a.json:
        print(json.dumps({"model": os.path.basename(model), "runtime": entry["runtime"], "kernels": head.describe,
                          "threads": threads, "profile": (meta.get("profile") or {}).get("name"), "runs": len(ms),
                          "median_ms": ms[len(ms) // 2], "min_ms": ms[0], "p90_ms": ms[int(0.9 * (len(ms) - 1))],
                          "mean_ms": sum(ms) / len(ms), "out": a.out, "bytes": len(payload)}))
        return 0
    print("latency median %.3f ms, min %.3f ms, p90 %.3f ms over %d runs (%s, %d thread(s), %s)"
          % (ms[len(ms) // 2], ms[0], ms[int(0.9 * (len(ms) - 1))], len(ms), os.path.basename(model), threads,
             head.describe))
    wire = entry.get("wire") or out
    print("%s %d bytes (%d image(s) x %s %s, scale %s, zero_point %s)%s"
          % ("wrote" if a.out else "payload", len(payload), len(xs), "x".join(str(d) for d in y.shape),
             y.dtype.name, wire.get("scale"), wire.get("zero_point"), " to %s" % a.out if a.out else
             " (not written: pass --out FILE)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
