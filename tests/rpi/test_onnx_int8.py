from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from bottlefit.errors import UserError
from bottlefit.targets.rpi.onnx_int8 import (
    DEFAULT_VARIANT,
    INPUT_NAME,
    export_onnx_int8,
    fp32_onnx_bytes,
    quantize_bytes,
)
from tests.rpi import CALIB_COUNT, HELDOUT_COUNT, cosine, head, images, rewritten, scratch, sqnr_db

# measured on the random-BN ResNet-152 ver2 head: cosine 0.9999, SQNR ~37 dB
COSINE_MIN = 0.998


@functools.cache
def _export() -> tuple[object, bytes]:
    path = scratch("onnx") / "head.int8.onnx"
    info = export_onnx_int8(rewritten("r152v2").module, images("calibration", CALIB_COUNT), path)
    return info, path.read_bytes()


def test_int8_onnx_is_qdq_with_float_io_and_close_to_pytorch() -> None:
    info, data = _export()
    assert info.variant == DEFAULT_VARIANT
    assert [s.dtype for s in info.inputs] == ["float32"] and [s.dtype for s in info.outputs] == ["float32"]
    assert info.outputs[0].shape == (1, 12, 29, 29)
    ops = info.ops
    assert ops.count("Conv") == 3 and "BatchNormalization" not in ops
    assert ops[-1] == "DequantizeLinear" and "QuantizeLinear" in ops
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = images("heldout", HELDOUT_COUNT)
    got = np.concatenate([sess.run(None, {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        ref = head("r152v2")[0](torch.from_numpy(x).clone()).numpy()
    print(f"ORT int8: cosine {cosine(ref, got):.5f} sqnr {sqnr_db(ref, got):.1f} dB")
    assert cosine(ref, got) > COSINE_MIN


def test_ranges_are_ours_not_ort_calibrators() -> None:
    info, data = _export()
    calib = images("calibration", CALIB_COUNT)
    lo, hi = info.ranges[INPUT_NAME]
    assert (lo, hi) == (float(calib.min()), float(calib.max()))
    # the input's QuantizeLinear carries exactly the int8 affine of our min/max range
    model = onnx.load_from_string(data)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == INPUT_NAME)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
    assert scale == pytest.approx((hi - lo) / 255.0, rel=1e-6)
    assert zp == pytest.approx(-128 - lo / scale, abs=1)


def test_unknown_variant_is_a_user_error() -> None:
    x = torch.from_numpy(images("calibration", CALIB_COUNT)[:1])
    with pytest.raises(UserError, match="variant"):
        quantize_bytes(fp32_onnx_bytes(rewritten("r152v1").module, x), {}, "int3")
