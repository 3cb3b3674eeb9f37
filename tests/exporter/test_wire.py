"""The bottleneck wire contract: what the head sends is exactly what the tail decodes (docs/wire.md)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.cli import main
from bottlefit.exporter import wire
from bottlefit.exporter.artifact import TensorSpec
from bottlefit.exporter.split import split
from bottlefit.models.bottleneck import Dequantizer, Quantizer
from bottlefit.models.checkpoint import untrained


@pytest.fixture(scope="module")
def bq_export(tmp_path_factory: pytest.TempPathFactory):
    lm = untrained("custom_densenet169", {"bottleneck_channel": 12, "bq": True})
    out = tmp_path_factory.mktemp("bq")
    ckpt = out / "bq.pt"
    from bottlefit.models.checkpoint import save

    save(ckpt, lm.model, lm.card)
    rc = main(["export", str(ckpt), "--target", "onnx", "--out", str(out), "--parity-count", "3", "--quiet"])
    return lm, out / "onnx", rc


@pytest.mark.slow
def test_bq_payload_round_trip_through_onnx_head_and_tail(bq_export) -> None:
    lm, d, rc = bq_export
    assert rc == 0
    m = json.loads((d / "manifest.json").read_text())
    assert m["wire"]["head.onnx"]["encoding"] == "bq8-per-image"
    assert m["wire"]["head.onnx"]["bytes"] == 12 * 29 * 29 + 5 == 10_097
    sm = split(lm.model, lm.card)
    held = CalibrationSet.builtin(lm.card, part="heldout", count=3)
    head = ort.InferenceSession(str(d / "head.onnx"), providers=["CPUExecutionProvider"])
    for i in range(len(held)):
        x = held.images[i : i + 1]
        z = head.run(["bottleneck"], {"input": x})[0][0]
        payload = wire.bq_payload(z)
        assert len(payload) == 10_097
        decoded = wire.bq_decode(payload, (12, 29, 29))
        # bit-exact with the authors' Quantizer -> Dequantizer on the same head output
        ref = Dequantizer(8)(Quantizer(8)(torch.from_numpy(z)[None]))[0].numpy()
        assert np.array_equal(decoded, ref)
        with torch.no_grad():
            logits = sm.tail(torch.from_numpy(decoded)[None]).numpy()
            full = lm.model(torch.from_numpy(x)).numpy()  # the model applies bq inside, upstream-style
        assert logits.argmax() == full.argmax()
        assert np.abs(logits - full).max() < 1e-3 * max(1.0, float(np.abs(full).max()))


def test_bq_payload_layout_is_documented_bytes() -> None:
    z = np.array([[[-1.0, 0.0], [0.5, 2.0]]], dtype=np.float32)
    p = wire.bq_payload(z)
    assert p[:4] == np.array([3.0 / 255.0], dtype="<f4").tobytes()
    assert p[4] == 85 and list(p[5:]) == [0, 85, 128, 255]
    s = np.float32(3.0 / 255.0)
    expected = s * (np.array([[[0, 85], [128, 255]]], dtype=np.float32) - np.float32(85))
    assert np.array_equal(wire.bq_decode(p, (1, 2, 2)), expected)
    with pytest.raises(ValueError, match="expected 9"):
        wire.bq_decode(p[:-1], (1, 2, 2))


def test_static_int8_contract_round_trip_through_bytes() -> None:
    spec = TensorSpec("bottleneck", (1, 29, 29, 12), "int8", "NHWC", scale=0.05, zero_point=-3)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (1, 12, 29, 29)).astype(np.float32)
    q = wire.encode(spec, z)
    assert q.dtype == np.int8 and q.shape == (1, 29, 29, 12)
    back = wire.decode(spec, wire.from_bytes(spec, wire.to_bytes(spec, q)))
    assert back.shape == z.shape
    inside = np.abs(z) < 0.05 * 120  # away from saturation the error is at most half a step
    assert np.abs(back - z)[inside].max() <= 0.025 + 1e-6
    c = wire.contract(type("B", (), {"shape": (12, 29, 29), "quantizer": None})(), spec)
    assert c == {"encoding": "static", "dtype": "int8", "shape": [29, 29, 12], "layout": "NHWC", "bytes": 10_092,
                 "scale": 0.05, "zero_point": -3, "tail_applies": "scale * (code - zero_point)"}
