"""`bottlefit demo` end to end (one epoch per stage), and its cache: a second run does not train again."""

from __future__ import annotations

import json
from pathlib import Path

from bottlefit.cli import main
from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot


def test_demo_trains_exports_verifies_and_caches(tmp_path: Path, capsys) -> None:
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--stage-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "BottleFit demo: mini_resnet" in out
    assert "bottleneck 4x5x5: 100 B int8 on the wire (400 B fp32)" in out
    for target in ("onnx", "jetson", "rpi"):
        assert f"parity {target:7s} PASS" in out
        assert json.loads((work / "export" / target / "report.json").read_text())["passed"] is True
    assert "rpi/head.int8.tflite" in out and "jetson/head.qdq.onnx" in out
    # what was verified where: fidelity under reference semantics per target, the Pi's kernels per emulated CPU
    # (or why not), TensorRT on the board
    for target, n in (("onnx", 8), ("jetson", 6), ("rpi", 9)):
        assert f"parity {target:7s} PASS" in out
        assert f"{n}/{n} checks pass" in out.split(f"parity {target:7s}")[1].split("parity")[0]
    assert out.count("fidelity (reference semantics, any host)") == 3
    pi = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("Pi kernels (emulated)")]
    assert len(pi) == 4 and {"cortex-a72" in ln for ln in pi} == {True, False}
    try:
        ensure_sysroot()
        assert all(": agrees" in ln for ln in pi)
    except EmulationUnavailable:
        assert all(": not run" in ln for ln in pi)
    assert "on board: head.qdq.onnx on Jetson orin GPU (TensorRT 10.3.0): not run (" in out
    teacher = float(out.split("teacher (mini ResNet)")[1].split("top-1")[1].split("%")[0])
    student = float(out.split("BottleFit student (fp32)")[1].split("top-1")[1].split("%")[0])
    assert teacher > 85.0 and student > 60.0  # one epoch per stage: learning, not converged
    best = work / "student" / "best.pt"
    stamp = best.stat().st_mtime_ns
    assert main(["demo", "--workdir", str(work), "--stage-epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "cached teacher" in err and "cached student" in err
    assert best.stat().st_mtime_ns == stamp
