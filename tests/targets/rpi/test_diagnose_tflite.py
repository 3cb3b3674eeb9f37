"""`bottlefit verify` on an rpi bundle names the first head layer whose quantized output diverges in the .tflite.

The bundle is a real export (untrained custom_densenet169). The break is made in the flatbuffer itself: the
activation scale of the depthwise conv that replaced ``features.bottleneck.encoder.4`` (the BatchNorm after the
max-pool) is divided by 8, so its int8 output clips.
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
from bottlefit.exporter.split import split
from bottlefit.parity.tolerances import tolerances_for
from bottlefit.parity.verify import diagnose
from bottlefit.pipeline import source

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")

TFLITE = "head.int8.tflite"
BROKEN = "features.bottleneck.encoder.4"
# (module, through) per row: conv0 + folded BN1 + fused ReLU2, max-pool, depthwise conv (ex-BN4) + ReLU5, conv6
ROWS = [
    ("features.bottleneck.encoder.0", "features.bottleneck.encoder.2"),
    ("features.bottleneck.encoder.3", "features.bottleneck.encoder.3"),
    ("features.bottleneck.encoder.4", "features.bottleneck.encoder.5"),
    ("features.bottleneck.encoder.6", "features.bottleneck.encoder.6"),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag-tflite")
    rc = main(["export", "--untrained", "--arch", "custom_densenet169", "--target", "rpi", "--out", str(out),
               "--calib-count", "8", "--parity-count", "4", "--quiet"])
    assert rc == 0
    return out / "rpi"


def test_unbroken_head_maps_every_layer(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    art = Artifact.from_dict(next(a for a in manifest["artifacts"] if a["file"] == TFLITE))
    lm = source.reload(manifest["source"], None)
    held = CalibrationSet.builtin(lm.card, part="heldout", count=manifest["parity"]["images"]["count"])
    d = diagnose(split(lm.model, lm.card), art, bundle, held.images, tolerances_for(art.file, art.precision, {}))
    assert d["first_diverging_layer"] is None
    assert [(r["module"], r["through"]) for r in d["layers"]] == ROWS
    for r in d["layers"]:
        assert r["cosine"] > 0.99 and r["sqnr_db"] > 25, r  # measured: cosine 0.9984-0.9999, SQNR 31-41 dB


def break_activation_scale(path: Path, origin: dict[str, list[str]], module: str, factor: float) -> list[int]:
    """Divide the int8 scale of the activation ``module`` computes by ``factor``: the tensor its op writes and
    the PAD copy of it the next conv reads (XNNPACK refuses a PAD whose input and output scales differ)."""
    from ai_edge_litert import interpreter as li
    from ai_edge_litert import schema_py_generated as fb

    rw = RewrittenHead(torch.nn.Sequential(), origin)
    interp = li.Interpreter(model_path=str(path),
                            experimental_op_resolver_type=li.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    names = {int(t["index"]): str(t["name"]) for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    hit = [int(op["outputs"][0]) for op in ops if module in rw.origin_of_tensor(names[int(op["outputs"][0])])]
    assert len(hit) == 1, hit
    for op in ops:
        if op["op_name"] in ("PAD", "PADV2") and int(op["inputs"][0]) in hit:
            hit.append(int(op["outputs"][0]))
    buf = bytearray(path.read_bytes())
    tensors = fb.Model.GetRootAs(buf, 0).Subgraphs(0)
    for i in hit:
        scale = tensors.Tensors(i).Quantization().ScaleAsNumpy()  # a writable view into buf
        assert scale.shape == (1,) and scale[0] > 0
        scale[0] = np.float32(scale[0] / factor)
    path.write_bytes(bytes(buf))
    return hit


def test_broken_activation_scale_names_the_layer(bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "rpi"
    shutil.copytree(bundle, d)
    manifest = read_manifest(d)
    art = next(a for a in manifest["artifacts"] if a["file"] == TFLITE)
    assert art["extra"]["rewrite"]["origin"]["3"] == [BROKEN]  # the depthwise conv is rewritten child 3
    assert len(break_activation_scale(d / TFLITE, art["extra"]["rewrite"]["origin"], BROKEN, 8.0)) == 2
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
    assert "first diverging head layer: features.bottleneck.encoder.4 (cosine" in (d / "report.md").read_text()
