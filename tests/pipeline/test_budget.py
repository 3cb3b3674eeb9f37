"""The error budget of an int8 Q/DQ head (bottlefit.parity.budget, `bottlefit verify --budget`): one activation
grid kept at a time under reference semantics, and bypassed grids that keep the Relu their clamp stood for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bottlefit.cli import main
from bottlefit.errors import UserError
from bottlefit.parity.budget import activation_grids, bypass, error_budget
from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner


def _qdq_graph(zero_point: int, dtype: int, output_int8: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> y (or x -> Q -> y_int8), scale 0.1."""
    np_dtype = np.uint8 if dtype == TensorProto.UINT8 else np.int8
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(zero_point, np_dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q")]
    if output_int8:
        out = helper.make_tensor_value_info("q", dtype, [1, 1, 2, 3])
    else:
        nodes.append(helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 3])
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 3])], [out],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _run(model: onnx.ModelProto, x: np.ndarray, tmp: Path) -> np.ndarray:
    path = tmp / "m.onnx"
    onnx.save(model, str(path))
    r = OnnxRuntimeRunner(path, reference=True)
    return next(iter(r.infer({"x": x}).values()))


X = np.array([[[[-1.0, -0.04, 0.26], [3.0, 30.0, -30.0]]]], np.float32)


@pytest.mark.parametrize(("zp", "dtype", "expect"), [
    (0, TensorProto.UINT8, np.maximum(X, 0)),      # the grid starts at 0: it stood for a Relu, which stays
    (-128, TensorProto.INT8, np.maximum(X, 0)),
    (128, TensorProto.UINT8, X),                    # a two-sided grid: bypassed to an identity, nothing clipped
    (0, TensorProto.INT8, X),
])
def test_bypass_removes_rounding_and_keeps_the_relu(zp: int, dtype: int, expect: np.ndarray, tmp_path: Path) -> None:
    m = _qdq_graph(zp, dtype)
    [grid] = activation_grids(m)
    assert grid.tensors == ("x",) and grid.starts_at_zero == (expect is not X)
    np.testing.assert_array_equal(_run(bypass(m, set()), X, tmp_path), expect)
    kept = _run(bypass(m, {grid.tensors}), X, tmp_path)  # kept: exactly the Q/DQ's rounding and clipping
    lo, hi = (0 - zp, 255 - zp) if dtype == TensorProto.UINT8 else (-128 - zp, 127 - zp)
    np.testing.assert_allclose(kept, np.clip(np.round(X / 0.1), lo, hi) * 0.1, rtol=0, atol=1e-6)


def test_an_int8_output_gets_its_dequantize_back(tmp_path: Path) -> None:
    m = _qdq_graph(3, TensorProto.INT8, output_int8=True)
    out = _run(bypass(m, {("x",)}), X, tmp_path)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (np.clip(np.round(X / 0.1) + 3, -128, 127) - 3) * 0.1, atol=1e-6)
    np.testing.assert_array_equal(_run(bypass(m, set()), X, tmp_path), X)


def test_a_graph_without_activation_grids_is_refused(tmp_path: Path) -> None:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "fp32.onnx"))
    with pytest.raises(UserError, match=r"fp32\.onnx: no activation QuantizeLinear"):
        error_budget(tmp_path / "fp32.onnx", X, X)


@pytest.fixture(scope="module")
def budget_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("budget")
    assert main(["export", "--untrained", "--arch", "mini_resnet", "--target", "onnx", "--int8", "--calib-count",
                 "16", "--parity-count", "8", "--quiet", "--out", str(out)]) == 0
    assert main(["verify", str(out / "onnx"), "--budget", "--emulate", "none"]) == 0
    return json.loads((out / "onnx" / "report.json").read_text()), out / "onnx"


def test_verify_budget_rows(budget_report: tuple[dict, Path]) -> None:
    report, d = budget_report
    rows = report["budget"]["head.int8.onnx"]
    assert list(report["budget"]) == ["head.int8.onnx"]  # the fp32 head has no grid to budget
    grids = activation_grids(onnx.load(str(d / "head.int8.onnx")))
    assert [r["grids"] for r in rows[:2]] == ["all", "weights"] and len(rows) == 2 + len(grids)
    assert rows[2]["grids"] == "input" and rows[-1]["grids"].endswith("(wire)")
    assert rows[3]["module"] == "bottleneck.encoder.0"  # the stem conv's output grid, named by its module
    fid = next(c["value"] for c in report["checks"]
               if c["artifact"] == "head.int8.onnx" and c["metric"] == "bottleneck.sqnr_db")
    assert rows[0]["sqnr_db"] == pytest.approx(fid, abs=1e-3)  # "all" is the artifact the verdict judged
    for r in rows[1:]:  # one grid (plus the int8 weights) is never worse than all of them together
        assert r["sqnr_db"] >= rows[0]["sqnr_db"] - 0.05, r
        assert r["sqnr_db"] <= rows[1]["sqnr_db"] + 0.05 or r["grids"] == "weights", r
    assert "## Error budget" in (d / "report.md").read_text()
