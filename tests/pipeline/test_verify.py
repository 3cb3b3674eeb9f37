"""`bottlefit verify`: reproduces an export's verdict, verifies every target under OUT, catches a broken int8
artifact (naming the diverging layer) and refuses a tampered one."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bottlefit.cli import main
from bottlefit.exporter.manifest import MANIFEST, read_manifest, sha256_file, write_json
from bottlefit.runtimes.cpu import has_vnni, isa_label
from tests.helpers import clone_export


@pytest.fixture(scope="module")
def exported(r152_int8_export: Path) -> Path:
    return r152_int8_export


def values(report: dict) -> dict[tuple[str, str], float]:
    return {(c["artifact"], c["metric"]): c["value"] for c in report["checks"]}


@pytest.mark.slow
def test_fidelity_and_host_execution_are_reported_apart(exported: Path) -> None:
    report = json.loads((exported / "report.json").read_text())
    assert report["format_version"] == 2
    int8 = [c for c in report["checks"] if c["artifact"] == "head.int8.onnx"]
    assert int8 and all(c["kind"] == "fidelity" and "spec semantics" in c["semantics"] for c in int8)
    (host,) = [e for e in report["execution"] if e["artifact"] == "head.int8.onnx"]
    assert host["where"] == "host" and host["gated"] is False and host["isa"].startswith(platform.machine())
    assert host["status"] in ("agrees", "deviates") and 0.0 <= host["metrics"]["mismatch_fraction"] <= 1.0
    manifest = read_manifest(exported)
    assert manifest["parity"]["execution"] == report["execution"]
    md = (exported / "report.md").read_text()
    assert "## Fidelity (reference semantics" in md and "## Execution" in md


@pytest.mark.slow
def test_host_kernel_deviation_is_detected_and_labelled(exported: Path) -> None:
    """On x86 without VNNI, ONNX Runtime's fused u8s8 kernels saturate: the host run deviates from the
    artifact's reference semantics, the report says why and how to fix it, and the verdict does not change."""
    if platform.machine() != "x86_64" or has_vnni():
        pytest.skip(f"this host's int8 kernels do not saturate ({isa_label()}): nothing deviates to detect")
    report = json.loads((exported / "report.json").read_text())
    (host,) = [e for e in report["execution"] if e["artifact"] == "head.int8.onnx"]
    assert host["status"] == "deviates" and host["metrics"]["max_abs_lsb"] > 2.0
    assert host["metrics"]["sqnr_db_vs_reference"] < 30.0
    assert "VPMADDUBSW" in host["note"] and "reduce_range" in host["note"] and "avx2" in host["isa"]
    assert report["passed"] is True  # information, not a gate: no target of this export runs on this CPU


@pytest.mark.slow
def test_verify_dir_reproduces_the_export_verdict(exported: Path, tmp_path: Path, capsys) -> None:
    d = clone_export(exported, tmp_path / "onnx")
    before = json.loads((d / "report.json").read_text())
    rc = main(["verify", str(d), "--json"])
    after = json.loads(capsys.readouterr().out)
    assert rc == 0 and before["passed"] is True and after["passed"] is True
    b, a = values(before), values(after)
    assert set(a) == set(b) and ("head.int8.onnx", "bottleneck.sqnr_db") in a
    for key, v in b.items():
        assert a[key] == pytest.approx(v, abs=1e-6), key
    assert json.loads((d / "report.json").read_text())["checks"] == after["checks"]
    assert read_manifest(d)["parity"]["checks"] == after["checks"]  # the manifest carries the new verdict


