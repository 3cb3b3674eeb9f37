"""Bottleneck channel equalization across the split: exact in float, one grid for every channel, recorded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.errors import UserError
from bottlefit.exporter.equalize import (
    _set_submodule,
    apply_equalization,
    channel_thresholds,
    equalize_split,
    unequalize,
)
from bottlefit.exporter.onnx import export_onnx
from bottlefit.exporter.qdq import quantize_head
from bottlefit.exporter.split import check_split, split
from bottlefit.models.checkpoint import untrained
from bottlefit.parity.metrics import sqnr_db
from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner
from tests.helpers import shared_untrained


@pytest.fixture(scope="module")
def data(r152) -> dict:
    calib = CalibrationSet.builtin(r152.card, part="calibration", count=8, log=lambda _m: None).images
    held = CalibrationSet.builtin(r152.card, part="heldout", count=3, log=lambda _m: None).images
    return {"calib": calib, "held": held}


def test_equalization_on_the_mini_resnet_is_exact_equal_and_reapplies() -> None:
    """The quick loop's equalization: on the mini ResNet's bottleneck, the equalized split is still the model,
    every channel ends on the same range, and the record reapplies bit for bit (ResNet-152: the tests below)."""
    lm = untrained("mini_resnet", {"bottleneck_channel": 4}, seed=0)
    calib = CalibrationSet.builtin(lm.card, part="calibration", count=8, log=lambda _m: None).images
    x = torch.from_numpy(CalibrationSet.builtin(lm.card, part="heldout", count=2, log=lambda _m: None).images)
    sm = split(lm.model, lm.card)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    eq, rec = equalize_split(sm, calib)
    assert check_split(eq, x) < 1e-4 and all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert (rec.encoder_layer, rec.decoder_layer) == ("bottleneck.encoder.6", "bottleneck.decoder.0")
    _, a = channel_thresholds(sm.head, calib)
    _, ae = channel_thresholds(eq.head, calib)
    assert a.max() / a.min() > 1.5  # measured 1.63: channels of different spread ...
    np.testing.assert_allclose(ae, ae.max(), rtol=0.02)  # ... then one range
    assert min(rec.scales) == 1.0 and max(rec.scales) == pytest.approx(a.max() / a.min(), rel=0.02)
    again = apply_equalization(sm, rec.to_dict())
    with torch.no_grad():
        assert torch.equal(eq.head(x), again.head(x)) and torch.equal(eq.tail(eq.head(x)), again.tail(again.head(x)))


@pytest.mark.slow
def test_equalized_split_is_the_model_and_leaves_it_untouched(r152, data: dict) -> None:
    sm = split(r152.model, r152.card)
    before = {k: v.clone() for k, v in r152.model.state_dict().items()}
    eq, rec = equalize_split(sm, data["calib"])
    x = torch.from_numpy(data["held"][:2])
    # tail'(head'(x)) against the ORIGINAL model (eq.model is it): the fold is exact up to float rounding
    assert eq.model is r152.model and check_split(eq, x) < 1e-4
    assert all(torch.equal(v, r152.model.state_dict()[k]) for k, v in before.items())
    assert (rec.encoder_layer, rec.decoder_layer, rec.method) == ("bottleneck.encoder.6", "bottleneck.decoder.0",
                                                                  "mse-centred")
    with torch.no_grad():
        z, ze = sm.head(x).numpy(), eq.head(x).numpy()
    s = np.asarray(rec.scales).reshape(1, -1, 1, 1)
    o = np.asarray(rec.offsets).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(ze, (z - o) * s, rtol=1e-4, atol=1e-5 * float(np.abs(ze).max()))
    np.testing.assert_allclose(unequalize(ze, eq.head.equalization), z, rtol=1e-4, atol=1e-5 * float(np.abs(z).max()))
    assert min(rec.scales) == 1.0 and max(rec.scales) > 1.2  # the widest channel keeps its scale


@pytest.mark.slow
def test_every_channel_then_uses_the_same_range(r152, data: dict) -> None:
    sm = split(r152.model, r152.card)
    _, a = channel_thresholds(sm.head, data["calib"])
    eq, _ = equalize_split(sm, data["calib"])
    _, ae = channel_thresholds(eq.head, data["calib"])
    assert a.max() / a.min() > 1.5  # the problem: channels of very different spread
    np.testing.assert_allclose(ae, ae.max(), rtol=0.02)


@pytest.mark.slow
def test_recorded_equalization_reapplies_bit_for_bit(r152, data: dict) -> None:
    sm = split(r152.model, r152.card)
    eq, rec = equalize_split(sm, data["calib"])
    again = apply_equalization(sm, rec.to_dict())
    x = torch.from_numpy(data["held"][:1])
    with torch.no_grad():
        assert torch.equal(eq.head(x), again.head(x)) and torch.equal(eq.tail(eq.head(x)), again.tail(again.head(x)))


@pytest.mark.slow
def test_ver1_encoder_ending_in_relu_pool_is_scaled_not_shifted() -> None:
    lm = shared_untrained("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "1"})  # left untouched
    sm = split(lm.model, lm.card)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    eq, rec = equalize_split(sm, x)
    # a shift does not commute with ReLU / max-pool: scales only, folded into the stem's BatchNorm
    assert rec.method == "mse" and set(rec.offsets) == {0.0} and rec.encoder_layer == "bottleneck.encoder.1"
    assert check_split(eq, torch.from_numpy(x[:2])) < 1e-4


@pytest.mark.slow
def test_a_decoder_that_cannot_take_the_scales_is_refused(r152, data: dict) -> None:
    model = copy.copy(r152.model)
    bottleneck = copy.deepcopy(r152.model.bottleneck)
    bottleneck.decoder[0] = nn.GELU()  # GELU(x / s) != GELU(x) / s
    _set_submodule(model, "bottleneck", bottleneck)
    with pytest.raises(UserError, match="decoder does not begin with a BatchNorm2d.*without --equalize"):
        equalize_split(split(model, r152.card), data["calib"])


@pytest.mark.slow
def test_equalized_search_head_beats_minmax_and_records_both(r152, data: dict, tmp_path) -> None:
    """The recipe on a symmetric (TensorRT) head: per-tensor range search + equalization, recorded per tensor."""
    sm = split(r152.model, r152.card)
    x1 = torch.from_numpy(data["held"][:1]).clone()
    with torch.no_grad():
        ref = sm.head(torch.from_numpy(data["held"])).numpy()

    def run(path) -> np.ndarray:
        r = OnnxRuntimeRunner(path, reference=True)
        return np.concatenate([r.infer({"input": data["held"][i : i + 1]})["bottleneck"]
                               for i in range(len(data["held"]))])

    base = export_onnx(sm.head, x1, tmp_path / "base.onnx", 13, "input", "bottleneck").path
    q0 = quantize_head(base, tmp_path / "mm.onnx", data["calib"], sm.head, "minmax", symmetric=True)
    eq, rec = equalize_split(sm, data["calib"])
    fp32 = export_onnx(eq.head, x1, tmp_path / "eq.onnx", 13, "input", "bottleneck").path
    q1 = quantize_head(fp32, tmp_path / "eq.q.onnx", data["calib"], eq.head, "search", symmetric=True)
    rec1 = q1.quantization_record()
    assert rec1["equalization"]["scales"] == rec.to_dict()["scales"] and rec1["observer"] == "search"
    assert set(rec1["range_search"]) == set(q1.activation_scales)  # every quantized tensor says how it was chosen
    out = rec1["range_search"]["bottleneck"]
    assert out["judged_by"] == "tensor" and out["method"] in out["sqnr_db"]
    assert rec1["range_search"]["input"]["judged_by"] == "layer"  # the stem conv reads the input
    s0 = sqnr_db(ref, run(q0.path))
    s1 = sqnr_db(ref, unequalize(run(q1.path), rec1["equalization"]))
    print(f"symmetric head SQNR: min/max {s0:.2f} dB, search + equalization {s1:.2f} dB")
    assert s1 > s0 + 2.0  # measured 27.1 -> 30.2 dB (8 calibration photos, 3 held-out)
