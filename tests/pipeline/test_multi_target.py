"""``bottlefit export --target onnx,rpi``: one run for several targets writes, for each, exactly the bytes an
export of that target alone writes; flags apply to the targets that take them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from bottlefit.cli import main

MINI = ["--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "2", "--calib-count", "8",
        "--parity-count", "8", "--emulate", "none"]
# the best recipe: what the targets share includes its equalized split and its gptq-rounded int8 head
BEST = ["--recipe", "best"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/onnx and OUT/rpi of single-target runs, OUT/both of ``--target onnx,rpi`` (its stdout in
    both.stdout)."""
    root = tmp_path_factory.mktemp("multi")
    for name, targets, extra in (("onnx", "onnx", ["--int8"]), ("rpi", "rpi", ["--layout", "nchw"]),
                                 ("both", "onnx,rpi", ["--int8", "--layout", "nchw"])):
        args = [*MINI, *BEST, "--target", targets, "--out", str(root / name), *extra]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            if name == "both":  # through the profiler (bottlefit.exportprofile): its stages are checked below
                (root / "profile.json").write_text(json.dumps(_bench().profile(args)))
            else:
                assert main(["export", *args]) == 0
        (root / f"{name}.stdout").write_text(stdout.getvalue())
    return root


def _bench():
    """The export profiler bench/bench_export_profile.py runs."""
    from bottlefit import exportprofile

    return exportprofile


@pytest.mark.parametrize("target", ["onnx", "rpi"])
def test_each_target_of_one_run_is_byte_identical_to_its_own_run(exports: Path, target: str) -> None:
    """Shared load, split, calibration and held-out images, the rung's equalized split, the rounded int8 head and
    parity's fp32 reference change no byte of any target's directory; each target's flags (--int8 for onnx,
    --layout for rpi) reach it alone."""
    alone, together = _tree(exports / target / target), _tree(exports / "both" / target)
    assert sorted(together) == sorted(alone)
    assert [f for f in alone if alone[f] != together[f]] == []
    assert sorted(p.name for p in (exports / "both").iterdir()) == ["onnx", "rpi"]


def test_multi_target_output_names_each_target(exports: Path) -> None:
    """stdout has each target's verdict under its name, in the order given."""
    out = (exports / "both.stdout").read_text().splitlines()
    both = exports / "both"
    assert out.index("onnx:") < out.index(f"PASS: {both / 'onnx'}") < out.index("rpi:") \
        < out.index(f"PASS: {both / 'rpi'}")


def test_the_profile_has_every_stage_of_every_target(exports: Path) -> None:
    """The profiler sees the pipeline's stage marks: load and split once, then each target's rung setup, build (cut
    into its heads by their progress lines), parity and manifest; the stages' CPU seconds add up to the run's."""
    d = json.loads((exports / "profile.json").read_text())
    assert d["exit_code"] == 0
    stages = {(s["target"], s["stage"]) for s in d["stages"]}
    assert {("-", "load"), ("-", "split")} <= stages
    for target in ("onnx", "rpi"):
        assert {(target, "rung setup"), (target, "parity"), (target, "manifest")} <= stages
    assert {("onnx", "build: head.onnx"), ("onnx", "build: tail.onnx"), ("rpi", "build: head.int8.tflite"),
            ("rpi", "build: head.fp32.tflite"), ("rpi", "build: head.int8.ncnn")} <= stages
    # made once: the split check of the best rung's equalized split, and the images, belong to the first target
    assert ("rpi", "split check") not in stages and ("onnx", "split check") in stages
    assert ("rpi", "calibration images") not in stages
    cpu = sum(s["cpu_s"] for s in d["stages"])
    assert 0.9 * d["total"]["cpu_s"] <= cpu <= d["total"]["cpu_s"] + 0.01
    assert d["total"]["peak_rss_mb"] == max(s["peak_rss_mb"] for s in d["stages"])


@pytest.mark.parametrize("targets,given,err", [
    ("onnx,rpi", ["--precision", "fp16"],
     "--precision is not an option of --target onnx,rpi (it is for --target jetson); drop it"),
    ("onnx,jetson", ["--profile", "orin", "--emulate", "pi4"],
     "--emulate pi4: --target onnx,jetson have no board to emulate (only --target rpi does); drop it or pass "
     "--emulate none"),
    ("jetson,rpi", ["--profile", "orin,pi9"],
     "--profile pi9: no board of that name for --target jetson,rpi; see `bottlefit export --help` for each "
     "target's boards"),
    ("jetson,rpi", ["--profile", "pi4,pi5"],
     "--profile pi4,pi5: pi4 and pi5 are both boards of --target rpi; name one board per target"),
    ("jetson,rpi", [], "--target jetson needs --profile {nano,xavier-nx,orin}"),
    ("onnx,rpi,onnx", [], "--target onnx,rpi,onnx: onnx is named twice; name each target once"),
    ("onnx,tpu", [], "unknown target 'tpu'; choose one of: onnx, jetson, rpi"),
])
def test_multi_target_flags_are_checked_before_any_work(tmp_path: Path, capsys, targets: str, given: list[str],
                                                        err: str) -> None:
    out = tmp_path / "out"
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--target", targets, "--out", str(out), *given])
    assert (rc, capsys.readouterr().err) == (2, f"bottlefit: error: {err}\n")
    assert not out.exists()
