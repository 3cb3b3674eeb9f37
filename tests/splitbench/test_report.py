"""``bench split``'s report from a result written here: the table's rows and figures, the markdown's ratios and
link text, the files written (PNG bytes the same for the same result)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bottlefit.splitbench.report import markdown, table, write_report

LINKS = [{"name": "3g", "label": "3G", "rate_mbit": 2.0, "rtt_ms": 150.0, "loss_pct": 0.0},
         {"name": "5g", "label": "5G", "rate_mbit": 100.0, "rtt_ms": 20.0, "loss_pct": 0.5}]


def row(mode: str, link: str, median: float, payload: float) -> dict[str, Any]:
    rate = next(p["rate_mbit"] for p in LINKS if p["name"] == link)
    rtt = next(p["rtt_ms"] for p in LINKS if p["name"] == link)
    return {"mode": mode, "link": link, "rate_mbit": rate, "rtt_ms": rtt, "latency_ms_median": median,
            "latency_ms_p95": median * 1.25, "device_ms_median": 1.234, "device_basis": "predicted",
            "network_ms_median": median - 2.0,
            "server_ms_median": 0.5, "payload_bytes_median": payload,
            "link_bytes_median": payload + 700 if payload else 0.0, "failed": 0,
            "link_model_ms_median": 2 * rtt + 1.0}


def result(setup_kind: str = "analytic") -> dict[str, Any]:
    rows = [row("split", "5g", 30.0, 3364.0), row("local", "3g", 50.0, 0.0), row("offload", "3g", 900.0, 20_000.0),
            row("split", "3g", 400.0, 3364.0), row("local", "5g", 50.0, 0.0), row("offload", "5g", 60.0, 20_000.0)]
    return {"schema": "bottlefit.splitbench.split/1", "headline": "3G, device pi4: split 400 ms", "links": LINKS,
            "rows": rows, "model": {"source": "export out", "arch": "mini_resnet"}, "images": 3, "repeats": 1,
            "wall_s": 12.5, "link_setup": {"kind": setup_kind}, "link_setup_text": "the analytic model",
            "device": {"name": "pi4", "factor": 6.0, "basis": "measured", "how": "host ms x 6", "label": "x6 assumed",
                       "modes": {"split": {"basis": "predicted", "why": "head counted on cortex-a72"}}},
            "wire": "int8", "jpeg_quality": 95,
            "accuracy": {"images": 3, "against": "agreement", "local": 100.0, "offload": 66.667, "split": 100.0,
                         "jpeg_quality": 95, "jpeg_bytes_mean": 20_000.4, "head": "onnx/head.int8.onnx",
                         "head_runtime": "onnxruntime",
                         "wires": {"int8": {"bytes": 3364.0, "encode_ms_device": 0.25, "decode_ms_server": 0.05}}},
            "ratios": [{"link": "3g", "split_vs_local_pct": 700.0, "split_vs_offload_pct": -55.56,
                        "payload_smaller_pct": 83.18},
                       {"link": "5g", "split_vs_local_pct": -40.0, "split_vs_offload_pct": -50.0,
                        "payload_smaller_pct": 83.18}],
            "tradeoff": {"skipped": "--no-tradeoff"}}


def test_table_rows_sorted_by_mode_then_rate_with_their_figures() -> None:
    lines = table(result()).splitlines()
    assert len(lines) == 2 + 6
    assert [tuple(c.strip() for c in ln.split("|")[1:3]) for ln in lines[2:]] == [
        ("local", "3G"), ("local", "5G"), ("offload", "3G"), ("offload", "5G"), ("split", "3G"), ("split", "5G")]
    # median, p95 (1 decimal), device (2) and how it was obtained, network (1), server (2), bytes (0), failures
    assert lines[-1] == "| split | 5G | 30.0 | 37.5 | 1.23 | predicted | 28.0 | 0.50 | 3364 | 4064 | 0 |"


def test_markdown_states_ratios_links_and_byte_counting() -> None:
    md = markdown(result())
    assert md.startswith("# bottlefit bench split\n\n**3G, device pi4: split 400 ms**")
    assert "| 3G | +700.0% | -55.6% | -83.2% |" in md  # payload vs JPEG: smaller is negative
    assert "| 5G | -40.0% | -50.0% | -83.2% |" in md
    assert "  - split: **predicted**: head counted on cortex-a72" in md  # each mode says how its device ms was had
    assert "| 5G | 100 | 20 | 0.5 |" in md
    assert "offload/3G 301.0 ms" in md and "split/5G 41.0 ms" in md and "local/" not in md
    assert "int8 3364 B, 0.2 ms + 0.1 ms" in md  # one decimal, as format() rounds 0.25 and 0.05
    assert "plus 66 B of headers per 1448-B frame" in md and "veth" not in md
    assert "veth, both directions" in markdown(result("netns"))
    assert "trade-off: not run (--no-tradeoff)" in md
    traded = {**result(), "tradeoff": {"rows": [{}, {}, {}]}}
    assert "see tradeoff.md (3 bottleneck widths)" in markdown(traded)


def test_write_report_writes_four_files_deterministically(tmp_path: Path) -> None:
    r = result()
    files = write_report(tmp_path / "a", r)
    assert sorted(f.name for f in files) == ["split.json", "split.md", "split_bytes.png", "split_latency.png"]
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000
    assert json.loads((tmp_path / "a" / "split.json").read_text()) == r
    assert (tmp_path / "a" / "split.md").read_text() == markdown(r)
    again = write_report(tmp_path / "b", r)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]  # no timestamps in the PNGs
    assert not [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("with_triton", [False, True])
def test_plots_take_the_triton_mode_when_present(tmp_path: Path, with_triton: bool) -> None:
    r = result()
    if with_triton:
        r["rows"] += [{**x, "mode": "split_triton", "latency_ms_median": x["latency_ms_median"] + 5}
                      for x in r["rows"] if x["mode"] == "split"]
    files = write_report(tmp_path, r)
    assert all(f.stat().st_size > 0 for f in files)
    assert ("| split_triton | 3G |" in (tmp_path / "split.md").read_text()) is with_triton
