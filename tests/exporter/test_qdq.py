"""int8 Q/DQ heads: bottlefit.exporter.qdq (the writer) and `bottlefit export --target onnx --int8`.

Untrained weights: their top-1 margins are ~1e-4 of the logit range, so int8 noise flips top-1 on some photos
whatever the quantizer; the exports below therefore gate the int8 head on the bottleneck (cosine >= 0.98 by
default, SQNR raised to >= 25 dB: a good min/max head measures ~31 dB) and report top-1 without a floor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.calibration.observers import OBSERVERS, MinMaxObserver
from bottlefit.cli import main
from bottlefit.exporter.onnx import export_onnx
from bottlefit.exporter.qdq import prepare_fp32, quantize_head
from bottlefit.exporter.split import split
from bottlefit.models.checkpoint import untrained
from bottlefit.parity.metrics import cosine
from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner


def qdq_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def inits_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def small(r152, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The ResNet-152 ver2 head as fp32 ONNX and 3 calibration photos: enough to run quantize_head for real."""
    d = tmp_path_factory.mktemp("qdq")
    sm = split(r152.model, r152.card)
    x = torch.randn(1, *r152.card.input_shape, generator=torch.Generator().manual_seed(0))
    fp32 = export_onnx(sm.head, x, d / "head.onnx", 13, "input", "bottleneck").path
    calib = CalibrationSet.builtin(r152.card, part="calibration", count=3, log=lambda _m: None).images
    held = CalibrationSet.builtin(r152.card, part="heldout", count=2, log=lambda _m: None).images
    return {"dir": d, "fp32": fp32, "head": sm.head, "calib": calib, "held": held}


def ort_outputs(path: Path, images: np.ndarray) -> np.ndarray:
    """The Q/DQ graph under ONNX spec semantics: the same numbers on any CPU (fused int8 kernels are not)."""
    r = OnnxRuntimeRunner(path, reference=True)
    return np.concatenate([r.infer({"input": images[i : i + 1]})[r.output_names[0]] for i in range(len(images))])


