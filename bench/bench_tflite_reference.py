"""TFLite reference semantics two ways, side by side: the reference interpreter (BUILTIN_REF) and the vectorised
evaluator (bottlefit.runtimes.tflite_reference), on the same images of an export, interleaved image by image.

Prints CPU seconds per image (process time: every thread counts) for each, their ratio, and whether every output
is bit-identical; writes the figures as JSON. CPU seconds, not wall: the ratio holds on a loaded machine.

  python bench/bench_tflite_reference.py OUT/rpi [--images 21] [--json bench/results/tflite_reference/r152v2_12.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Artifact
from bottlefit.exporter.manifest import read_manifest
from bottlefit.models.card import ModelCard
from bottlefit.runtimes.cpu import isa_label
from bottlefit.runtimes.litert import LiteRTRunner
from bottlefit.runtimes.tflite_reference import TFLiteReferenceRunner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, help="an rpi export folder (OUT/rpi)")
    p.add_argument("--images", type=int, default=21, help="held-out images (default 21, an export's parity count)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    from bottlefit.calibration.dataset import CalibrationSet

    manifest = read_manifest(a.export)
    art = Artifact.from_dict(next(x for x in manifest["artifacts"] if x["file"] == "head.int8.tflite"))
    card = ModelCard.from_dict(manifest["model_card"])
    held = CalibrationSet.builtin(card, part="heldout", count=a.images, log=lambda s: None)
    spec, out = art.inputs[0], art.outputs[0]
    xs = [wire.encode(spec, np.asarray(held.images[i : i + 1], np.float32)) for i in range(len(held.images))]
    path = a.export / art.file

    t = time.process_time()
    interp = LiteRTRunner(path, num_threads=1, reference=True)
    load_interp = time.process_time() - t
    t = time.process_time()
    fast = TFLiteReferenceRunner(path)
    load_fast = time.process_time() - t
    cpu = {"interpreter": 0.0, "evaluator": 0.0}
    identical = 0
    for x in xs:  # interleaved: both see the same machine load
        t = time.process_time()
        want = interp.infer({spec.name: x})[out.name]
        cpu["interpreter"] += time.process_time() - t
        t = time.process_time()
        got = fast.infer({spec.name: x})[out.name]
        cpu["evaluator"] += time.process_time() - t
        identical += int(np.array_equal(want, got))
    n = len(xs)
    res = {
        "export": str(a.export), "head": art.file, "ops": [op.name for op in fast.graph.ops], "images": n,
        "host": {"machine": platform.machine(), "isa": isa_label()},
        "cpu_s_per_image": {k: v / n for k, v in cpu.items()}, "load_cpu_s": {"interpreter": load_interp,
                                                                              "evaluator": load_fast},
        "ratio_interpreter_over_evaluator": cpu["interpreter"] / cpu["evaluator"],
        "bit_identical_images": identical,
    }
    print(f"{art.file} ({' '.join(res['ops'])}), {n} held-out images, {isa_label()}")
    print(f"  reference interpreter (BUILTIN_REF): {1e3 * cpu['interpreter'] / n:7.1f} ms CPU per image")
    print(f"  vectorised evaluator:                {1e3 * cpu['evaluator'] / n:7.1f} ms CPU per image")
    print(f"  ratio {res['ratio_interpreter_over_evaluator']:.2f}x; bit-identical outputs on {identical}/{n} images")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if identical == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
