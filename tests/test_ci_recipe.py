"""examples/ci: the workflow users copy, and its export-and-verify script run here step by step for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot
from bottlefit.models.checkpoint import save, untrained

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "ci"


def test_workflow_installs_caches_runs_the_script_and_uploads() -> None:
    wf = yaml.safe_load((RECIPE / "github-actions.yml").read_text())
    steps = wf["jobs"]["export"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "apt-get install -y -qq qemu-user-static debootstrap" in runs and "pip install" in runs
    assert "ci/export_and_verify.sh" in runs
    script = (RECIPE / "export_and_verify.sh").read_text()
    (verify,) = [ln for ln in script.splitlines() if " verify " in ln and not ln.startswith("#")]
    assert '"$OUT/export" --strict' in verify  # CI judges by the built-in gates, not the manifest's overrides
    cached = {s["with"]["path"] for s in steps if s.get("uses", "").startswith("actions/cache")}
    assert cached == {"calib", ".bottlefit-cache"}
    assert wf["jobs"]["export"]["env"]["BOTTLEFIT_CACHE"].endswith(".bottlefit-cache")
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["if"] == "always()" and "dist/bundles/" in upload["with"]["path"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    tmp = tmp_path_factory.mktemp("ci")
    lm = untrained("mini_resnet", {"bottleneck_channel": 4})
    ckpt = save(tmp / "best.pt", lm.model, lm.card)
    try:
        ensure_sysroot()
        emulate = "pi4"
    except EmulationUnavailable:
        emulate = "auto"  # the script's steps still run; the report says why the Pi was not emulated
    env = {**os.environ, "CHECKPOINT": str(ckpt), "OUT": str(tmp / "dist"), "EMULATE": emulate,
           "BOTTLEFIT": f"{sys.executable} -m bottlefit"}
    cp = subprocess.run(["bash", str(RECIPE / "export_and_verify.sh")], env=env, capture_output=True, text=True,
                        timeout=900)
    return cp, tmp / "dist", emulate


@pytest.mark.slow
def test_script_exports_verifies_and_gathers_bundles(recipe_run) -> None:
    cp, dist, emulate = recipe_run
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert sorted(p.name for p in (dist / "bundles").iterdir()) == ["jetson.tar.gz", "rpi.tar.gz"]
    with tarfile.open(dist / "bundles" / "rpi.tar.gz") as t:
        names = set(t.getnames())
        assert {"rpi/head.int8.tflite", "rpi/head.int8.onnx", "rpi/board/verify_on_board.py",
                "rpi/manifest.json"} <= names
        assert all(m.mtime == 0 and m.uid == 0 for m in t.getmembers())  # reproducible tarball
    for target in ("jetson", "rpi"):
        report = json.loads((dist / "reports" / f"{target}.report.json").read_text())
        assert report["passed"] is True and report["target"] == target
    rpi = json.loads((dist / "export" / "rpi" / "manifest.json").read_text())
    emulated = [e for e in rpi["parity"]["execution"] if e["where"] == "emulated"]
    assert {e["artifact"] for e in emulated} == {"head.int8.tflite", "head.int8.onnx", "head.int8.ncnn.param"}
    if emulate == "pi4":
        assert all(e["status"] == "agrees" and e["gated"] and "cortex-a72" in e["isa"] for e in emulated)
    else:
        assert all(e["status"] == "not run" and e["note"] for e in emulated)
    jetson = json.loads((dist / "export" / "jetson" / "manifest.json").read_text())
    (board,) = [e for e in jetson["parity"]["execution"] if e["where"] == "board"]
    assert board["status"] == "not run" and "build_engine.sh" in board["note"]


@pytest.mark.slow
def test_script_exit_code_is_the_worst_step_and_reports_still_gathered(tmp_path: Path) -> None:
    env = {**os.environ, "CHECKPOINT": str(tmp_path / "missing.pt"), "OUT": str(tmp_path / "dist"),
           "EMULATE": "none", "BOTTLEFIT": f"{sys.executable} -m bottlefit"}
    cp = subprocess.run(["bash", str(RECIPE / "export_and_verify.sh")], env=env, capture_output=True, text=True,
                        timeout=300)
    assert cp.returncode == 2
    assert "missing.pt" in cp.stderr and "Traceback" not in cp.stderr
    assert (tmp_path / "dist" / "bundles").is_dir() and not list((tmp_path / "dist" / "bundles").iterdir())
