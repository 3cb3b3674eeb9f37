"""``bottlefit jetson build --json``: one JSON object (verdict, engine, route, every golden check), the exit code
following the verdict. The comparison and the document are checked here on the bundle's own golden outputs (as an
engine that reproduced them exactly would give, and negated); the command end to end needs TensorRT and a GPU and
is skipped elsewhere (no runtime is stood in for)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bottlefit.cli import main
from bottlefit.runtimes.tensorrt import UNAVAILABLE

FAST = ["--parity-count", "4", "--calib-count", "16", "--quiet", "--tolerance", "logits.top1_agreement=0"]


@pytest.fixture(scope="module")
def mini_jetson(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mini-jetson")
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "4", "--target", "jetson",
               "--profile", "orin", "--out", str(out), *FAST])
    assert rc == 0
    return out / "jetson"


def _golden_outputs(d: Path) -> dict[str, np.ndarray]:
    golden = json.loads((d / "golden" / "golden.json").read_text())
    return {o["name"]: np.fromfile(d / "golden" / o["file"], "<f4").reshape(o["shape"]) for o in golden["outputs"]}


def test_report_of_the_golden_checks(mini_jetson: Path) -> None:
    from bottlefit.targets.jetson.cli import build_report, compare_golden

    outputs = _golden_outputs(mini_jetson)
    engine = mini_jetson / "engines" / "head.qdq.engine"
    checks = compare_golden(mini_jetson / "golden", outputs, "int8")
    doc = json.loads(json.dumps(build_report(checks, engine, "qdq", "int8", "orin", "10.3.0")))
    assert doc["verdict"] == "PASS" and doc["route"] == "qdq" and doc["profile"] == "orin"
    assert doc["engine"] == str(engine) and doc["tensorrt"] == "10.3.0" and doc["precision"] == "int8"
    assert {c["output"] for c in doc["checks"]} == set(outputs) and all(c["ok"] for c in doc["checks"])
    cos = next(c for c in doc["checks"] if c["metric"] == "cosine")
    assert cos["value"] == pytest.approx(1.0, abs=1e-6) and cos["op"] == ">="
    negated = compare_golden(mini_jetson / "golden", {k: -v for k, v in outputs.items()}, "int8")
    doc = build_report(negated, engine, "qdq", "int8", "orin", "10.3.0")
    assert doc["verdict"] == "FAIL"
    assert any(c["metric"] == "cosine" and not c["ok"] and c["value"] == pytest.approx(-1.0, abs=1e-6)
               for c in doc["checks"])


def test_jetson_build_json_end_to_end(mini_jetson: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip(f"tensorrt is not importable here. {UNAVAILABLE}")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    d = tmp_path / "jetson"
    shutil.copytree(mini_jetson, d)
    capsys.readouterr()
    rc = main(["jetson", "build", str(d), "--route", "qdq", "--json"])
    out = capsys.readouterr()
    doc = json.loads(out.out)  # stdout is exactly one JSON object; the progress line went to stderr
    assert rc == (0 if doc["verdict"] == "PASS" else 1) and doc["route"] == "qdq"
    assert Path(doc["engine"]).is_file() and doc["checks"] and out.err.startswith("building ")
