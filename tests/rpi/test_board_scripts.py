from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.exporter.split import Head
from bottlefit.targets import BuildContext
from bottlefit.targets.rpi import TARGET
from bottlefit.targets.rpi.tflite import inspect_tflite
from tests.rpi import CALIB_COUNT, head, scratch


@functools.cache
def _build() -> tuple[Path, list]:
    h, card = head("r152v2")
    out = scratch("target")
    ctx = BuildContext(
        split=SimpleNamespace(head=Head(h), card=card),
        out_dir=out,
        options=argparse.Namespace(layout="nhwc", allow_float_ops=False, observer="minmax"),
        calibration_factory=lambda: CalibrationSet.builtin(card, count=CALIB_COUNT, log=lambda s: None),
        heldout_factory=lambda: CalibrationSet.builtin(card, part="heldout", count=4, log=lambda s: None),
        log=lambda s: None,
    )
    return out, TARGET.build(ctx)


def _script(name: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(out / "board" / name), *args], capture_output=True, text=True,
                          timeout=120)


def test_unknown_layout_is_argparse_exit_2() -> None:
    p = argparse.ArgumentParser()
    TARGET.add_arguments(p)
    assert p.parse_args([]).layout == "nhwc"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--layout", "chw"])
    assert e.value.code == 2


def test_build_writes_artifacts_with_the_wire_contract() -> None:
    out, arts = _build()
    by_file = {a.file: a for a in arts}
    assert {"head.int8.tflite", "head.fp32.tflite", "head.int8.onnx"} <= set(by_file)
    assert all(a.role == "aux" and a.parity is False for f, a in by_file.items() if f.startswith("board/"))
    assert all((out / f).is_file() for f in by_file)  # the manifest hashes them (exporter.manifest)
    i8 = by_file["head.int8.tflite"]
    assert (i8.role, i8.runtime, i8.precision) == ("head", "litert", "int8")
    assert i8.quantization["float_ops"] == 0 and i8.quantization["observer"] == "minmax"
    assert i8.extra["rewrite"]["max_abs_error"] < 1e-5
    # the recorded specs are what the file says: the tail dequantizes with exactly these
    info = inspect_tflite((out / "head.int8.tflite").read_bytes(), "NHWC")
    assert i8.inputs == info.inputs and i8.outputs == info.outputs
    assert i8.outputs[0].dtype == "int8" and i8.outputs[0].layout == "NHWC"
    ox = by_file["head.int8.onnx"]
    assert ox.runtime == "onnxruntime" and ox.inputs[0].dtype == "float32"
    golden = json.loads((out / "board" / "golden.json").read_text())
    assert golden["output"] == i8.outputs[0].to_dict()
    assert not list(out.rglob("*.tmp"))


def test_verify_on_board_passes_on_real_golden_data() -> None:
    out, _ = _build()
    r = _script("verify_on_board.py", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "PASS"


def test_verify_on_board_fails_on_perturbed_outputs_and_exit_2_on_missing(tmp_path: Path) -> None:
    out, _ = _build()
    bundle = tmp_path / "b"
    shutil.copytree(out, bundle)
    y = np.load(bundle / "board" / "golden_outputs.npy")
    y.flat[:: max(1, y.size // 50)] = np.clip(y.flat[:: max(1, y.size // 50)].astype(np.int16) + 5, -128, 127)
    np.save(bundle / "board" / "golden_outputs.npy", y.astype(np.int8))
    r = _script("verify_on_board.py", bundle)
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1] == "FAIL"
    (bundle / "head.int8.tflite").unlink()
    assert _script("verify_on_board.py", bundle).returncode == 2


def test_run_head_writes_the_golden_payload(tmp_path: Path) -> None:
    out, _ = _build()
    payload = tmp_path / "p.bin"
    r = _script("run_head.py", out, "--golden", "--runs", "2", "--out", str(payload))
    assert r.returncode == 0, r.stderr
    assert "latency median" in r.stdout
    golden = np.load(out / "board" / "golden_outputs.npy")
    assert payload.read_bytes() == golden.tobytes()


def test_run_head_on_a_float_npy_image(tmp_path: Path) -> None:
    out, _ = _build()
    _, card = head("r152v2")
    x = CalibrationSet.builtin(card, part="heldout", count=1, log=lambda s: None).images[:1]
    np.save(tmp_path / "img.npy", np.array(x))
    payload = tmp_path / "p.bin"
    r = _script("run_head.py", out, "--image", str(tmp_path / "img.npy"), "--runs", "1", "--out", str(payload))
    assert r.returncode == 0, r.stderr
    assert len(payload.read_bytes()) == 12 * 29 * 29
