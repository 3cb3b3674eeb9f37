"""Run split from a Jetson: the head in TensorRT (trtexec, the engine build_engine.sh made), its codes to the tail.

The Jetson's part of client.py (the one board client, boardclient.py in the package): the head runs in TensorRT
through trtexec, or its outputs come from files. Python >= 3.6 (JetPack 4), the standard library and numpy.
--input: float32 little-endian input tensors (the golden/ format), one file per image; --bottleneck: the head's
outputs, as float32 (.bin little-endian, .npy, or a trtexec --exportOutput JSON) or as the int8 codes themselves
(a .bin of one byte per element, or an int8/uint8 .npy: what an engine with int8 outputs emits).
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

EXAMPLES = """examples:
  python3 client.py --server http://edge:8000 --engine engines/head.qdq.engine --golden
  python3 client.py --server http://edge:8000 --engine engines/head.qdq.engine --input x.bin --wire context
  python3 client.py --server http://edge:8000 --bottleneck golden/output.bottleneck.bin --json"""


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="float32 input tensors (.bin little-endian or .npy), run by --engine")
    src.add_argument("--golden", action="store_true", help="run the golden input (golden/) through --engine")
    src.add_argument("--bottleneck", nargs="+",
                     help="the head's outputs: float32 (.bin, .npy or trtexec JSON) or its int8 codes (.bin, .npy)")
    p.add_argument("--engine", help="the TensorRT engine build_engine.sh wrote (with --input/--golden)")
    p.add_argument("--trtexec", default="/usr/src/tensorrt/bin/trtexec",
                   help="trtexec (default %(default)s)")


def read_bottleneck(path, shape, dtype):
    """The head's output of ``shape``: the contract's ``dtype`` codes as they are (an int8/uint8 .npy, or a .bin
    of one byte per element) or float32 (raw little-endian .bin, .npy, or trtexec --exportOutput JSON)."""
    n = int(np.prod(shape))
    if path.endswith(".npy"):
        x = np.load(path)
        if x.dtype != np.dtype(dtype):
            x = x.astype(np.float32)
    elif path.endswith(".json"):
        sys.path.insert(0, HERE)
        from verify_on_board import Unreadable, read_export_output  # the bundle's own trtexec parser

        try:
            outputs = read_export_output(path)
        except Unreadable as e:
            raise ValueError(str(e)) from None
        _, values = next(iter(outputs.values()))
        x = np.asarray(values, dtype=np.float32)
    elif os.path.getsize(path) == n * np.dtype(dtype).itemsize:
        x = np.fromfile(path, dtype=dtype)  # the codes themselves: one byte per element
    else:
        x = np.fromfile(path, dtype="<f4")
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


def codes_of(y, wire):
    """The head's bottleneck -> the contract's int8 codes: integer codes as they are; floats printed from an
    engine with int8 outputs (trtexec prints the codes as numbers: rounding recovers them); or floats that are
    exactly scale * (q - zp) (trtexec prints 6 digits: rounding recovers q)."""
    dtype = np.dtype(wire["dtype"])
    if y.dtype == dtype:
        return y
    info = np.iinfo(dtype)
    if wire.get("head_outputs_codes"):
        return np.clip(np.round(y), info.min, info.max).astype(dtype)
    q = np.round(y.astype(np.float64) / wire["scale"]) + wire["zero_point"]
    return np.clip(q, info.min, info.max).astype(dtype)


class JetsonHead:
    """The bundle's one head (client.json's heads[0]) in TensorRT, or its outputs read from files."""

    def __init__(self, a, wire, items):
        self.a, self.wire, self.items = a, wire, items
        self.file = wire["head"]
        self.shape = [1] + list(wire["shape"])
        self.describe = "trtexec" if a.bottleneck is None else "from file"

    def run(self, item):
        bottleneck, input_file = item
        head_ms = None
        if input_file is not None:
            bottleneck, head_ms = run_engine(self.a.trtexec, self.a.engine, self.wire["input"], input_file)
        return codes_of(read_bottleneck(bottleneck, self.shape, self.wire["dtype"]), self.wire), head_ms


def load(a, config, base):
    wire = config["heads"][0]
    if a.bottleneck:
        items = [(f, (f, None)) for f in a.bottleneck]
    else:
        if not a.engine:
            raise ValueError("--input/--golden run the head in TensorRT: pass --engine (build_engine.sh wrote it)")
        files = a.input or [os.path.join(base, config["golden_input"])]
        items = [(f, (None, f)) for f in files]
    missing = [f for _, pair in items for f in pair if f and not os.path.isfile(f)]
    if missing:
        raise ValueError("%s not found" % ", ".join(missing))
    return JetsonHead(a, wire, items)
