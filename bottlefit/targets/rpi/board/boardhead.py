"""Run split from the Raspberry Pi: the head in its runtime (run_head.py), its int8 codes to the tail server.

The Raspberry Pi's part of client.py (the one board client, boardclient.py in the package): which head runs, in
which runtime (ai-edge-litert or tflite-runtime, onnxruntime, ncnn), on which images. Python >= 3.9, numpy and the
head's runtime, as run_head.py; Pillow only for image files.
"""

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run_head import RUNTIMES, open_head, preprocess, wire_codes  # noqa: E402 - the bundle's own module

EXAMPLES = """examples:
  python3 client.py --server http://edge:8000 --image example.png
  python3 client.py --server http://edge:8000 --golden --json
  python3 client.py --server http://edge:8000 --golden --wire context   # ~0.45x the int8 bytes

--wire context sends the codes as one BYTES frame coded by the export's context model (boardcodec.py beside
this script, tables in ../codec/), which `bottlefit serve` decodes bit-exactly."""


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image files (.jpg/.png; needs Pillow) or .npy")
    src.add_argument("--golden", action="store_true", help="send the golden inputs next to this script")
    p.add_argument("--golden-json", default=os.path.join(HERE, "golden.json"))
    p.add_argument("--runtime", choices=RUNTIMES, help="which head to run (default: the board profile's)")
    p.add_argument("--head", help="the head file (default: the one golden.json names for the runtime)")
    p.add_argument("--threads", type=int, help="default: the board profile's (golden.json default_threads)")


class PiHead:
    """The head golden.json names for the runtime, with the board profile's defaults."""

    def __init__(self, opened, items):
        meta, base, self.entry, self.head, _ = opened
        self.file, self.describe, self.items = self.entry["model"], self.head.describe, items

    def run(self, x):
        t0 = time.perf_counter()
        codes = wire_codes(self.head.run(x), self.entry)
        return codes, (time.perf_counter() - t0) * 1e3


def load(a, config, base):
    opened = open_head(a.golden_json, a.head, a.runtime, a.threads)
    if opened == 2:  # open_head said why on stderr
        raise SystemExit(2)
    meta, gbase, entry, _, _ = opened
    if a.golden:
        xs = np.load(os.path.join(gbase, entry["inputs_file"]))
        items = [(n, xs[i:i + 1]) for i, n in enumerate(meta.get("names") or range(len(xs)))]
    else:
        missing = [f for f in a.image if not os.path.isfile(f)]
        if missing:
            raise ValueError("%s not found" % ", ".join(missing))
        items = [(f, preprocess(f, meta["preprocess"], entry["input"])) for f in a.image]
    return PiHead(opened, items)
