"""`bench split --server triton`: the split mode through a real tritonserver (the ensemble) beside `bottlefit
serve`, in one run, on the same images and frames. Skipped where no Triton server can be had."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bottlefit.cli import main


@pytest.mark.slow
def test_bench_split_through_triton_too(mini_export: Path, tmp_path: Path) -> None:
    from bottlefit.serve.triton_server import TritonUnavailable, ensure_server

    try:
        ensure_server()
    except TritonUnavailable as e:
        pytest.skip(f"no Triton server here: {e}")
    out = tmp_path / "report"
    rc = main(["bench", "split", "--out", str(out), "--quick", "--no-tradeoff", "--export", str(mini_export),
               "--links", "5g", "--image-count", "3", "--accuracy-image-count", "3", "--wire", "context",
               "--link-model", "analytic", "--server", "triton"])
    assert rc == 0
    r = json.loads((out / "split.json").read_text())
    rows = {row["mode"]: row for row in r["rows"]}
    assert sorted(rows) == ["local", "offload", "split", "split_triton"]
    s, t = rows["split"], rows["split_triton"]
    assert t["requests"] == s["requests"] == 3 and t["failed"] == 0
    assert t["payload_bytes_median"] == s["payload_bytes_median"] > 0  # the same frames to either server
    assert t["top1_bench_images"] == s["top1_bench_images"]  # lossless: the same answers
    checks = {c["mode"]: c for c in r["checks"]}
    assert checks["split_triton"]["payload_matches_relay"]  # what the relay saw is what the client sent
    assert "split_triton" in (out / "split.md").read_text()


def test_bench_split_triton_needs_a_coded_wire(tmp_path: Path, capsys) -> None:
    assert main(["bench", "split", "--out", str(tmp_path), "--server", "triton", "--wire", "int8"]) == 2
    assert "coded wires" in capsys.readouterr().err
