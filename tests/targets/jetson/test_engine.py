"""Engine build and TensorRT runner. The real builds need TensorRT and a CUDA GPU (a Jetson, or an NVIDIA
TensorRT container) and skip elsewhere; what runs everywhere is the refusal path, the request checks, the config
plan; the build itself runs only where TensorRT and a GPU exist (no stand-in runtime)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bottlefit.calibration.trt_cache import write_cache
from bottlefit.errors import UserError
from bottlefit.runtimes import RuntimeUnavailable, get_runner
from bottlefit.runtimes.tensorrt import UNAVAILABLE, TensorRTRunner
from bottlefit.targets.jetson.engine import (
    ConfigPlan,
    build_engine,
    load_calibration_cache,
    local_trt_code,
    plan_config,
    warn_if_not_the_board,
)
from bottlefit.targets.jetson.profiles import Profile, get_profile, trt_version_code

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt_only = pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the refusal path cannot be exercised")


def conv_model(path: Path, qdq: bool = False) -> Path:
    """x[1,3,16,16] -> Conv(8, 3x3) -> Relu -> y; with ``qdq`` the input and weight go through Q/DQ."""
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.3, size=(8, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    nodes = []
    x, w_name = "x", "w"
    if qdq:
        w_scale = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
            numpy_helper.from_array(np.array(4.0 / 127, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="xq"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="xdq"),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="wdq", axis=0),
        ]
        x, w_name = "x_dq", "w_dq"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes += [
        helper.make_node("Conv", [x, w_name, "b"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="/relu/Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------------------ runs everywhere


@no_trt_only
def test_build_engine_without_tensorrt_says_where_to_build(tmp_path: Path) -> None:
    onnx_path = conv_model(tmp_path / "head.onnx")
    with pytest.raises(RuntimeUnavailable) as err:
        build_engine(onnx_path, tmp_path / "head.engine", get_profile("orin"), "fp16")
    assert str(err.value) == UNAVAILABLE
    assert "build_engine.sh" in UNAVAILABLE and "NVIDIA TensorRT container" in UNAVAILABLE
    assert not (tmp_path / "head.engine").exists()


@no_trt_only
def test_runner_without_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="TensorRT is not installed here"):
        TensorRTRunner(tmp_path / "head.engine")
    with pytest.raises(RuntimeUnavailable):
        get_runner("tensorrt", tmp_path / "head.engine")
    assert TensorRTRunner.name == "tensorrt"


def test_requests_are_checked_before_tensorrt_is_needed(tmp_path: Path) -> None:
    onnx_path = conv_model(tmp_path / "head.onnx")
    with pytest.raises(UserError, match="int8 needs Q/DQ nodes"):
        build_engine(onnx_path, tmp_path / "e", get_profile("orin"), "int8")
    with pytest.raises(UserError, match="no int8 kernels"):
        build_engine(conv_model(tmp_path / "q.onnx", qdq=True), tmp_path / "e", get_profile("nano"), "int8")
    with pytest.raises(UserError, match="unknown precision"):
        build_engine(onnx_path, tmp_path / "e", get_profile("orin"), "int4")


# ------------------------------------------- the build plan, without TensorRT (pure functions)


def test_config_plans_per_precision(tmp_path: Path) -> None:
    orin, nx = get_profile("orin"), get_profile("xavier-nx")
    cache = tmp_path / "c.cache"
    assert plan_config(orin, "fp16", False, None, 512) == ConfigPlan(512 << 20, set_flags=("FP16",))
    assert plan_config(orin, "int8", True, cache, 1) == ConfigPlan(1 << 20, set_flags=("INT8",))  # Q/DQ wins
    assert plan_config(orin, "int8", False, str(cache), 1) == ConfigPlan(1 << 20, ("INT8",), calib_cache=cache)
    assert plan_config(orin, "fp32", False, None, 1) == ConfigPlan(1 << 20, clear_flags=("TF32",))  # Ampere
    assert plan_config(nx, "fp32", False, cache, 1) == ConfigPlan(1 << 20)


def test_board_warning() -> None:
    assert local_trt_code("8.5.2.2") == 8502
    with pytest.warns(UserWarning, match="TensorRT 8.6.1 for xavier-nx"):
        warn_if_not_the_board("8.6.1", get_profile("xavier-nx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_not_the_board("8.5.2.2", get_profile("xavier-nx"))  # another patch release is the same board


def test_calibration_cache_header_must_match_this_tensorrt(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "head.calib.cache", 8502, {"x": 4.0 / 127})
    assert load_calibration_cache(cache, 8502) == cache.read_bytes()
    with pytest.raises(UserError, match="cache header is for TensorRT 8502, this TensorRT is 8601"):
        load_calibration_cache(cache, 8601)


# ----------------------------------------------------------------- needs TensorRT and a CUDA GPU


@pytest.fixture
def trt() -> Any:
    if not HAVE_TRT:
        pytest.skip(f"tensorrt is not importable here. {UNAVAILABLE}")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    import tensorrt

    return tensorrt


def _local_profile(trt: Any) -> Profile:
    # Any row whose TensorRT major matches: the engine is built for the local GPU either way.
    return get_profile("orin") if int(trt.__version__.split(".")[0]) >= 10 else get_profile("xavier-nx")


def _reference(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _input() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(1, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2)])
def test_float_engine_matches_onnxruntime(trt: Any, tmp_path: Path, precision: str, atol: float) -> None:
    onnx_path = conv_model(tmp_path / "head.onnx")
    engine = build_engine(onnx_path, tmp_path / f"head.{precision}.engine", _local_profile(trt), precision)
    runner = TensorRTRunner(engine)
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    x = _input()
    y = runner.infer({"x": x})["y"]
    np.testing.assert_allclose(y.astype(np.float32), _reference(onnx_path, x), atol=atol, rtol=atol)


def test_qdq_engine_matches_onnxruntime(trt: Any, tmp_path: Path) -> None:
    onnx_path = conv_model(tmp_path / "head.qdq.onnx", qdq=True)
    engine = build_engine(onnx_path, tmp_path / "head.qdq.engine", _local_profile(trt), "int8")
    x = _input()
    y = TensorRTRunner(engine).infer({"x": x})["y"]
    ref = _reference(onnx_path, x)
    # int8 kernels legitimately differ from ONNX Runtime by an LSB of the (unquantized) conv output.
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()


def test_cache_route_builds_from_written_cache(trt: Any, tmp_path: Path) -> None:
    onnx_path = conv_model(tmp_path / "head.onnx")
    code = trt_version_code(".".join(trt.__version__.split(".")[:3]))
    cache = write_cache(tmp_path / "head.calib.cache", code, {"x": 4.0 / 127, "c": 8.0 / 127, "y": 8.0 / 127})
    engine = build_engine(onnx_path, tmp_path / "head.cache.engine", _local_profile(trt), "int8", calib_cache=cache)
    x = _input()
    y = TensorRTRunner(engine).infer({"x": x})["y"]
    ref = _reference(onnx_path, x)
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()


def test_stale_cache_header_is_refused(trt: Any, tmp_path: Path) -> None:
    onnx_path = conv_model(tmp_path / "head.onnx")
    cache = write_cache(tmp_path / "head.calib.cache", 8000, {"x": 4.0 / 127})
    with pytest.raises(UserError, match="cache header is for TensorRT 8000"):
        build_engine(onnx_path, tmp_path / "e", _local_profile(trt), "int8", calib_cache=cache)
