"""The rpi target's head.int8.onnx: the shared Q/DQ writer (bottlefit.exporter.qdq) with asymmetric int8
activations, per-channel int8 weights, float in and out."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bottlefit.calibration.observers import MinMaxObserver
from bottlefit.errors import UserError
from bottlefit.exporter.qdq import QdqResult
from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner
from bottlefit.targets.rpi import ONNX_INPUT, ONNX_OUTPUT, onnx_specs, write_int8_onnx
from tests.targets.rpi import CALIB_COUNT, HELDOUT_COUNT, cosine, head, images, scratch, sqnr_db

# measured on the random-BN ResNet-152 ver2 head: cosine 0.9999, SQNR ~37 dB
COSINE_MIN = 0.998
SQNR_MIN_DB = 30.0


@functools.cache
def _export(run: int = 0) -> tuple[QdqResult, bytes]:
    path = scratch(f"onnx-{run}") / "head.int8.onnx"
    res = write_int8_onnx(head("r152v2")[0], images("calibration", CALIB_COUNT), path, "minmax")
    return res, path.read_bytes()


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.slow
def test_int8_onnx_is_qdq_with_float_io_and_close_to_pytorch() -> None:
    res, data = _export()
    inputs, outputs, ops = onnx_specs(res.path)
    assert [s.dtype for s in inputs] == ["float32"] and [s.dtype for s in outputs] == ["float32"]
    assert inputs[0].shape == (1, 3, 224, 224) and outputs[0].shape == (1, 12, 29, 29)
    assert "BatchNormalization" not in ops and res.rewritten_nodes  # the BN after the max-pool is a conv now
    assert ops[-1] == "DequantizeLinear"  # float out
    model = onnx.load_from_string(data)
    assert [n.op_type for n in model.graph.node if ONNX_INPUT in n.input] == ["QuantizeLinear"]  # float in
    r = OnnxRuntimeRunner(res.path, reference=True)  # ONNX spec semantics: host-independent
    x = images("heldout", HELDOUT_COUNT)
    got = np.concatenate([r.infer({ONNX_INPUT: x[i : i + 1]})[ONNX_OUTPUT] for i in range(len(x))])
    with torch.no_grad():
        ref = head("r152v2")[0](torch.from_numpy(x).clone()).numpy()
    print(f"ORT int8 (qdq s8 asym): cosine {cosine(ref, got):.5f} sqnr {sqnr_db(ref, got):.1f} dB")
    assert cosine(ref, got) > COSINE_MIN
    assert sqnr_db(ref, got) > SQNR_MIN_DB


@pytest.mark.slow
def test_activations_are_asymmetric_int8_and_weights_int8_per_channel() -> None:
    res, data = _export()
    rec = res.quantization_record()
    assert (rec["activations"], rec["symmetric"], rec["per_channel"], rec["weights"]) == ("int8", False, True, "int8")
    model = onnx.load_from_string(data)
    inits = _inits(model)
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 for z in zps)
    assert any(int(z) != 0 for z in zps)  # asymmetric: zero points are not pinned to 0
    assert set(res.activation_zero_points.values()) - {0}
    # every conv weight: int8, one scale per output channel
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    producer = {o: n for n in model.graph.node for o in n.output}
    for conv in convs:
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, s = inits[dq.input[0]], inits[dq.input[1]]
        assert w.dtype == np.int8 and s.shape == (w.shape[0],)


@pytest.mark.slow
def test_ranges_are_ours_not_ort_calibrators() -> None:
    res, data = _export()
    calib = images("calibration", CALIB_COUNT)
    obs = MinMaxObserver()
    obs.update(calib)
    want_scale, want_zp = obs.asymmetric("int8")
    # the input's QuantizeLinear carries exactly the int8 affine of our min/max range
    model = onnx.load_from_string(data)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == ONNX_INPUT)
    inits = _inits(model)
    scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
    assert (scale, zp) == (want_scale, want_zp) == (res.activation_scales[ONNX_INPUT],
                                                    res.activation_zero_points[ONNX_INPUT])
    lo, hi = min(float(calib.min()), 0.0), max(float(calib.max()), 0.0)
    assert scale == pytest.approx((hi - lo) / 255.0, rel=1e-6)
    assert zp == pytest.approx(-128 - lo / scale, abs=0.5)
    assert zp != 0


@pytest.mark.slow
def test_same_inputs_give_the_same_file() -> None:
    (_, a), (_, b) = _export(0), _export(1)
    assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"symmetric": False, "activation_dtype": "int4"},
                                {"symmetric": True, "activation_dtype": "uint8"}])
def test_bad_activation_dtype_is_a_user_error(kw: dict[str, object], tmp_path: Path) -> None:
    from bottlefit.exporter.qdq import quantize_head

    res, _ = _export()
    with pytest.raises(UserError, match="activation_dtype"):
        quantize_head(res.path, tmp_path / "x.onnx", images("calibration", CALIB_COUNT), **kw)  # type: ignore[arg-type]
