"""Device cost of every rpi head artifact on every Raspberry Pi profile: guest instructions per inference under
arm64 emulation (bottlefit.emulation.cost, the board's own kernels on its own core) plus this host's milliseconds.

Exports the head with the rpi target (untrained, seeded weights: cost does not depend on the values, except through
ReLU sparsity, which no kernel here exploits), then for each profile and each (artifact, delegate) counts
(instructions with N runs - with 0 runs) / N, 1 thread, batch 1. Prints a markdown table with each cost's ratio
to fp32 TFLite + XNNPACK on the same core, and --json FILE writes the figures (bottlefit/targets/rpi/profiles.py
keeps them as data). --check FILE fails (exit 1) when a cost grew beyond --margin (default 10%) over FILE's.

    PYTHONPATH=. .venv/bin/python bench/bench_pi_cost.py --arch custom_resnet152 --bottleneck-channel 12 \\
        --bottleneck-ver 2 --profiles pi4,pi5,pi3 [--runs 3] [--json cost.json] [--check cost.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.emulation.arm64 import ensure_sysroot, get_core
from bottlefit.emulation.cost import instructions_per_inference

COMBOS: tuple[tuple[str, str, bool], ...] = (  # (file, runtime, xnnpack)
    ("head.fp32.tflite", "litert", True), ("head.fp32.tflite", "litert", False),
    ("head.int8.tflite", "litert", True), ("head.int8.tflite", "litert", False),
    ("head.int8.onnx", "onnxruntime", False),
)
REFERENCE = "head.fp32.tflite/xnnpack"


def key(file: str, runtime: str, xnnpack: bool) -> str:
    return f"{file}/{'cpu' if runtime == 'onnxruntime' else 'xnnpack' if xnnpack else 'builtin'}"


def export_head(args: argparse.Namespace, out: Path) -> Path:
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.rpi import RpiOptions

    params: dict[str, Any] = {"arch": args.arch, "bottleneck_channel": args.bottleneck_channel}
    if args.bottleneck_ver:
        params["bottleneck_ver"] = args.bottleneck_ver
    result = export(ExportRequest(model=ModelSource(untrained=True, **params), target="rpi", out=out,
                                  target_options=RpiOptions(), parity=ParityOptions(emulate=Emulate("off"))))
    return Path(result.path)


def host_ms(path: Path, runtime: str, xnnpack: bool, rounds: int) -> float:
    """Median ms of one inference on this host, 1 thread."""
    if runtime == "litert":
        from ai_edge_litert import interpreter as tfl

        kw = {} if xnnpack else {"experimental_op_resolver_type": tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
        it = tfl.Interpreter(model_path=str(path), num_threads=1, **kw)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        step = it.invoke
    else:
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.log_severity_level = 1, 3
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        i = s.get_inputs()[0]
        feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)}

        def step() -> None:
            s.run(None, feed)
    step()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="custom_resnet152")
    p.add_argument("--bottleneck-channel", type=int, default=12)
    p.add_argument("--bottleneck-ver", default="2")
    p.add_argument("--bundle", type=Path, help="an existing rpi export folder instead of exporting")
    p.add_argument("--profiles", default="pi4,pi5,pi3")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20, help="host timing rounds")
    p.add_argument("--json", type=Path)
    p.add_argument("--check", type=Path, help="a previous --json: exit 1 on a cost regression beyond --margin")
    p.add_argument("--margin", type=float, default=0.10)
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-pi-cost-") as tmp:
        bundle = a.bundle or export_head(a, Path(tmp) / "out")
        sysroot = ensure_sysroot(log=lambda m: print(m, file=sys.stderr))
        ms = {key(f, r, x): host_ms(bundle / f, r, x, a.rounds) for f, r, x in COMBOS}
        costs: dict[str, dict[str, float]] = {}
        for prof in a.profiles.split(","):
            core = get_core(prof)
            costs[prof] = {}
            for f, r, x in COMBOS:
                v = instructions_per_inference(sysroot, core, bundle / f, r, xnnpack=x, runs=a.runs) / 1e6
                costs[prof][key(f, r, x)] = round(v, 2)
                print(f"{prof} {key(f, r, x)}: {v:.2f} M", file=sys.stderr, flush=True)

    profs = list(costs)
    print("| artifact / delegate | " + " | ".join(f"{q} ({get_core(q).cpu}) M instr (x fp32)" for q in profs)
          + " | host ms (x fp32) |")
    print("|---" * (len(profs) + 2) + "|")
    for f, r, x in COMBOS:
        k = key(f, r, x)
        cells = [f"{costs[q][k]:.1f} ({costs[q][k] / costs[q][REFERENCE]:.2f}x)" for q in profs]
        print(f"| {k} | " + " | ".join(cells) + f" | {ms[k]:.2f} ({ms[k] / ms[REFERENCE]:.2f}x) |")
    doc = {"costs_minstr": costs, "host_ms": ms, "runs": a.runs, "arch": a.arch,
           "bottleneck_channel": a.bottleneck_channel, "bottleneck_ver": a.bottleneck_ver}
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    if a.check:
        old = json.loads(a.check.read_text())["costs_minstr"]
        worse = [f"{q} {k}: {v:.1f} M > {old[q][k]:.1f} M x {1 + a.margin:.2f}" for q in costs for k, v in
                 costs[q].items() if q in old and k in old[q] and v > old[q][k] * (1 + a.margin)]
        for w in worse:
            print(f"REGRESSION {w}", file=sys.stderr)
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