@pytest.mark.slow
def test_verify_root_verifies_every_target(exported: Path, tmp_path: Path, capsys) -> None:
    clone_export(exported, tmp_path / "out" / "onnx")
    clone_export(exported, tmp_path / "out" / "onnx-copy")
    rc = main(["verify", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"PASS: {tmp_path / 'out' / 'onnx'}" in out and f"PASS: {tmp_path / 'out' / 'onnx-copy'}" in out


def break_wire_scale(d: Path) -> dict:
    """Scale the int8 head's bottleneck (wire) grid by 10 and re-hash it in the manifest: a consistent manifest,
    only the numbers are wrong. Returns the manifest."""
    manifest = read_manifest(d)
    art = next(a for a in manifest["artifacts"] if a["file"] == "head.int8.onnx")
    tensor = "bottleneck"
    model = onnx.load(str(d / "head.int8.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
             and n.input[0] in (tensor, tensor + "_QuantizeLinear_Input"))
    init = next(i for i in model.graph.initializer if i.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(10), init.name))
    onnx.save(model, str(d / "head.int8.onnx"))
    art["sha256"] = sha256_file(d / "head.int8.onnx")
    write_json(d / MANIFEST, manifest)
    return manifest


@pytest.mark.slow
def test_broken_activation_scale_fails_and_names_the_layer(exported: Path, tmp_path: Path) -> None:
    d = clone_export(exported, tmp_path / "onnx")
    manifest = break_wire_scale(d)
    art = next(a for a in manifest["artifacts"] if a["file"] == "head.int8.onnx")
    # the head's last layer: the layers before it stay healthy, so the diagnosis has to find where it breaks
    broken_module = art["quantization"]["tensor_modules"]["bottleneck"]
    assert broken_module == "bottleneck.encoder.6"

    assert main(["verify", str(d)]) == 1
    report = json.loads((d / "report.json").read_text())
    assert report["passed"] is False
    failed = {c["metric"] for c in report["checks"] if not c["passed"]}
    assert failed and all(c["artifact"] == "head.int8.onnx" for c in report["checks"] if not c["passed"])
    diag = report["diagnosis"]["head.int8.onnx"]
    assert diag["first_diverging_layer"] == "bottleneck.encoder.6" == broken_module
    layers = {r["module"]: r for r in diag["layers"]}
    assert layers["bottleneck.encoder.3"]["sqnr_db"] > 30 > 25 > layers["bottleneck.encoder.6"]["sqnr_db"]
    # a failing Q/DQ head gets its error budget unasked: the wire's grid alone loses what the head loses
    budget = {r["grids"]: r for r in report["budget"]["head.int8.onnx"]}
    wire = next(r for g, r in budget.items() if g.endswith("(wire)"))
    assert wire["sqnr_db"] == pytest.approx(budget["all"]["sqnr_db"], abs=1.0)
    assert wire["sqnr_db"] < 25 < 30 < min(r["sqnr_db"] for g, r in budget.items() if g not in ("all", wire["grids"]))


@pytest.mark.slow
def test_tampered_file_is_refused(exported: Path, tmp_path: Path, capsys) -> None:
    d = clone_export(exported, tmp_path / "onnx")
    p = d / "head.int8.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    rc = main(["verify", str(d)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and str(p) in err and "sha256" in err


def test_diagnosis_says_what_was_compared_when_no_layer_stands_out() -> None:
    from bottlefit.exporter.artifact import Artifact
    from bottlefit.parity.verify import diagnosis_summary

    art = Artifact("head.int8.onnx", "head", "onnxruntime", "int8")
    rows = [{"module": "bottleneck.encoder.0", "cosine": 0.9995, "sqnr_db": 31.0},
            {"module": "bottleneck.encoder.4", "cosine": 0.9991, "sqnr_db": 27.5}]
    text = diagnosis_summary(art, rows, None, 0.999, 25.0)
    assert "None" not in text and "compared 2 layers" in text and "spec semantics" in text
    assert "worst: bottleneck.encoder.4, cosine 0.9991, SQNR 27.5 dB" in text
    assert "None" not in diagnosis_summary(art, [], None, 0.999, None)
    first = diagnosis_summary(art, rows, rows[1], 0.9993, None)
    assert first.startswith("first diverging head layer: bottleneck.encoder.4 (cosine 0.9991")


@pytest.mark.slow
def test_export_overrides_are_named_in_the_verdict(exported: Path) -> None:
    report = json.loads((exported / "report.json").read_text())
    assert report["overrides"] == [
        {"artifact": "head.int8.onnx", "metric": m, "value": v, "source": "export"}
        for m, v in (("logits.top1_agreement", 0.0), ("bottleneck.cosine", 0.98), ("bottleneck.sqnr_db", 25.0))]
    assert "head.int8.onnx:bottleneck.sqnr_db=25 (set by `export --tolerance`)" in (exported / "report.md").read_text()


@pytest.mark.slow
def test_edited_manifest_overrides_are_named_and_strict_ignores_them(exported: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest is not signed: loosening its recorded overrides makes a broken head pass a plain verify, which
    says so; `verify --strict` judges by the built-in gates and fails it."""
    d = clone_export(exported, tmp_path / "onnx")
    manifest = break_wire_scale(d)
    loose = ["head.int8.onnx:bottleneck.cosine=-1", "head.int8.onnx:bottleneck.sqnr_db=-1000",
             "head.int8.onnx:logits.top1_agreement=0"]
    manifest["parity"]["tolerance_overrides"] = loose
    write_json(d / MANIFEST, manifest)

    assert main(["verify", str(d)]) == 0
    out = capsys.readouterr().out
    assert ("note: tolerance overrides in force instead of the built-in gates: " + ", ".join(loose) +
            " (read from manifest.json, set at export; `verify --strict` ignores them)") in out
    report = json.loads((d / "report.json").read_text())
    assert [(o["metric"], o["source"]) for o in report["overrides"]] == [
        ("bottleneck.cosine", "manifest"), ("bottleneck.sqnr_db", "manifest"), ("logits.top1_agreement", "manifest")]

    assert main(["verify", str(d), "--strict"]) == 1
    assert f"{d}: --strict: the built-in gates, not the manifest's overrides" in capsys.readouterr().err
    report = json.loads((d / "report.json").read_text())
    assert report["overrides"] == [] and report["passed"] is False
    assert {c["metric"] for c in report["checks"] if not c["passed"]} >= {"bottleneck.sqnr_db"}
    # what the export was given stays recorded as such
    assert read_manifest(d)["parity"]["tolerance_overrides"] == loose

    assert main(["verify", str(d), "--strict", "--tolerance", "bottleneck.cosine=0.5"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_newer_manifest_is_refused(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = clone_export(exported, tmp_path / "onnx")
    manifest = read_manifest(d)
    manifest["format_version"] = 99
    write_json(d / MANIFEST, manifest)
    assert main(["verify", str(d)]) == 2
    err = capsys.readouterr().err
    assert err == (f"bottlefit: error: {d / MANIFEST}: manifest format_version 99 is newer than this bottlefit "
                   "reads (up to 2); upgrade bottlefit\n")
