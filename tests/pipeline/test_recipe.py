"""The int8 recipe's switches end to end through `bottlefit export`: the stand-alone BN folded through the
max-pool (default) or kept (``--keep-pool-bn``), GPTQ weight rounding and bias correction for every int8 head
while fp32 artifacts keep the model's own weights, and what the manifest records for `bottlefit verify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bottlefit.cli import main
from bottlefit.exporter.manifest import read_manifest

BASE = ["export", "--untrained", "--arch", "mini_resnet", "--target", "onnx", "--int8", "--calib-count", "16",
        "--parity-count", "8", "--quiet"]


def _export(out: Path, *extra: str) -> Path:
    assert main([*BASE, "--out", str(out), *extra]) == 0
    return out / "onnx"


def _check(d: Path, artifact: str, metric: str) -> float:
    report = json.loads((d / "report.json").read_text())
    return next(c["value"] for c in report["checks"] if c["artifact"] == artifact and c["metric"] == metric)


def _convs(path: Path) -> dict[str, np.ndarray]:
    """Conv weight initializers (fp32 graph) or their int8 Q/DQ initializers, by name."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n: a for n, a in inits.items() if a.ndim == 4}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    return {"nearest": _export(root / "nearest"),
            "gptq": _export(root / "gptq", "--weight-rounding", "gptq", "--bias-correction"),
            "keep": _export(root / "keep", "--keep-pool-bn")}


def test_fold_is_the_default_and_recorded(exports: dict[str, Path]) -> None:
    folded, kept = read_manifest(exports["nearest"]), read_manifest(exports["keep"])
    assert folded["head_folds"] == ["folded bottleneck.encoder.1, bottleneck.encoder.4, bottleneck.encoder.5 into "
                                    "bottleneck.encoder.0 (ahead of the max-pool bottleneck.encoder.3: exact, the "
                                    "BN's scales > 0 and shifts <= 0)"]
    assert "head_folds" not in kept
    n_conv = {k: sum(n.op_type == "Conv" for n in onnx.load(str(exports[k] / "head.int8.onnx")).graph.node)
              for k in ("nearest", "keep")}
    assert n_conv == {"nearest": 2, "keep": 3}  # the kept BN runs as a depthwise conv of its own
    # exact: the fp32 head of either graph matches PyTorch to float rounding
    for k in ("nearest", "keep"):
        assert _check(exports[k], "head.onnx", "bottleneck.max_abs_error") < 1e-5


def test_gptq_rounds_int8_heads_only_and_verify_reproduces(exports: dict[str, Path]) -> None:
    g, n = exports["gptq"], exports["nearest"]
    rec = read_manifest(g)["weight_rounding"]
    assert rec["method"] == "gptq" and rec["bias_correction"] is True and rec["images"] == 16
    for layer in ("encoder.0", "encoder.6"):
        assert rec["layers"][layer]["sqnr_db"] > rec["layers"][layer]["sqnr_db_nearest"]
    assert "weight_rounding" not in read_manifest(n)
    # the fp32 head keeps the model's weights, byte for byte; the int8 head's integers differ
    fp_g, fp_n = _convs(g / "head.onnx"), _convs(n / "head.onnx")
    assert fp_g.keys() == fp_n.keys() and all(np.array_equal(fp_g[k], fp_n[k]) for k in fp_g)
    i8_g, i8_n = _convs(g / "head.int8.onnx"), _convs(n / "head.int8.onnx")
    ints = [k for k in i8_g if i8_g[k].dtype == np.int8]
    assert len(ints) == 2 and any(not np.array_equal(i8_g[k], i8_n[k]) for k in ints)
    # fidelity under reference semantics: rounding and bias correction do not lose against nearest
    assert _check(g, "head.int8.onnx", "bottleneck.sqnr_db") >= _check(n, "head.int8.onnx", "bottleneck.sqnr_db") - 0.1
    assert main(["verify", str(g)]) == 0  # the folds are re-applied from the manifest; the reference stays fp32


def test_unknown_rounding_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main([*BASE, "--out", str(tmp_path), "--weight-rounding", "adaround"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weight-rounding 'adaround': choose one of nearest, gptq" in err
    assert not any(tmp_path.iterdir())
