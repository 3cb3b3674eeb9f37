"""Device cost of every rpi head artifact on every Raspberry Pi profile: guest instructions per inference under
arm64 emulation (bottlefit.emulation.cost, the board's own kernels on its own core) plus this host's milliseconds
beside PyTorch eager.

Exports the head with the rpi target (untrained, seeded weights: cost does not depend on the values, except through ReLU
sparsity, which no kernel here exploits), then for each profile and each (artifact, delegate) counts the instructions of
N inferences after a warm-up, between two marks the guest sets, / N, 1 thread, batch 1. Delegates: "xnnpack" / "builtin"
(LiteRT), "cpu" (ONNX Runtime, the file's int8 kernels) and "cpu-u8" (ONNX Runtime with session.qdqisint8allowed=0: its
uint8 kernels; bottlefit.targets.rpi.profiles.ORT_CONFIG), and "cpu" for head.int8.ncnn.param (ncnn's int8 kernels, fp16
off). ``--variants s2d`` adds the heads with the exact space-to-depth stem (bottlefit.exporter.head_rewrite), which no
profile ships, as evidence. ``--variants floor`` adds the stem conv's matrix multiply alone, as ONNX Runtime runs it
after im2col (M output pixels x K = C_in*kh*kw x N output channels): MatMulInteger (uint8 x int8, its U8S8 GEMM) and
fp32 MatMul (its SGEMM), no im2col, requantization or other layer; the stem conv alone as the optimized int8 head runs
it (ONNX Runtime's NHWC uint8 QLinearConv: im2col + that GEMM + requantization), what every ONNX Runtime int8 head with
this stem pays; and that conv as a 1x1 over patches gathered beforehand (GEMM + requantization, no im2col). ``--variants
ncnn`` adds the head as an fp32 ncnn model. The same artifacts are timed on this host, interleaved with the PyTorch
eager head (1 thread, medians).

Prints a markdown table (each cost with its ratio to fp32 TFLite + XNNPACK on the same core; host ms with the ratio
to PyTorch eager); ``--out DIR`` writes pi_cost.md, pi_cost.json and pi_cost.png; ``--json FILE`` writes the
figures. ``--update`` writes them into the package's data file, bottlefit/targets/rpi/costs.json, which the rpi
board profiles read (their costs, default heads and the command and head recorded in every bundle); it needs a
board of every core in ``--profiles``. ``--check [FILE]`` exits 1 when a cost grew beyond ``--margin`` (default
10%) over FILE's (default: that data file): the regression check for CI (several minutes: every count is an
emulated run).

    PYTHONPATH=. .venv/bin/python bench/bench_pi_cost.py --arch custom_resnet152 --bottleneck-channel 12 \\
        --bottleneck-ver 2 --profiles pi4,pi5,pi3 [--variants s2d,floor,ncnn] [--out DIR] [--update | --check]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.emulation.arm64 import CORES, WHEELS, ensure_sysroot, get_core, qemu_version
from bottlefit.emulation.cost import instructions_per_inference, regressions
from bottlefit.files import atomic_write_text
from bottlefit.targets.rpi.costvariants import (
    FLOOR,
    NCNN_FP32,
    S2D,
    export_floor,
    export_ncnn,
    export_s2d,
    torch_head,
)
from bottlefit.targets.rpi.profiles import COSTS_FILE, COSTS_SCHEMA, HEADS, ORT_CONFIG, REFERENCE

# (file, runtime, delegate): the heads an rpi bundle ships, one list with the profiles that read their costs
COMBOS: tuple[tuple[str, str, str], ...] = HEADS
EAGER = "pytorch eager (fp32)"


def key(file: str, delegate: str) -> str:
    return f"{file}/{delegate}"


def command(a: argparse.Namespace) -> str:
    """The command line that measures what ``a`` asks (recorded in the data file and every bundle's profile)."""
    variants = f" --variants {a.variants}" if a.variants else ""
    return (f"PYTHONPATH=. .venv/bin/python bench/bench_pi_cost.py --arch {a.arch} --bottleneck-channel "
            f"{a.bottleneck_channel} --bottleneck-ver {a.bottleneck_ver} --profiles {a.profiles}{variants}")


def head_words(a: argparse.Namespace, crop: list[int]) -> str:
    """The measured head in words."""
    return (f"{a.arch} bottleneck_ver {a.bottleneck_ver}, {a.bottleneck_channel} channels, untrained (seeded), "
            f"{crop[0]}x{crop[1]}, batch 1, 1 thread")


def data_file(doc: dict[str, Any], cmd: str, head: str, date: str, qemu: str) -> dict[str, Any]:
    """The package's data file (bottlefit/targets/rpi/costs.json) for a run's figures ``doc``."""
    return {"schema": COSTS_SCHEMA,
            "about": "Guest instructions per inference of every rpi head on every Raspberry Pi core, written by "
                     "bench/bench_pi_cost.py --update; bottlefit.targets.rpi.profiles reads its shipped heads' costs, "
                     "bench_pi_cost.py --check compares a new run with it.",
            "command": cmd, "head": head,
            "made_with": {"date": date, "wheels": [w for w in WHEELS if not w.startswith("numpy")], "qemu": qemu},
            **doc}


def missing_cores(profiles: list[str]) -> list[str]:
    """The emulated cores no board of ``profiles`` runs on: a data file without them leaves a board uncosted."""
    have = {get_core(p).cpu for p in profiles}
    return sorted({c.cpu for c in CORES.values()} - have)


def export_head(args: argparse.Namespace, out: Path) -> Path:
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.rpi import RpiOptions

    result = export(ExportRequest(model=ModelSource(untrained=True, **model_params(args)), target="rpi", out=out,
                                  target_options=RpiOptions(), parity=ParityOptions(emulate=Emulate("off"))))
    return Path(result.path)


def model_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"arch": args.arch, "bottleneck_channel": args.bottleneck_channel}
    if args.bottleneck_ver:
        params["bottleneck_ver"] = args.bottleneck_ver
    return params


