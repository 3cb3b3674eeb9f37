from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bottlefit.errors import UserError
from bottlefit.exporter import wire
from bottlefit.exporter.head_rewrite import RewrittenHead
from bottlefit.runtimes.litert import LiteRTRunner
from bottlefit.targets.rpi.tflite import export_tflite
from tests.targets.rpi import (
    CALIB_COUNT,
    HEADS,
    HELDOUT_COUNT,
    cosine,
    head,
    images,
    int8_tflite,
    rewritten,
    scratch,
    sqnr_db,
)

# measured (random-BN heads, 12 calibration / 6 held-out photos): cosine 0.99985-0.99996, SQNR 35-41 dB
COSINE_MIN = 0.995
SQNR_MIN_DB = 20.0


def run_float(path: Path, info, x_nchw: np.ndarray) -> np.ndarray:
    """Run each image through the artifact, encode/decode as its TensorSpecs say: float NCHW out."""
    r = LiteRTRunner(path)
    ins, outs = info.inputs[0], info.outputs[0]
    ys = [wire.decode(outs, r.infer({ins.name: wire.encode(ins, x_nchw[i : i + 1])})[outs.name])
          for i in range(len(x_nchw))]
    return np.concatenate(ys)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(HEADS))
def test_int8_head_is_fully_integer_and_close_to_pytorch(key: str) -> None:
    path, info = int8_tflite(key)
    assert info.float_ops == []
    assert [s.dtype for s in info.inputs] == ["int8"] and [s.dtype for s in info.outputs] == ["int8"]
    assert "TRANSPOSE" not in info.ops  # NHWC I/O: the converter absorbed the layout change
    ins, outs = info.inputs[0], info.outputs[0]
    h, card = head(key)
    assert ins.layout == "NHWC" and ins.shape == (1, 224, 224, 3)
    c, hh, ww = card.bottleneck.shape
    assert outs.shape == (1, hh, ww, c) and outs.scale > 0
    x = images("heldout", HELDOUT_COUNT)
    with torch.no_grad():
        ref = h(torch.from_numpy(x).clone()).numpy()
    got = run_float(path, info, x)
    cos, sq = cosine(ref, got), sqnr_db(ref, got)
    print(f"{key}: cosine {cos:.5f} sqnr {sq:.1f} dB max_abs {np.abs(ref - got).max():.4f} lsb {outs.scale:.4g}")
    assert cos > COSINE_MIN and sq > SQNR_MIN_DB


@pytest.mark.slow
def test_double_export_is_byte_identical() -> None:
    path, _ = int8_tflite("r152v2")
    again = scratch("again") / "head.int8.tflite"
    export_tflite(rewritten("r152v2"), images("calibration", CALIB_COUNT), again, int8=True)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_nchw_layout_and_same_numbers() -> None:
    path, info = int8_tflite("r152v2", "NCHW")
    assert info.inputs[0].shape == (1, 3, 224, 224) and info.inputs[0].layout == "NCHW"
    assert info.outputs[0].shape == (1, 12, 29, 29) and info.float_ops == []
    x = images("heldout", HELDOUT_COUNT)[:2]
    nhwc_path, nhwc_info = int8_tflite("r152v2")
    # The layouts calibrate through different graphs (NCHW adds transposes), so float summation order moves
    # the output scale in its last bits (measured 0.016298095 vs 0.016298093): the decoded floats then differ
    # everywhere by ~1e-9, and a code on a rounding edge by one step. Same quantization, same fidelity.
    a_out, b_out = info.outputs[0], nhwc_info.outputs[0]
    assert a_out.zero_point == b_out.zero_point and a_out.scale == pytest.approx(b_out.scale, rel=1e-6)
    a, b = run_float(path, info, x), run_float(nhwc_path, nhwc_info, x)
    steps = np.abs(a - b) / b_out.scale
    assert steps.max() <= 1.0 + 1e-3 and np.mean(steps > 0.5) < 0.01
    with torch.no_grad():
        ref = head("r152v2")[0](torch.from_numpy(x).clone()).numpy()
    assert sqnr_db(ref, a) == pytest.approx(sqnr_db(ref, b), abs=0.1)


@pytest.mark.slow
def test_fp32_tflite_matches_pytorch() -> None:
    path = scratch("fp32") / "head.fp32.tflite"
    info = export_tflite(rewritten("d201"), images("calibration", CALIB_COUNT), path, int8=False)
    assert info.inputs[0].dtype == "float32" and info.outputs[0].dtype == "float32"
    x = images("heldout", HELDOUT_COUNT)[:2]
    with torch.no_grad():
        ref = head("d201")[0](torch.from_numpy(x).clone()).numpy()
    np.testing.assert_allclose(run_float(path, info, x), ref, atol=1e-4, rtol=0)


def _head_with_float_island() -> RewrittenHead:
    # GELU has no int8 kernel in the PT2E quantizer's patterns: it stays float between DEQUANTIZE/QUANTIZE.
    # (A BatchNorm island behaves the same, docs/tensorrt.md, but its PT2E conv-BN fold pass costs ~1 min.)
    rw = rewritten("r152v1")
    conv, relu, pool = rw.module
    origin = {"0": rw.origin["0"], "1": rw.origin["1"], "2": ["bottleneck.extra"], "3": rw.origin["2"]}
    return RewrittenHead(nn.Sequential(conv, relu, nn.GELU(), pool).eval(), origin)


@pytest.mark.slow
def test_float_island_is_refused_and_named() -> None:
    out = scratch("island")
    calib = images("calibration", CALIB_COUNT)[:4]
    with pytest.raises(UserError, match=r"float op\(s\):.*GELU.*bottleneck\.extra.*--allow-float-ops"):
        export_tflite(_head_with_float_island(), calib, out / "head.int8.tflite", int8=True)
    assert os.listdir(out) == []
    info = export_tflite(_head_with_float_island(), calib, out / "head.int8.tflite", int8=True,
                         allow_float_ops=True, log=lambda s: None)
    assert any(f.op == "GELU" and f.modules == ["bottleneck.extra"] for f in info.float_ops)
    assert (out / "head.int8.tflite").stat().st_size > 0


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return x * 2
        return x


def test_failed_conversion_leaves_no_file() -> None:
    out = scratch("fail")
    rw = RewrittenHead(nn.Sequential(_Unexportable()), {"0": ["x.0"]})
    with pytest.raises(UserError, match="could not convert"):
        export_tflite(rw, images("calibration", CALIB_COUNT)[:2], out / "head.int8.tflite", int8=True)
    assert os.listdir(out) == []


def test_missing_litert_torch_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    rw = RewrittenHead(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), {"0": ["x.0"]})  # any head: refused first
    with pytest.raises(UserError, match=r"pip install 'bottlefit\[rpi\]'"):
        export_tflite(rw, images("calibration", CALIB_COUNT)[:1], scratch("nolit") / "h.tflite", int8=True)
    assert not (scratch("nolit") / "h.tflite").exists()
