from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.targets import options_from
from bottlefit.targets.rpi import TARGET, RpiOptions
from bottlefit.targets.rpi.profiles import PROFILES
from bottlefit.targets.rpi.tflite import inspect_tflite
from tests.targets.rpi import head, rpi_bundle


def _script(name: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(out / "board" / name), *args], capture_output=True, text=True,
                          timeout=120)


def test_unknown_layout_is_argparse_exit_2() -> None:
    p = argparse.ArgumentParser()
    TARGET.add_arguments(p)
    assert options_from(RpiOptions, vars(p.parse_args([]))) == RpiOptions(layout="nhwc", allow_float_ops=False)
    assert options_from(RpiOptions, vars(p.parse_args(["--layout", "nchw"]))).layout == "nchw"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--layout", "chw"])
    assert e.value.code == 2


@pytest.mark.slow
def test_build_writes_artifacts_with_the_wire_contract() -> None:
    out, arts = rpi_bundle()
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
    assert golden["format_version"] == 2 and golden["default_runtime"] == PROFILES["pi4"].runtime
    models = {m["runtime"]: m for m in golden["models"]}
    assert models["litert"]["output"] == i8.outputs[0].to_dict() and models["litert"]["lsb"] == i8.outputs[0].scale
    assert models["onnxruntime"]["model"] == "../head.int8.onnx"
    assert models["onnxruntime"]["lsb"] == ox.quantization["output"]["scale"] > 0
    # golden outputs come from the reference semantics, never from this host's own int8 kernels
    assert "BUILTIN_REF" in models["litert"]["made_with"] and "spec" in models["onnxruntime"]["made_with"]
    ys = np.load(out / "board" / models["onnxruntime"]["outputs_file"])
    assert ys.shape == (4, 12, 29, 29) and ys.dtype == np.float32
    assert models["onnxruntime"]["wire"] == {"dtype": "int8", "scale": ox.quantization["output"]["scale"],
                                             "zero_point": ox.quantization["output"]["zero_point"]}
    assert not list(out.rglob("*.tmp"))
    # the context codec travels with the bundle: its module and each int8 head's tables (hashed in the manifest)
    assert "board/boardcodec.py" in by_file and "board/boardhttp.py" in by_file
    for m in golden["models"]:
        rel = m["codec_tables"]
        assert rel == f"../codec/{m['contract_id']}.npz" and rel[3:] in by_file and (out / rel[3:]).is_file()


@pytest.mark.slow
def test_verify_on_board_passes_on_real_golden_data() -> None:
    # The TFLite head only: this x86 host is not a Pi, and its ONNX Runtime int8 kernels may saturate where the
    # Pi's do not (tests/targets/rpi/test_emulated.py runs every head on the Pi's own ISA).
    out, _ = rpi_bundle()
    r = _script("verify_on_board.py", out, "--runtime", "litert")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "PASS"
    r = _script("verify_on_board.py", out, "--runtime", "litert", "--json")
    doc = json.loads(r.stdout)
    (res,) = doc["results"]
    assert doc["passed"] is True and res["status"] == "pass" and len(res["images"]) == 4
    assert res["max_abs_lsb"] <= 2.0 and res["cosine"] >= 0.999


@pytest.mark.slow
def test_verify_on_board_fails_on_perturbed_outputs_and_exit_2_on_missing(tmp_path: Path) -> None:
    out, _ = rpi_bundle()
    bundle = tmp_path / "b"
    shutil.copytree(out, bundle)
    y = np.load(bundle / "board" / "golden_outputs.npy")
    y.flat[:: max(1, y.size // 50)] = np.clip(y.flat[:: max(1, y.size // 50)].astype(np.int16) + 5, -128, 127)
    np.save(bundle / "board" / "golden_outputs.npy", y.astype(np.int8))
    r = _script("verify_on_board.py", bundle, "--runtime", "litert")
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1] == "FAIL"
    (bundle / "head.int8.tflite").unlink()
    r = _script("verify_on_board.py", bundle, "--runtime", "litert")
    assert r.returncode == 2 and "head.int8.tflite" in r.stderr


@pytest.mark.slow
def test_run_head_writes_the_golden_payload(tmp_path: Path) -> None:
    out, _ = rpi_bundle()
    payload = tmp_path / "p.bin"
    r = _script("run_head.py", out, "--golden", "--runtime", "litert", "--runs", "2", "--out", str(payload))
    assert r.returncode == 0, r.stderr
    assert "latency median" in r.stdout
    golden = np.load(out / "board" / "golden_outputs.npy")
    got = np.frombuffer(payload.read_bytes(), dtype=np.int8).reshape(golden.shape)
    # XNNPACK requantizes in float, the reference kernels in fixed point: codes on a rounding edge move one step
    # (measured: 7% of this random-BN head's codes, never more than one)
    steps = np.abs(got.astype(np.int16) - golden.astype(np.int16))
    assert steps.max() <= 1 and np.mean(steps > 0) < 0.2


@pytest.mark.slow
def test_run_head_on_a_float_npy_image(tmp_path: Path) -> None:
    out, _ = rpi_bundle()
    _, card = head("r152v2")
    x = CalibrationSet.builtin(card, part="heldout", count=1, log=lambda s: None).images[:1]
    np.save(tmp_path / "img.npy", np.array(x))
    payload = tmp_path / "p.bin"
    r = _script("run_head.py", out, "--image", str(tmp_path / "img.npy"), "--runs", "1", "--out", str(payload))
    assert r.returncode == 0, r.stderr
    assert len(payload.read_bytes()) == 12 * 29 * 29


@pytest.mark.slow
def test_run_head_runs_the_onnx_head_and_says_when_a_runtime_is_missing(tmp_path: Path) -> None:
    out, _ = rpi_bundle()
    payload = tmp_path / "p.bin"
    r = _script("run_head.py", out, "--golden", "--runtime", "onnxruntime", "--runs", "1", "--out", str(payload))
    assert r.returncode == 0, r.stderr
    # the graph ends in DequantizeLinear (float out); the payload is still the int8 codes, 1 byte per element
    assert len(payload.read_bytes()) == 4 * 12 * 29 * 29
    bundle = tmp_path / "b"
    shutil.copytree(out, bundle)
    meta = json.loads((bundle / "board" / "golden.json").read_text())
    meta["models"][1]["runtime"] = "tensorflow"
    (bundle / "board" / "golden.json").write_text(json.dumps(meta))
    r = _script("verify_on_board.py", bundle, "--json")
    doc = json.loads(r.stdout)
    assert [x["status"] for x in doc["results"]][1] == "skip" and "unknown runtime" in doc["results"][1]["reason"]
