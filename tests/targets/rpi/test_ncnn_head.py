"""The rpi bundle's ncnn head (head.int8.ncnn.param + .bin), built for real from the r152v2 head: what the manifest
records, the weights bound into the .param's digest, golden outputs made under its reference semantics, and what
parity judges (the float output rounded onto its wire codes) against PyTorch."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from bottlefit.exporter.artifact import Artifact
from bottlefit.runtimes import get_runner
from bottlefit.runtimes.head import run_head, wire_codes
from tests.targets.rpi import rpi_bundle


def _arts() -> tuple:
    out, arts = rpi_bundle()
    by = {a.file: a for a in arts}
    return out, by


@pytest.mark.slow
def test_manifest_records_the_ncnn_head_on_the_onnx_heads_wire_grid() -> None:
    out, by = _arts()
    nc, ox = by["head.int8.ncnn.param"], by["head.int8.onnx"]
    assert (nc.role, nc.runtime, nc.precision) == ("head", "ncnn", "int8")
    assert by["head.int8.ncnn.bin"].role == "aux" and not by["head.int8.ncnn.bin"].parity
    assert nc.inputs[0].shape == (1, 3, 224, 224) and nc.inputs[0].dtype == "float32"
    assert nc.outputs[0].shape == ox.outputs[0].shape and nc.outputs[0].dtype == "float32"
    grid = {k: nc.quantization["output"][k] for k in ("dtype", "scale", "zero_point")}
    assert grid == {k: ox.quantization["output"][k] for k in ("dtype", "scale", "zero_point")}
    assert nc.extra["ops"][:2] == ["Input", "Convolution"] and "Pooling" in nc.extra["ops"]
    assert set(nc.quantization["input_scales"]) and all(v > 0 for v in nc.quantization["input_scales"].values())
    # the .param names the .bin's digest, so the .param's sha256 (the contract id's input) covers the weights
    digest = hashlib.sha256((out / "head.int8.ncnn.bin").read_bytes()).hexdigest()[:16]
    assert (out / "head.int8.ncnn.param").read_text().splitlines()[2].startswith(f"Input weights_{digest} ")


@pytest.mark.slow
def test_golden_outputs_are_the_reference_semantics() -> None:
    import json

    out, _ = _arts()
    meta = json.loads((out / "board" / "golden.json").read_text())
    entry = next(m for m in meta["models"] if m["runtime"] == "ncnn")
    assert entry["made_with"].startswith("ncnn's int8 scheme evaluated exactly")
    xs, ys = np.load(out / "board" / entry["inputs_file"]), np.load(out / "board" / entry["outputs_file"])
    r = get_runner("ncnn", out / "head.int8.ncnn.param", reference=True)
    for i in range(len(xs)):
        np.testing.assert_array_equal(r.infer({"in0": xs[i:i + 1]})["out0"], ys[i:i + 1])


@pytest.mark.slow
def test_parity_judges_the_codes_the_tail_receives() -> None:
    """run_head rounds the ncnn head's float output onto its wire grid (a no-op for the Q/DQ head, whose output
    already lies on it); both int8 heads stay close to PyTorch."""
    from bottlefit.calibration.dataset import CalibrationSet
    from tests.targets.rpi import head

    out, by = _arts()
    h, card = head("r152v2")
    x = np.array(CalibrationSet.builtin(card, part="heldout", count=4, log=lambda s: None).images, np.float32)
    with torch.no_grad():
        ref = h(torch.from_numpy(x)).numpy()
    nc = by["head.int8.ncnn.param"]
    grid = wire_codes(nc)
    assert grid is not None and grid.dtype == "int8"
    z = run_head(nc, out, x, reference=True)
    q = z / np.float32(grid.scale) + grid.zero_point
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)  # on the grid
    raw = get_runner("ncnn", out / nc.file, reference=True).infer({"in0": x[:1]})["out0"]
    assert not np.allclose(raw / np.float32(grid.scale), np.round(raw / np.float32(grid.scale)))  # ncnn: off grid
    ox: Artifact = by["head.int8.onnx"]
    zo = run_head(ox, out, x, reference=True)
    raw_o = get_runner("onnxruntime", out / ox.file, reference=True).infer({"input": x[:1]})["bottleneck"]
    assert wire_codes(ox) is not None
    np.testing.assert_array_equal(zo[:1], raw_o)  # the Q/DQ head's output is already on its grid

    def sqnr(a: np.ndarray) -> float:
        return float(10 * np.log10((ref ** 2).sum() / ((a - ref) ** 2).sum()))

    print(f"SQNR vs PyTorch: ncnn {sqnr(z):.2f} dB, onnx {sqnr(zo):.2f} dB")
    assert sqnr(z) > 25 and sqnr(zo) > 25


def test_a_head_ncnn_cannot_express_ships_without_it_and_the_profile_falls_back(tmp_path) -> None:
    """A layer the ncnn writer does not know: no ncnn files (said in the log), and each profile's default becomes
    its cheapest measured int8 head among those the export has."""
    from types import SimpleNamespace

    from bottlefit.exporter.artifact import TensorSpec
    from bottlefit.exporter.split import Head
    from bottlefit.targets.rpi import TARGET
    from bottlefit.targets.rpi.profiles import PROFILES

    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sigmoid()).eval()
    lines: list[str] = []
    ctx = SimpleNamespace(int8_head=Head(enc), observer="minmax", log=lines.append)
    x = np.zeros((2, 3, 8, 8), np.float32)
    arts = TARGET._ncnn_head(ctx, x, tmp_path, TensorSpec("bottleneck", (1, 4, 6, 6), "float32"), {}, {})
    assert arts == [] and list(tmp_path.iterdir()) == []
    assert any(ln.startswith("rpi: no head.int8.ncnn.param: ncnn: the head's layers") for ln in lines)
    files = {"head.int8.tflite", "head.fp32.tflite", "head.int8.onnx"}
    for p in PROFILES.values():
        assert p.choose(files | {"head.int8.ncnn.param"}) is p
        q = p.choose(files)
        assert q.runtime == "onnxruntime" and q.model == "head.int8.onnx" and q.costs == p.costs
        assert q.delegate == ("cpu" if p.dotprod else "cpu-u8")  # the cheaper ONNX Runtime kernels per core
        assert q.why.startswith("head.int8.ncnn.param is not in this export")
