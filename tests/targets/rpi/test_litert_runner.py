from __future__ import annotations

import numpy as np
import pytest

from bottlefit.errors import UserError
from bottlefit.exporter import wire
from bottlefit.runtimes import get_runner
from bottlefit.runtimes.litert import LiteRTRunner
from tests.targets.rpi import HELDOUT_COUNT, images, int8_tflite


def _encoded(info, n: int = 2) -> list[np.ndarray]:
    x = images("heldout", HELDOUT_COUNT)[:n]
    return [wire.encode(info.inputs[0], x[i : i + 1]) for i in range(n)]


@pytest.mark.slow
def test_registry_loads_it_and_names_match_the_specs() -> None:
    path, info = int8_tflite("r152v2")
    r = get_runner("litert", path)
    assert isinstance(r, LiteRTRunner) and r.name == "litert"
    assert r.input_names == [info.inputs[0].name] and r.output_names == [info.outputs[0].name]


@pytest.mark.slow
def test_signature_alias_and_xnnpack_off_agree() -> None:
    path, info = int8_tflite("r152v2")
    x = _encoded(info, 1)[0]
    y_name = LiteRTRunner(path).infer({info.inputs[0].name: x})[info.outputs[0].name]
    y_alias = LiteRTRunner(path).infer({"args_0": x})[info.outputs[0].name]
    y_ref = LiteRTRunner(path, xnnpack=False).infer({"args_0": x})[info.outputs[0].name]
    np.testing.assert_array_equal(y_name, y_alias)
    assert y_ref.dtype == np.int8
    # XNNPACK and the built-in kernels may round differently by one step
    assert int(np.abs(y_ref.astype(np.int16) - y_name.astype(np.int16)).max()) <= 1


@pytest.mark.slow
def test_wire_round_trip_through_bytes_equals_decode() -> None:
    path, info = int8_tflite("r152v2")
    out = info.outputs[0]
    r = LiteRTRunner(path)
    for x in _encoded(info):
        y = r.infer({info.inputs[0].name: x})[out.name]
        payload = wire.to_bytes(out, y)
        assert len(payload) == int(np.prod(out.shape))  # one byte per element on the wire
        back = wire.decode(out, wire.from_bytes(out, payload))
        np.testing.assert_array_equal(back, wire.decode(out, y))
        by_hand = ((y.astype(np.float32) - out.zero_point) * np.float32(out.scale)).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(back, by_hand)


@pytest.mark.slow
def test_wrong_dtype_and_missing_input_are_refused() -> None:
    path, info = int8_tflite("r152v2")
    r = LiteRTRunner(path)
    with pytest.raises(UserError, match="int8"):
        r.infer({"args_0": np.zeros(info.inputs[0].shape, np.float32)})
    with pytest.raises(UserError, match="missing"):
        r.infer({})
