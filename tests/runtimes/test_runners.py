"""The one runner contract, on real runtimes and tiny real models built here: z = x + y over float32 [1,3,4,4].

Every runtime installed here runs the same checks: its names, exact numbers, the same one-line UserError for the
same bad input, a missing file, the timing record. TensorRT needs a CUDA GPU and skips elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bottlefit.errors import EXIT_ENVIRONMENT, EnvironmentProblem, UserError
from bottlefit.runtimes import IOSpec, Runner, RuntimeUnavailable, get_runner
from bottlefit.runtimes import base as runtimes_base

SHAPE = (1, 3, 4, 4)
RUNTIMES = ("onnxruntime", "litert", "tensorrt", "ncnn")


@dataclass(frozen=True)
class Model:
    runtime: str
    path: Path
    inputs: list[str]  # as the model file itself names them
    outputs: list[str]


def _add_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"], name="add")],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(SHAPE)) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, list(SHAPE))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _onnx_model(d: Path) -> Model:
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed here")
    path = _add_onnx(d / "add.onnx")
    graph = onnx.load(str(path)).graph
    return Model("onnxruntime", path, [i.name for i in graph.input], [o.name for o in graph.output])


def _tflite_model(d: Path) -> Model:
    litert_torch = pytest.importorskip("litert_torch", reason="litert-torch is not installed here (bottlefit[rpi])")
    interpreter = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed here")
    import torch

    class Add(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    example = (torch.zeros(SHAPE), torch.zeros(SHAPE))
    path = d / "add.tflite"
    path.write_bytes(bytes(litert_torch.convert(Add().eval(), example).model_content()))
    it = interpreter.Interpreter(model_path=str(path))  # the file's own names, read without the runner
    return Model("litert", path, [str(i["name"]) for i in it.get_input_details()],
                 [str(o["name"]) for o in it.get_output_details()])


def _engine_model(d: Path) -> Model:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it needs an NVIDIA GPU host: a "
                                                 "Jetson or an NVIDIA TensorRT container)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    from bottlefit.targets.jetson.engine import build_engine
    from bottlefit.targets.jetson.profiles import get_profile

    # any profile whose TensorRT major matches: the engine is built for the local GPU either way
    profile = get_profile("orin") if int(trt.__version__.split(".")[0]) >= 10 else get_profile("xavier-nx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = build_engine(_add_onnx(d / "add.onnx"), d / "add.engine", profile, "fp32")
    return Model("tensorrt", path, ["x", "y"], ["z"])


def _ncnn_model(d: Path) -> Model:
    pytest.importorskip("ncnn", reason="ncnn is not installed here (pip install ncnn; bottlefit[rpi] pins it)")
    return Model("ncnn", _write_ncnn_add(d), ["x", "y"], ["z"])


def _write_ncnn_add(d: Path) -> Path:
    """z = x + y as an ncnn model: two Input layers and a BinaryOp (op 0: add); an empty .bin (no weights)."""
    path = d / "add.param"
    path.write_text("7767517\n3 3\nInput x 0 1 x 0=4 1=4 2=3\nInput y 0 1 y 0=4 1=4 2=3\n"
                    "BinaryOp add 2 1 x y z 0=0\n")
    path.with_suffix(".bin").write_bytes(b"")
    return path


_BUILDERS: dict[str, Callable[[Path], Model]] = {
    "onnxruntime": _onnx_model,
    "litert": _tflite_model,
    "tensorrt": _engine_model,
    "ncnn": _ncnn_model,
}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Model]:
    """runtime -> its model, built once per module (the .tflite conversion and an engine build cost seconds);
    skips where the runtime is not installed here."""
    built: dict[str, Model | BaseException] = {}

    def get(runtime: str) -> Model:
        if runtime not in built:
            try:
                built[runtime] = _BUILDERS[runtime](tmp_path_factory.mktemp(runtime))
            except pytest.skip.Exception as e:
                built[runtime] = e
        got = built[runtime]
        if isinstance(got, BaseException):
            raise got
        return got

    return get


@pytest.fixture(params=RUNTIMES)
def model(request: pytest.FixtureRequest, build: Callable[[str], Model]) -> Model:
    return build(request.param)


@pytest.fixture(scope="module")
def models(build: Callable[[str], Model]) -> dict[str, Model]:
    """The models of every runtime installed here (for cross-runtime comparisons)."""
    out = {}
    for rt in RUNTIMES:
        try:
            out[rt] = build(rt)
        except pytest.skip.Exception:
            continue
    return out


def _xy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=SHAPE).astype(np.float32), rng.normal(size=SHAPE).astype(np.float32)


def _bad_inputs(names: list[str]) -> dict[str, tuple[dict[str, np.ndarray], str]]:
    """The same bad inputs for any runtime: case -> (inputs, the input name the error must name)."""
    x, y = _xy()
    a, b = names
    return {
        "missing": ({a: x}, b),
        "unknown": ({a: x, b: y, "bogus": y}, "bogus"),
        "dtype": ({a: x.astype(np.float64), b: y}, a),
        "int_dtype": ({a: x, b: y.astype(np.int8)}, b),
        "shape": ({a: x, b: np.zeros((1, 3, 4, 5), np.float32)}, b),
        "rank": ({a: x[0], b: y}, a),
        "nothing": ({}, a),
    }


# ------------------------------------------------------------------------------------------ per runtime


def test_names_are_lists_of_str_matching_the_model(model: Model) -> None:
    r = get_runner(model.runtime, model.path)
    assert isinstance(r, Runner) and r.name == model.runtime and r.path == model.path
    for names in (r.input_names, r.output_names):
        assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert r.input_names == model.inputs and r.output_names == model.outputs
    assert not hasattr(r, "inputs") and not hasattr(r, "outputs")  # one spelling on every runner


def test_specs_describe_the_model(model: Model) -> None:
    r = get_runner(model.runtime, model.path)
    for specs, names in ((r.input_specs(), model.inputs), (r.output_specs(), model.outputs)):
        assert list(specs) == names
        for name, spec in specs.items():
            assert spec == IOSpec(name, SHAPE, np.dtype(np.float32))
    assert r.input_specs()[model.inputs[0]].describe() == "float32[1,3,4,4]"


def test_infer_is_exact_and_timed(model: Model) -> None:
    r = get_runner(model.runtime, model.path)
    assert r.last_inference_ms is None
    x, y = _xy()
    out = r.infer({model.inputs[0]: x, model.inputs[1]: y})
    assert list(out) == model.outputs
    z = out[model.outputs[0]]
    assert z.dtype == np.float32 and z.shape == SHAPE
    np.testing.assert_array_equal(z, x + y)  # one float add per element: exact on every runtime
    assert isinstance(r.last_inference_ms, float) and r.last_inference_ms > 0
    # a non-contiguous view of the right dtype and shape is accepted (the runner makes it contiguous)
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not xt.flags.c_contiguous
    np.testing.assert_array_equal(r.infer({model.inputs[0]: xt, model.inputs[1]: y})[model.outputs[0]], x + y)


@pytest.mark.parametrize("case", ["missing", "unknown", "dtype", "int_dtype", "shape", "rank", "nothing"])
def test_bad_input_is_one_line_user_error_naming_file_and_input(model: Model, case: str) -> None:
    r = get_runner(model.runtime, model.path)
    inputs, named = _bad_inputs(model.inputs)[case]
    with pytest.raises(UserError) as err:
        r.infer(inputs)
    msg = str(err.value)
    assert "\n" not in msg and err.value.exit_code == 2
    assert str(model.path) in msg and repr(named) in msg
    assert r.last_inference_ms is None  # refused before the runtime ran


def test_missing_file_is_user_error_naming_it(model: Model, tmp_path: Path) -> None:
    missing = tmp_path / f"gone{model.path.suffix}"
    with pytest.raises(UserError) as err:
        get_runner(model.runtime, missing)
    assert str(missing) in str(err.value) and "not found" in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(err.value, RuntimeUnavailable)
    with pytest.raises(UserError, match="a directory"):
        get_runner(model.runtime, tmp_path)


# ------------------------------------------------------------------------------------------ across runtimes


def test_every_runtime_raises_the_same_error_for_the_same_bad_input(models: dict[str, Model]) -> None:
    if len(models) < 2:
        pytest.skip(f"only {sorted(models)} installed here: nothing to compare")
    by_runtime: dict[str, dict[str, str]] = {}
    for rt, m in models.items():
        r = get_runner(rt, m.path)
        msgs = {}
        for case, (inputs, _) in _bad_inputs(m.inputs).items():
            with pytest.raises(UserError) as err:
                r.infer(inputs)
            # the file and the runtime's own tensor names aside, the words are the same
            msg = str(err.value).replace(str(m.path), "FILE")
            for i, name in enumerate(m.inputs):
                msg = msg.replace(repr(name), f"'INPUT{i}'")
            msgs[case] = msg
        by_runtime[rt] = msgs
    first, *rest = by_runtime.values()
    for other in rest:
        assert other == first
    assert first["dtype"] == ("FILE: input 'INPUT0' has the wrong dtype: expected float32[1,3,4,4], "
                              "given float64[1,3,4,4]")
    assert first["shape"] == ("FILE: input 'INPUT1' has the wrong shape: expected float32[1,3,4,4], "
                              "given float32[1,3,4,5]")


def test_ncnn_reference_needs_no_ncnn_and_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """reference=True evaluates the files itself: it runs where the ncnn wheel is absent (here: hidden)."""
    import sys

    path = _write_ncnn_add(tmp_path)
    monkeypatch.setitem(sys.modules, "ncnn", None)
    with pytest.raises(RuntimeUnavailable, match="pip install ncnn"):
        get_runner("ncnn", path)
    x, y = _xy(2)
    np.testing.assert_array_equal(get_runner("ncnn", path, reference=True).infer({"x": x, "y": y})["z"], x + y)


# ------------------------------------------------------------------------------------------ LiteRT aliases


@pytest.fixture(scope="module")
def tflite(models: dict[str, Model]) -> Model:
    if "litert" not in models:
        pytest.skip("LiteRT (ai-edge-litert and litert-torch) is not installed here")
    return models["litert"]


def test_litert_signature_names_are_aliases(tflite: Model) -> None:
    r = get_runner("litert", tflite.path)
    x, y = _xy(1)
    z = r.infer({"args_0": x, tflite.inputs[1]: y})[tflite.outputs[0]]
    np.testing.assert_array_equal(z, x + y)
    # validation sees the canonical name, and says which alias was given
    with pytest.raises(UserError) as err:
        r.infer({"args_0": x.astype(np.float16), "args_1": y})
    assert f"{tflite.inputs[0]!r} (given as 'args_0')" in str(err.value) and "float16" in str(err.value)
    with pytest.raises(UserError, match="given twice"):
        r.infer({"args_0": x, tflite.inputs[0]: x, "args_1": y})


def test_litert_options_are_kept(tflite: Model) -> None:
    x, y = _xy(2)
    for opts in ({"num_threads": 2}, {"xnnpack": False}, {"reference": True}):
        r = get_runner("litert", tflite.path, **opts)
        np.testing.assert_array_equal(r.infer({"args_0": x, "args_1": y})[tflite.outputs[0]], x + y)
    assert get_runner("litert", tflite.path, reference=True).xnnpack is False


def test_onnxruntime_options_are_kept(models: dict[str, Model]) -> None:
    if "onnxruntime" not in models:
        pytest.skip("ONNX Runtime is not installed here")
    m = models["onnxruntime"]
    x, y = _xy(3)
    for opts in ({"num_threads": 1}, {"reference": True}):
        np.testing.assert_array_equal(get_runner("onnxruntime", m.path, **opts).infer({"x": x, "y": y})["z"], x + y)


# ------------------------------------------------------------------------------------------ the registry


def test_runtime_unavailable_is_the_machines_problem() -> None:
    assert issubclass(RuntimeUnavailable, EnvironmentProblem) and not issubclass(RuntimeUnavailable, UserError)
    assert RuntimeUnavailable("x").exit_code == EXIT_ENVIRONMENT  # what that code means: tests/test_cli.py
    assert RuntimeUnavailable is runtimes_base.RuntimeUnavailable


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_runtime_is_reported_before_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="TensorRT is not installed here"):
        get_runner("tensorrt", tmp_path / "gone.engine")


def test_unknown_runtime_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        get_runner("nope", tmp_path / "m.onnx")
    assert str(err.value) == "unknown runtime 'nope'; known: litert, ncnn, onnxruntime, tensorrt"
    with pytest.raises(UserError, match="unknown runtime 'torch'"):
        get_runner("torch", tmp_path / "m.pt")


def test_runner_is_an_abc_with_one_public_infer() -> None:
    with pytest.raises(TypeError, match="abstract"):
        Runner(Path("x"))  # type: ignore[abstract]
    from bottlefit.runtimes.litert import LiteRTRunner
    from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner
    from bottlefit.runtimes.tensorrt import TensorRTRunner

    for cls in (OnnxRuntimeRunner, LiteRTRunner, TensorRTRunner):
        assert issubclass(cls, Runner) and cls.infer is Runner.infer
        assert "infer_impl" in vars(cls) and "infer" not in vars(cls)
