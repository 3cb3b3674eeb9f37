"""``bottlefit jetson build --json``: one JSON object on stdout (verdict, engine, route, every golden check), the
exit code following the verdict. TensorRT is stood in for by an engine that returns the bundle's golden outputs
(PASS) or those outputs negated (FAIL), so the command's own path runs on a host without TensorRT."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bottlefit.cli import main

FAST = ["--parity-count", "4", "--calib-count", "16", "--quiet", "--tolerance", "logits.top1_agreement=0"]


@pytest.fixture(scope="module")
def mini_jetson(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mini-jetson")
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "4", "--target", "jetson",
               "--profile", "orin", "--out", str(out), *FAST])
    assert rc == 0
    return out / "jetson"


def test_jetson_build_json(mini_jetson: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from bottlefit.runtimes import tensorrt as trt_runtime
    from bottlefit.targets.jetson import engine as engine_mod

    d = tmp_path / "jetson"
    shutil.copytree(mini_jetson, d)
    golden = json.loads((d / "golden" / "golden.json").read_text())
    outputs = {o["name"]: np.fromfile(d / "golden" / o["file"], "<f4").reshape(o["shape"])
               for o in golden["outputs"]}
    sign = {"v": 1.0}
    built: list[Path] = []

    class FakeRunner:
        def __init__(self, path: Path) -> None:
            assert Path(path) in built

        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v * np.float32(sign["v"]) for k, v in outputs.items()}

    def fake_build(onnx_path: Any, engine_path: Any, *a: Any, **k: Any) -> None:
        built.append(Path(engine_path))

    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_runtime, "TensorRTRunner", FakeRunner)
    monkeypatch.setattr(engine_mod, "build_engine", fake_build)

    capsys.readouterr()
    assert main(["jetson", "build", str(d), "--route", "qdq", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)  # stdout is exactly one JSON object; the progress line went to stderr
    assert doc["verdict"] == "PASS" and doc["route"] == "qdq" and doc["profile"] == "orin"
    assert doc["engine"] == str(d / "engines" / "head.qdq.engine") and doc["tensorrt"] == "10.3.0"
    assert {c["output"] for c in doc["checks"]} == set(outputs) and all(c["ok"] for c in doc["checks"])
    assert {c["metric"] for c in doc["checks"]} >= {"cosine"}
    assert out.err.startswith("building ")

    sign["v"] = -1.0  # negated outputs: cosine -1
    assert main(["jetson", "build", str(d), "--route", "qdq", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "FAIL" and any(c["metric"] == "cosine" and not c["ok"] for c in doc["checks"])
