"""The rpi bundle's own board scripts on the Pi's instruction set: arm64 user-mode emulation, real wheels.

Every head in the bundle (head.int8.tflite in ai-edge-litert, head.int8.onnx in onnxruntime, both aarch64 builds)
runs in the board's verify_on_board.py under an emulated Cortex-A72 (Pi 4) and Cortex-A76 (Pi 5), against golden
outputs made under reference semantics; the verdict is recorded as emulated, with the CPU model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot, get_core, run_python
from bottlefit.targets import Emulate, execute
from bottlefit.targets.rpi import TARGET
from tests.targets.rpi import rpi_bundle


@pytest.fixture(scope="module")
def sysroot():  # noqa: ANN201 - the emulation's own type
    try:
        return ensure_sysroot()
    except EmulationUnavailable as e:
        pytest.skip(f"arm64 emulation unavailable here: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["pi4", "pi5"])
def test_board_verifier_passes_every_head_on_the_emulated_pi(sysroot, profile: str) -> None:
    out, _ = rpi_bundle()
    cp = run_python(sysroot, get_core(profile), out / "board" / "verify_on_board.py", ["--json"], cwd=out / "board")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    doc = json.loads(cp.stdout.strip().splitlines()[-1])
    assert doc["machine"] == "aarch64" and doc["python"].startswith("3.11") and doc["passed"] is True
    by_model = {r["model"]: r for r in doc["results"]}
    assert set(by_model) == {"../head.int8.tflite", "../head.int8.onnx", "../head.int8.ncnn.param"}
    for r in by_model.values():
        assert r["status"] == "pass" and len(r["images"]) == 4
        assert r["max_abs_lsb"] <= 2.0 and r["cosine"] >= 0.999
    # ONNX Runtime's aarch64 int8 kernels compute the Q/DQ graph exactly as the ONNX spec defines it
    assert by_model["../head.int8.onnx"]["max_abs_lsb"] == 0.0
    # ncnn's integer sums are exact; only its float32 dequantization differs from the float64 reference
    assert by_model["../head.int8.ncnn.param"]["max_abs_lsb"] < 0.01


@pytest.mark.slow
def test_execute_records_gated_emulated_verdicts_with_the_cpu(sysroot) -> None:
    out, arts = rpi_bundle()
    lines: list[str] = []
    runs = execute(TARGET, out, arts, Emulate.parse("pi4,pi5"), lines.append)
    assert {(e.artifact, e.isa.split()[1]) for e in runs} == {
        (f, cpu) for f in ("head.int8.tflite", "head.int8.onnx", "head.int8.ncnn.param")
        for cpu in ("cortex-a72", "cortex-a76")}
    for e in runs:
        assert e.where == "emulated" and e.gated and e.status == "agrees" and e.passed
        assert "qemu-user" in e.isa and "on board" not in e.isa and e.metrics["images"] == 4
    assert any("cortex-a76" in line for line in lines)


@pytest.mark.slow
def test_start_leaves_the_boards_running_beside_the_caller(sysroot) -> None:
    """start_execution launches one guest per board (every head in it) and returns; collect() gives the records
    execute() gives; cancel() stops the guests of a bundle whose results are no longer wanted."""
    out, arts = rpi_bundle()
    running = TARGET.start_execution(out, arts, Emulate.parse("pi4,pi5"), lambda m: None)
    assert [c.profile for c, _ in running.guests] == ["pi4", "pi5"]
    assert len({p.pid for _, p in running.guests}) == 2
    runs = running.collect()
    assert running.guests == [] and len(runs) == 6
    assert all(e.where == "emulated" and e.status == "agrees" for e in runs)
    stopped = TARGET.start_execution(out, arts, Emulate.parse("pi4"), lambda m: None)
    (proc,) = [p for _, p in stopped.guests]
    stopped.cancel()
    assert proc.returncode is not None and stopped.guests == [] and stopped.collect() == []


@pytest.mark.slow
def test_execute_fails_a_head_that_deviates_on_the_pi(sysroot, tmp_path: Path) -> None:
    out, arts = rpi_bundle()
    bundle = tmp_path / "rpi"
    shutil.copytree(out, bundle)
    golden = bundle / "board" / "golden_onnx_outputs.npy"
    y = np.load(golden)
    np.save(golden, y + np.float32(0.5) * np.abs(y).max())  # golden no longer what the graph computes
    runs = {e.artifact: e for e in execute(TARGET, bundle, arts, Emulate.parse("pi4"), lambda m: None)}
    assert runs["head.int8.onnx"].status == "deviates" and not runs["head.int8.onnx"].passed
    assert runs["head.int8.tflite"].status == "agrees"


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["pi4", "pi5"])
def test_pi_payload_of_the_default_ncnn_head_is_the_reference_codes(sysroot, tmp_path: Path, profile: str) -> None:
    """The default head of every profile is head.int8.ncnn.param (float out, the cheapest measured): on the Pi's
    own ncnn kernels the bytes run_head.py sends by default are the wire codes of its reference semantics."""
    out, _ = rpi_bundle()
    meta = json.loads((out / "board" / "golden.json").read_text())
    assert meta["default_runtime"] == "ncnn" and meta["profile"]["model"] == "head.int8.ncnn.param"
    entry = next(m for m in meta["models"] if m["runtime"] == "ncnn")
    w = entry["wire"]
    assert w["dtype"] == "int8" and entry["lsb"] == w["scale"]
    ref = np.load(out / "board" / entry["outputs_file"])
    codes = np.clip(np.round(ref / np.float32(w["scale"])) + w["zero_point"], -128, 127).astype(np.int8)
    payload = tmp_path / "p.bin"
    cp = run_python(sysroot, get_core(profile), out / "board" / "run_head.py",
                    ["--golden", "--runs", "1", "--out", str(payload), "--json"], cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout.strip().splitlines()[-1])
    assert doc["runtime"] == "ncnn" and doc["kernels"].startswith("ncnn") and doc["bytes"] == codes.size
    got = np.frombuffer(payload.read_bytes(), np.int8)
    # a float32 ulp can move a value across a rounding boundary of the wire grid: at most one code, rarely
    diff = np.abs(got.astype(int) - codes.ravel().astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, (diff.max(), np.count_nonzero(diff))


@pytest.mark.slow
def test_pi_payload_of_the_onnx_head_is_the_reference_codes(sysroot, tmp_path: Path) -> None:
    """head.int8.onnx (float out): on the Pi's own ONNX Runtime kernels (the profile's choice of them) the bytes
    run_head.py sends are exactly the int8 codes of the reference semantics."""
    out, _ = rpi_bundle()
    meta = json.loads((out / "board" / "golden.json").read_text())
    entry = next(m for m in meta["models"] if m["runtime"] == "onnxruntime")
    w = entry["wire"]
    ref = np.load(out / "board" / entry["outputs_file"])
    codes = np.clip(np.round(ref / np.float32(w["scale"])) + w["zero_point"], -128, 127).astype(np.int8)
    payload = tmp_path / "p.bin"
    cp = run_python(sysroot, get_core("pi4"), out / "board" / "run_head.py",
                    ["--golden", "--runtime", "onnxruntime", "--runs", "1", "--out", str(payload), "--json"],
                    cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert payload.read_bytes() == codes.tobytes()
    # with the board profile's kernel choice (pi4: ONNX Runtime's uint8 kernels), and the same codes
    config = meta["profile"]["ort_session_config"]
    assert config == {"session.qdqisint8allowed": "0"}
    assert json.loads(cp.stdout.strip().splitlines()[-1])["kernels"].endswith("(session.qdqisint8allowed=0)")
