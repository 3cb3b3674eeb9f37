"""One recipe, every converter: the TFLite head takes the Q/DQ heads' searched ranges, tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bottlefit.exporter.head_rewrite import RewrittenHead
from bottlefit.exporter.onnx import export_onnx
from bottlefit.exporter.qdq import match_range, prepare_fp32, quantize_head, search_table

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")


def tiny_head() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 2, 2, 0)).eval()


def calib(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).standard_t(4, size=(n, 3, 32, 32)).astype(np.float32)


def test_match_range_finds_a_tensor_by_value_in_either_layout(tmp_path) -> None:
    x = calib(1)
    head = tiny_head()
    with torch.no_grad():
        mid = torch.relu(head[0](torch.from_numpy(x))).numpy()
    model, _ = prepare_fp32(export_onnx(head, torch.from_numpy(x), tmp_path / "h.onnx", 13, "input", "out").path)
    table = search_table(model, calib(), symmetric=False)
    e = match_range(table, mid)
    assert e is not None and e.name.endswith("Relu_output_0")
    assert match_range(table, np.ascontiguousarray(mid.transpose(0, 2, 3, 1))) is e  # NHWC, as PT2E may see it
    assert match_range(table, mid * 1.01 + 0.5) is None  # another tensor: its own range, not a wrong one


def test_tflite_takes_the_asymmetric_qdq_heads_parameters(tmp_path) -> None:
    from bottlefit.runtimes.litert import interpreter_module
    from bottlefit.targets.rpi.tflite import export_tflite

    head, images = tiny_head(), calib()
    fp32 = export_onnx(head, torch.from_numpy(images[:1]), tmp_path / "h.onnx", 13, "input", "out")
    q = quantize_head(fp32.path, tmp_path / "h.q.onnx", images, None, "search", symmetric=False,
                      activation_dtype="int8")
    rw = RewrittenHead(head, {"0": ["e.0"], "1": ["e.1"], "2": ["e.2"]})
    info = export_tflite(rw, images, tmp_path / "h.tflite", int8=True, layout="NCHW", observer="search",
                         log=lambda _m: None)
    assert info.ranges["own_range"] == 0 and info.ranges["observers"] >= 3
    mod = interpreter_module()
    it = mod.Interpreter(model_path=str(tmp_path / "h.tflite"))
    (si, zi), (so, zo) = it.get_input_details()[0]["quantization"], it.get_output_details()[0]["quantization"]
    # the same grid as the ONNX Runtime head, to the float32 bit
    assert (np.float32(si), zi) == (np.float32(q.activation_scales["input"]), q.activation_zero_points["input"])
    assert (np.float32(so), zo) == (np.float32(q.activation_scales["out"]), q.activation_zero_points["out"])
    assert q.quantization_record()["range_search"]["input"]["judged_by"] == "layer"