def host_runner(path: Path, runtime: str, delegate: str) -> Callable[[], object]:
    """One inference of ``path`` on this host, 1 thread."""
    if runtime == "litert":
        from ai_edge_litert import interpreter as tfl

        kw = ({} if delegate == "xnnpack"
              else {"experimental_op_resolver_type": tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES})
        it = tfl.Interpreter(model_path=str(path), num_threads=1, **kw)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        return it.invoke
    if runtime == "ncnn":
        from bottlefit.runtimes import get_runner

        r = get_runner("ncnn", path, num_threads=1)
        feed = {n: np.zeros(spec.shape, np.float32) for n, spec in r.input_specs().items()}
        return lambda: r.infer(feed)
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 1, 1, 3
    # interleaved rounds: an idle session's spinning threads would steal the core from the next runner
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in ORT_CONFIG[delegate].items():
        o.add_session_config_entry(k, v)
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    dtype = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8}.get(i.type, np.float32)
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype)}
    return lambda: s.run(None, feed)


def host_ms(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms per runner over ``rounds`` interleaved rounds (background load hits all alike)."""
    for f in runners.values():
        for _ in range(2):
            f()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, f in runners.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


def table(doc: dict[str, Any]) -> str:
    costs, ms = doc["costs_minstr"], doc["host_ms"]
    profs = list(costs)
    keys = list(dict.fromkeys(k for q in profs for k in costs[q]))
    eager = ms.get(EAGER)
    lines = ["| artifact / delegate | " + " | ".join(f"{q} ({get_core(q).cpu}) M instr (x fp32 TFLite)" for q in profs)
             + " | host ms (x PyTorch eager) |", "|---" * (len(profs) + 2) + "|"]
    for k in keys:
        cells = [f"{costs[q][k]:.1f} ({costs[q][k] / costs[q][REFERENCE]:.2f}x)" if k in costs[q] else "-"
                 for q in profs]
        host = f"{ms[k]:.2f} ({ms[k] / eager:.2f}x)" if k in ms and eager else "-"
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {host} |")
    if eager:
        lines.append(f"| {EAGER} | " + " | ".join("-" for _ in profs) + f" | {eager:.2f} (1.00x) |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs, ms = doc["costs_minstr"], doc["host_ms"]
    profs = list(costs)
    keys = list(dict.fromkeys(k for q in profs for k in costs[q]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(keys)
    colors = plt.get_cmap("tab20").colors
    for j, k in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(profs))]
        ax.bar(xs, [costs[q].get(k, 0.0) for q in profs], width, label=k, color=colors[j % len(colors)],
               hatch="//" if ".s2d." in k else ".." if k.startswith("stem.gemm") else None)
    for i, q in enumerate(profs):  # the bar: 0.55x fp32 TFLite + XNNPACK on that core
        ax.hlines(0.55 * costs[q][REFERENCE], i - 0.45, i + 0.45, colors="k", linestyles="--")
    ax.set_xticks(range(len(profs)), [f"{q}\n{get_core(q).cpu}" for q in profs])
    ax.set_ylabel("M guest instructions / inference (qemu-user)")
    ax.set_title("per board core (dashed: 0.55x fp32 TFLite+XNNPACK)")
    ax.legend(fontsize=7, ncol=2)
    hk = [k for k in ms if k != EAGER] + ([EAGER] if EAGER in ms else [])
    bx.barh(range(len(hk)), [ms[k] for k in hk], color=["C1" if k == EAGER else "C0" for k in hk])
    if EAGER in ms:
        bx.axvline(0.2 * ms[EAGER], color="k", linestyle="--")
    bx.set_yticks(range(len(hk)), hk, fontsize=7)
    bx.set_xlabel("host ms / inference, 1 thread\n(dashed: 0.2x PyTorch eager)")
    bx.set_title("this host")
    fig.suptitle(f"{doc['arch']} v{doc['bottleneck_ver']} {doc['bottleneck_channel']} ch head, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="custom_resnet152")
    p.add_argument("--bottleneck-channel", type=int, default=12)
    p.add_argument("--bottleneck-ver", default="2")
    p.add_argument("--bundle", type=Path, help="an existing rpi export folder instead of exporting")
    p.add_argument("--profiles", default="pi4,pi5,pi3")
    p.add_argument("--variants", default="", help="comma-separated extra heads to measure: s2d")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20, help="host timing rounds")
    p.add_argument("--no-host", action="store_true", help="emulated costs only")
    p.add_argument("--out", type=Path, help="folder for pi_cost.md, pi_cost.json, pi_cost.png")
    p.add_argument("--json", type=Path)
    p.add_argument("--update", action="store_true",
                   help=f"write the figures into the package's data file ({COSTS_FILE.name}, read by the rpi profiles)")
    p.add_argument("--check", type=Path, nargs="?", const=COSTS_FILE,
                   help=f"a previous --json or data file (default: {COSTS_FILE.name}): exit 1 on a cost regression "
                        "beyond --margin")
    p.add_argument("--margin", type=float, default=0.10)
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if set(variants) - {"s2d", "floor", "ncnn"}:
        p.error(f"--variants {a.variants!r}: s2d, floor and ncnn are known")
    if a.update and missing_cores(a.profiles.split(",")):
        p.error(f"--update: --profiles {a.profiles} has no board on {', '.join(missing_cores(a.profiles.split(',')))}"
                " (every rpi profile reads the costs of its core)")

    # read before --update may rewrite it
    baseline = json.loads(a.check.read_text())["costs_minstr"] if a.check else None

    with tempfile.TemporaryDirectory(prefix="bench-pi-cost-") as tmp:
        bundle = a.bundle or export_head(a, Path(tmp) / "out")
        combos = list(COMBOS)
        head, prefix, images = torch_head(model_params(a)) if (variants or not a.no_host) else (None, "", None)
        doc_floor: tuple[int, int, int] | None = None
        if "s2d" in variants:
            folder = Path(tmp) / "s2d"
            folder.mkdir()
            export_s2d(head, images, prefix, folder)
            combos += [(str(folder / S2D[f]), r, d) for f, r, d in COMBOS if f in S2D]
        if "floor" in variants:
            folder = Path(tmp) / "floor"
            folder.mkdir()
            doc_floor = export_floor(head, images, prefix, folder)
            combos += [(str(folder / f), "onnxruntime", "cpu") for f in FLOOR]
        if "ncnn" in variants:
            folder = Path(tmp) / "ncnn"
            folder.mkdir()
            export_ncnn(head, images, prefix, folder)
            combos.append((str(folder / NCNN_FP32), "ncnn", "cpu"))
        name = {str(f): Path(f).name for f, _, _ in combos}
        ms: dict[str, float] = {}
        if not a.no_host:
            import torch

            torch.set_num_threads(1)
            x = torch.from_numpy(images[:1])

            def eager() -> object:
                with torch.inference_mode():
                    return head(x.clone())

            runners = {key(name[f], d): host_runner(bundle / f, r, d) for f, r, d in combos}
            ms = host_ms({**runners, EAGER: eager}, a.rounds)
        crop = json.loads((bundle / "board" / "golden.json").read_text())["preprocess"]["crop"]
        sysroot = ensure_sysroot(log=lambda m: print(m, file=sys.stderr))
        costs: dict[str, dict[str, float]] = {}
        for prof in a.profiles.split(","):
            core = get_core(prof)
            costs[prof] = {}
            for f, r, d in combos:
                v = instructions_per_inference(sysroot, core, bundle / f, r, xnnpack=d == "xnnpack", runs=a.runs,
                                               ort_config=ORT_CONFIG.get(d) if r == "onnxruntime" else None) / 1e6
                costs[prof][key(name[f], d)] = round(v, 2)
                print(f"{prof} {key(name[f], d)}: {v:.2f} M", file=sys.stderr, flush=True)

    doc = {"costs_minstr": costs, "host_ms": ms, "runs": a.runs, "arch": a.arch,
           **({"stem_gemm_mkn": list(doc_floor)} if doc_floor else {}),
           "bottleneck_channel": a.bottleneck_channel, "bottleneck_ver": a.bottleneck_ver,
           "unit": "M guest instructions per inference under qemu-user, 1 thread; host ms median, 1 thread"}
    md = table(doc)
    print(md)
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    if a.update:
        import datetime

        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        atomic_write_text(COSTS_FILE, json.dumps(data_file(doc, command(a), head_words(a, crop), today,
                                                           qemu_version()), indent=2) + "\n")
        print(f"wrote {COSTS_FILE}", file=sys.stderr)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "pi_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
        (a.out / "pi_cost.md").write_text(md + "\n")
        plot(doc, a.out / "pi_cost.png")
        print(f"wrote {a.out / 'pi_cost.md'}, pi_cost.json, pi_cost.png", file=sys.stderr)
    if a.check:
        worse = regressions(baseline or {}, costs, a.margin)
        for w in worse:
            print(f"REGRESSION {w}", file=sys.stderr)
        print(f"check against {a.check}: {len(worse)} regression(s) beyond +{a.margin:.0%}", file=sys.stderr)
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
