"""`bottlefit verify` on an rpi bundle names the first head layer whose quantized output diverges in the .tflite.

The bundle is a real export (untrained custom_densenet169; the BatchNorm after the max-pool is folded into the
stem conv, the export's default). The break is made in the flatbuffer itself: the per-channel weight scales of the
last conv, ``features.bottleneck.encoder.6``, are multiplied by 8, so its int8 output clips while the layers
before it stay healthy. (Its output tensor is the graph's, named by no module; an activation scale earlier in the
graph would sit between a PAD and a MAX_POOL, which must share their input's scale.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bottlefit.calibration.dataset import CalibrationSet
from bottlefit.cli import main
from bottlefit.exporter.artifact import Artifact
from bottlefit.exporter.head_rewrite import RewrittenHead
from bottlefit.exporter.manifest import MANIFEST, read_manifest, sha256_file, write_json
from bottlefit.exporter.split import fold_head, split
from bottlefit.parity.tolerances import tolerances_for
from bottlefit.parity.verify import diagnose
from bottlefit.pipeline import source

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")

TFLITE = "head.int8.tflite"
BROKEN = "features.bottleneck.encoder.6"
# (module, through) per row: conv0 (BN1, BN4 folded) + fused ReLU2, max-pool, conv6
ROWS = [
    ("features.bottleneck.encoder.0", "features.bottleneck.encoder.2"),
    ("features.bottleneck.encoder.3", "features.bottleneck.encoder.3"),
    ("features.bottleneck.encoder.6", "features.bottleneck.encoder.6"),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag-tflite")
    rc = main(["export", "--untrained", "--arch", "custom_densenet169", "--target", "rpi", "--out", str(out),
               "--calib-count", "8", "--parity-count", "4", "--quiet"])
    assert rc == 0
    return out / "rpi"


@pytest.mark.slow
def test_unbroken_head_maps_every_layer(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    art = Artifact.from_dict(next(a for a in manifest["artifacts"] if a["file"] == TFLITE))
    lm = source.reload(manifest["source"], None)
    held = CalibrationSet.builtin(lm.card, part="heldout", count=manifest["parity"]["images"]["count"])
    assert manifest["head_folds"]  # the bundle's head is the folded one; the diagnosis reads that head
    d = diagnose(fold_head(split(lm.model, lm.card))[0], art, bundle, held.images,
                 tolerances_for(art.file, art.precision, {}))
    assert d["first_diverging_layer"] is None
    assert [(r["module"], r["through"]) for r in d["layers"]] == ROWS
    for r in d["layers"]:
        assert r["cosine"] > 0.99 and r["sqnr_db"] > 25, r  # measured: cosine 0.9984-0.9999, SQNR 31-41 dB


def break_weight_scale(path: Path, origin: dict[str, list[str]], module: str, factor: float) -> int:
    """Multiply the per-channel weight scales of the CONV_2D that ``module`` became by ``factor``; its index."""
    from ai_edge_litert import interpreter as li
    from ai_edge_litert import schema_py_generated as fb

    rw = RewrittenHead(torch.nn.Sequential(), origin)
    interp = li.Interpreter(model_path=str(path),
                            experimental_op_resolver_type=li.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    names = {int(t["index"]): str(t["name"]) for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    # the conv reads its input through a PAD named after the conv's module
    hit = [int(op["inputs"][1]) for op in ops if op["op_name"] == "CONV_2D"
           and module in rw.origin_of_tensor(names[int(op["inputs"][0])])]
    assert len(hit) == 1, hit
    buf = bytearray(path.read_bytes())
    scale = fb.Model.GetRootAs(buf, 0).Subgraphs(0).Tensors(hit[0]).Quantization().ScaleAsNumpy()  # a view
    assert scale.shape[0] > 1 and (scale > 0).all()  # per-channel
    scale *= np.float32(factor)
    path.write_bytes(bytes(buf))
    return hit[0]


@pytest.mark.slow
def test_broken_weight_scale_names_the_layer(bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "rpi"
    shutil.copytree(bundle, d)
    manifest = read_manifest(d)
    art = next(a for a in manifest["artifacts"] if a["file"] == TFLITE)
    assert art["extra"]["rewrite"]["origin"]["3"] == [BROKEN]  # the last conv is rewritten child 3
    break_weight_scale(d / TFLITE, art["extra"]["rewrite"]["origin"], BROKEN, 8.0)
    art["sha256"] = sha256_file(d / TFLITE)  # a consistent manifest: only the numbers are wrong
    write_json(d / MANIFEST, manifest)

    # fidelity is what is under test here: the board run would fail too (its golden outputs predate the damage)
    assert main(["verify", str(d), "--emulate", "none"]) == 1
    report = json.loads((d / "report.json").read_text())
    assert report["passed"] is False
    failed = [c for c in report["checks"] if not c["passed"]]
    assert failed and {c["artifact"] for c in failed} == {TFLITE}
    diag = report["diagnosis"][TFLITE]
    assert diag["first_diverging_layer"] == BROKEN
    rows = {r["module"]: r for r in diag["layers"]}
    assert [(r["module"], r["through"]) for r in diag["layers"]] == ROWS
    # the layers before it are untouched; the broken one falls far below the SQNR tolerance (measured 4.9 dB)
    assert min(rows[m]["sqnr_db"] for m in ("features.bottleneck.encoder.0", "features.bottleneck.encoder.3")) > 35
    assert rows[BROKEN]["sqnr_db"] < 10 < 15 == diag["min_sqnr_db"]
    assert rows[BROKEN]["cosine"] < 0.95
    assert "first diverging head layer: features.bottleneck.encoder.6 (cosine" in (d / "report.md").read_text()


@pytest.mark.slow
def test_a_host_runtime_that_refuses_the_file_is_information(bundle: Path, tmp_path: Path) -> None:
    """A PAD whose output scale differs from its input's runs under the reference kernels, but XNNPACK refuses to
    prepare it: the host run is recorded as "failed" (information), and verify still gives the fidelity verdict
    (exit 1), never an internal error."""
    from ai_edge_litert import interpreter as li
    from ai_edge_litert import schema_py_generated as fb

    d = tmp_path / "rpi"
    shutil.copytree(bundle, d)
    path = d / TFLITE
    interp = li.Interpreter(model_path=str(path),
                            experimental_op_resolver_type=li.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    pads = [int(op["outputs"][0]) for op in interp._get_ops_details() if op["op_name"] == "PAD"]
    buf = bytearray(path.read_bytes())
    scale = fb.Model.GetRootAs(buf, 0).Subgraphs(0).Tensors(pads[-1]).Quantization().ScaleAsNumpy()
    scale[0] = np.float32(scale[0] / 8)
    path.write_bytes(bytes(buf))
    manifest = read_manifest(d)
    next(a for a in manifest["artifacts"] if a["file"] == TFLITE)["sha256"] = sha256_file(path)
    write_json(d / MANIFEST, manifest)

    assert main(["verify", str(d), "--emulate", "none"]) == 1
    report = json.loads((d / "report.json").read_text())
    host_runs = [e for e in report["execution"] if e["artifact"] == TFLITE and e["where"] == "host"]
    (host,) = [e for e in host_runs if e["runtime"] == "litert"]
    assert host["status"] == "failed" and host["gated"] is False
    assert host["note"].startswith("this host's litert could not run it: ")
    # the reference interpreter runs it as the vectorised evaluator does (both copy a PAD's codes, whatever the
    # scales say): the fidelity figures stand, and the failure is the fidelity's alone
    (cross,) = [e for e in host_runs if e["runtime"] == "litert BUILTIN_REF"]
    assert cross["status"] == "agrees" and cross["gated"] is True and cross["metrics"]["max_abs_lsb"] == 0.0