# --- the CLI ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_int8_builtin_set_passes_parity(r152_int8_export: Path) -> None:
    report = json.loads((r152_int8_export / "report.json").read_text())
    assert report["passed"] is True
    checks = {c["metric"]: c for c in report["checks"] if c["artifact"] == "head.int8.onnx"}
    assert checks["bottleneck.cosine"]["value"] >= 0.98 and checks["bottleneck.cosine"]["tolerance"] == 0.98
    assert checks["bottleneck.sqnr_db"]["value"] >= 25.0
    assert 0.0 <= checks["logits.top1_agreement"]["value"] <= 1.0
    manifest = json.loads((r152_int8_export / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["file"] == "head.int8.onnx")
    assert (art["role"], art["runtime"], art["precision"]) == ("head", "onnxruntime", "int8")
    q = art["quantization"]
    assert (q["observer"], q["symmetric"], q["per_channel"]) == ("minmax", False, True)
    assert q["calibration_count"] == manifest["calibration"]["count"] > 0
    assert manifest["calibration"]["source"] == "builtin:calibration"
    assert art["inputs"][0]["dtype"] == art["outputs"][0]["dtype"] == "float32"
    assert art["outputs"][0]["shape"] == [1, 12, 29, 29]


@pytest.mark.slow
def test_int8_head_is_qdq_with_the_recorded_scales(r152_int8_export: Path) -> None:
    model = onnx.load(str(r152_int8_export / "head.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") >= 4
    # Float in, float out: the graph ends in DequantizeLinear.
    assert model.graph.node[-1].op_type == "DequantizeLinear" and model.graph.node[-1].output[0] == "bottleneck"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The BatchNorm after the max-pool is folded into the stem conv (the export's default): two convs remain.
    assert [n.name for n in model.graph.node if n.op_type == "Conv"] == ["/encoder/encoder.0/Conv",
                                                                         "/encoder/encoder.6/Conv"]
    inits = inits_of(model)
    manifest = json.loads((r152_int8_export / "manifest.json").read_text())
    q = next(a for a in manifest["artifacts"] if a["file"] == "head.int8.onnx")["quantization"]
    written = {n.input[0].removesuffix("_QuantizeLinear_Input"): (float(inits[n.input[1]]), int(inits[n.input[2]]))
               for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert q["activation_order"] == list(written)  # topological order
    assert {k: (v, q["activation_zero_points"][k]) for k, v in q["activation_scales"].items()} == written
    # ReLU outputs in uint8: zero point 0, so the ReLU folds into the conv.
    assert q["activation_zero_points"]["/encoder/encoder.2/Relu_output_0"] == 0
    assert q["tensor_modules"]["/encoder/encoder.2/Relu_output_0"] == "bottleneck.encoder.0"
    assert q["tensor_modules"]["bottleneck"] == "bottleneck.encoder.6"


def write_photos(folder: Path) -> list[str]:
    """Real photos that ship with scikit-image, as a user would bring them: JPEG and PNG, nested."""
    from PIL import Image
    from skimage import data

    (folder / "street").mkdir(parents=True)
    photos = {"astronaut.png": data.astronaut(), "coffee.jpg": data.coffee(), "street/rocket.jpeg": data.rocket(),
              "street/cat.png": data.cat()}
    for name, arr in photos.items():
        Image.fromarray(arr).save(folder / name, quality=92)
    return sorted(photos)


@pytest.mark.slow
def test_export_int8_user_folder_densenet169(tmp_path: Path) -> None:
    names = write_photos(tmp_path / "calib")
    out = tmp_path / "out"
    rc = main(["export", "--untrained", "--arch", "custom_densenet169", "--bottleneck-channel", "12",
               "--target", "onnx", "--int8", "--calib", str(tmp_path / "calib"), "--observer", "percentile",
               "--out", str(out), "--parity-count", "4", "--quiet",
               "--tolerance", "head.int8.onnx:bottleneck.sqnr_db=25"])
    assert rc == 0
    report = json.loads((out / "onnx" / "report.json").read_text())
    assert report["passed"] is True
    # Untrained weights: top-1 agreement is reported, but without a tolerance (near-ties make it meaningless).
    top1 = next(c for c in report["checks"]
                if c["artifact"] == "head.int8.onnx" and c["metric"] == "logits.top1_agreement")
    assert top1["tolerance"] is None and top1["passed"] is True and 0.0 <= top1["value"] <= 1.0
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["calibration"]["source"] == str(tmp_path / "calib")
    assert sorted(manifest["calibration"]["names"]) == names
    q = next(a for a in manifest["artifacts"] if a["file"] == "head.int8.onnx")["quantization"]
    assert q["observer"] == "percentile" and q["calibration_count"] == 4
    assert q["tensor_modules"]["bottleneck"] == "features.bottleneck.encoder.6"  # DenseNet's own module path
    cos = next(c["value"] for c in report["checks"]
               if c["artifact"] == "head.int8.onnx" and c["metric"] == "bottleneck.cosine")
    assert cos >= 0.98


def test_unknown_observer_is_refused_with_one_line(tmp_path: Path, capsys) -> None:
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--target", "onnx", "--int8", "--observer", "kl",
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "unknown calibration method 'kl'" in err
    assert not (tmp_path / "o" / "onnx").exists()


# --- the writer (quantize_head) ----------------------------------------------------------------------------


def test_mini_head_symmetric_qdq_has_zero_points_and_repeats_byte_for_byte(tmp_path: Path) -> None:
    """The quick loop's writer: the mini ResNet's head, symmetric, twice (ResNet-152's head: the tests below)."""
    lm = untrained("mini_resnet", {"bottleneck_channel": 4}, seed=0)
    sm = split(lm.model, lm.card)
    x = torch.randn(1, *lm.card.input_shape, generator=torch.Generator().manual_seed(0))
    fp32 = export_onnx(sm.head, x, tmp_path / "head.onnx", 13, "input", "bottleneck").path
    calib = CalibrationSet.builtin(lm.card, part="calibration", count=3, log=lambda _m: None).images
    a = quantize_head(fp32, tmp_path / "a.onnx", calib, sm.head, "minmax", symmetric=True)
    b = quantize_head(fp32, tmp_path / "b.onnx", calib, sm.head, "minmax", symmetric=True)
    assert a.path.read_bytes() == b.path.read_bytes() and a.activation_scales == b.activation_scales
    model = onnx.load(str(a.path))
    inits = inits_of(model)
    nodes = qdq_nodes(model)
    assert len(nodes) >= 8
    for n in nodes:
        assert len(n.input) == 3 and n.input[2] in inits and not np.any(inits[n.input[2]]), n.name
    assert set(a.activation_zero_points.values()) == {0}
    assert a.amax() == {k: float(np.float32(127) * np.float32(s)) for k, s in a.activation_scales.items()}


@pytest.mark.slow
def test_symmetric_mode_every_zero_point_is_zero_with_three_inputs(small: dict) -> None:
    res = quantize_head(small["fp32"], small["dir"] / "sym.onnx", small["calib"], small["head"], "minmax",
                        symmetric=True)
    model = onnx.load(str(res.path))
    inits = inits_of(model)
    nodes = qdq_nodes(model)
    assert len(nodes) >= 12
    for n in nodes:
        assert len(n.input) == 3 and n.input[2] in inits, n.name  # TensorRT 8.x: explicit zero points
        assert not np.any(inits[n.input[2]]), n.name
    # Activations int8 per tensor; weights int8 per output channel.
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.int8 and inits[n.input[1]].size == 1
    w_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")
            or n.input[0] == "onnx::Conv_21_quantized"]
    assert {inits[n.input[1]].size for n in w_dq} >= {64, 12}
    assert set(res.activation_zero_points.values()) == {0}
    assert res.amax() == {k: float(np.float32(127) * np.float32(s)) for k, s in res.activation_scales.items()}


@pytest.mark.slow
def test_same_inputs_give_byte_identical_files(small: dict) -> None:
    a = quantize_head(small["fp32"], small["dir"] / "a.onnx", small["calib"], small["head"], symmetric=True)
    b = quantize_head(small["fp32"], small["dir"] / "b.onnx", small["calib"], small["head"], symmetric=True)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.activation_scales == b.activation_scales


@pytest.mark.slow
def test_scales_are_our_observers_ranges(small: dict) -> None:
    """min/max over the calibration images, computed independently (PyTorch head, float64), is what the file
    carries. The writer observes the ONNX graph in ORT, so the two maxima may differ in the last float bits."""
    x = torch.from_numpy(small["calib"])
    with torch.no_grad():
        z = small["head"](x).numpy()
    sym = quantize_head(small["fp32"], small["dir"] / "s.onnx", small["calib"], small["head"], symmetric=True)
    assert sym.activation_scales["bottleneck"] == pytest.approx(float(np.abs(z).max()) / 127, rel=1e-6)
    # The input is not computed, only read: exact.
    assert sym.activation_scales["input"] == float(np.float32(float(np.abs(small["calib"]).max()) / 127))
    asym = quantize_head(small["fp32"], small["dir"] / "u.onnx", small["calib"], small["head"], symmetric=False)
    mm = MinMaxObserver()
    mm.update(z)
    scale, zp = mm.asymmetric("uint8")
    assert asym.activation_scales["bottleneck"] == pytest.approx(scale, rel=1e-6)
    assert asym.activation_zero_points["bottleneck"] == zp
    assert asym.activation_dtype == "uint8" and sym.activation_dtype == "int8"


@pytest.mark.slow
@pytest.mark.parametrize("observer", sorted(OBSERVERS))
def test_each_observer_quantizes_end_to_end(small: dict, observer: str) -> None:
    res = quantize_head(small["fp32"], small["dir"] / f"{observer}.onnx", small["calib"], small["head"], observer,
                        symmetric=True)
    assert res.observer == observer
    got = ort_outputs(res.path, small["held"])
    with torch.no_grad():
        ref = small["head"](torch.from_numpy(small["held"])).numpy()
    assert got.shape == ref.shape == (2, 12, 29, 29)
    # entropy clips hardest on these random-weight activations (~0.86 on ResNet-152's head); all must run.
    assert cosine(ref, got) > 0.8


@pytest.mark.slow
def test_batchnorm_rewrite_is_exact(small: dict) -> None:
    model, rewritten = prepare_fp32(small["fp32"])
    assert rewritten == ["/encoder/encoder.4/Conv"]
    assert all(n.op_type != "BatchNormalization" for n in model.graph.node)
    p = small["dir"] / "prepared.onnx"
    onnx.save(model, str(p))
    before, after = ort_outputs(small["fp32"], small["held"]), ort_outputs(p, small["held"])
    assert np.abs(before - after).max() < 1e-5


@pytest.mark.slow
def test_output_int8_emits_the_wire_tensor(small: dict) -> None:
    f = quantize_head(small["fp32"], small["dir"] / "f.onnx", small["calib"], small["head"], symmetric=True)
    q = quantize_head(small["fp32"], small["dir"] / "q.onnx", small["calib"], small["head"], symmetric=True,
                      output_int8=True)
    model = onnx.load(str(q.path))
    assert model.graph.node[-1].op_type == "QuantizeLinear"
    assert model.graph.output[0].name == "bottleneck"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT8
    zq = ort_outputs(q.path, small["held"])
    assert zq.dtype == np.int8
    decoded = (zq.astype(np.float32) - q.output_zero_point) * np.float32(q.output_scale)
    assert np.abs(decoded - ort_outputs(f.path, small["held"])).max() <= q.output_scale * 1.001
