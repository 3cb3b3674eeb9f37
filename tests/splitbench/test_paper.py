"""``bench split --paper``: the composition's arithmetic, the energy model's arithmetic and sources, and the report's
labels (measured / predicted / assumed / modelled), on synthetic figures; one slow end-to-end run on mini_resnet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bottlefit.cli import main
from bottlefit.splitbench import energy, paper
from bottlefit.splitbench.device import host_factor
from bottlefit.splitbench.links import PROFILES, LinkProfile
from bottlefit.splitbench.paper import Basis, DeviceTimes, Figure, Measured, PaperSource
from bottlefit.splitbench.split import _framed

LINK = LinkProfile("lte", "LTE", 5.85, 60.0, 0.1)


def measured(channels: int = 12) -> Measured:
    return Measured(channels=channels, images=4, jpeg_quality=95, jpeg_bytes=20000.0, jpeg_encode_host_ms=2.0,
                    wire="int8", wires={"int8": {"bytes": 10092.0, "encode_host_ms": 0.5, "decode_server_ms": 0.0},
                                        "zstd": {"bytes": 8000.0, "encode_host_ms": 1.0, "decode_server_ms": 0.25}},
                    head="rpi/head.int8.tflite", head_runtime="litert", head_host_ms=3.0, full_host_ms=100.0,
                    tail_server_ms=40.0, offload_server_ms=45.0, head_sha256="h" * 64, full_sha256="f" * 64,
                    raw_bytes=150528)


def times(board: str = "pi4") -> DeviceTimes:
    return DeviceTimes(board, head=Figure(20.0, Basis.PREDICTED, "head"),
                       full=Figure(1000.0, Basis.PREDICTED, "full"),
                       jpeg_encode=Figure(12.0, Basis.ASSUMED, "jpeg"), wire_encode=Figure(3.0, Basis.ASSUMED, "wire"))


# -- the energy model


def test_energy_data_cites_every_constant() -> None:
    c = energy.constants()
    assert set(c["boards"]) == {"pi4", "pi5"}
    for b in c["boards"].values():
        assert b["source"]["url"].startswith("https://") and b["source"]["author"] and b["source"]["title"]
        assert 0 < b["idle_w"] < b["load_all_cores_w"]
    assert c["radios"]["source"]["url"].startswith("https://") and "Huang" in c["radios"]["source"]["author"]
    assert set(c["link_radio"]) == set(PROFILES)  # every bench link has a radio model
    assert all(v in c["radios"] for v in c["link_radio"].values())
    lines = energy.citations()
    assert len(lines) == 3 and all("https://" in ln for ln in lines)


def test_board_busy_power_is_idle_plus_the_cores_share() -> None:
    b = energy.BoardPower("x", idle_w=2.0, load_all_cores_w=6.0, cores=4)
    assert b.busy_w(1) == pytest.approx(3.0)
    assert b.busy_w(4) == pytest.approx(6.0)
    assert b.busy_w(8) == pytest.approx(6.0)  # no more cores than the board has


def test_inference_energy_arithmetic() -> None:
    b = energy.BoardPower("x", idle_w=2.0, load_all_cores_w=6.0, cores=4)
    r = energy.RadioPower("r", alpha_up_mw_per_mbit=400.0, alpha_down_mw_per_mbit=50.0, beta_mw=1000.0,
                          promotion_ms=200.0, promotion_mw=1000.0, tail_ms=10000.0, tail_mw=1000.0)
    local = energy.inference_energy(b, device_ms=1000.0, wait_ms=0.0)
    assert (local.compute_j, local.wait_j, local.radio_j, local.total_j) == pytest.approx((3.0, 0.0, 0.0, 3.0))
    e = energy.inference_energy(b, device_ms=100.0, wait_ms=500.0, radio=r, up_ms=100.0, down_ms=100.0,
                                rate_mbit=5.0)
    # board: 3 W x 0.1 s + 2 W x 0.5 s; radio: up (400*5+1000) mW x 0.1 s + down (50*5+1000) mW x 0.1 s
    # + 1 W tail power x the 0.3 s of the wait not transferring
    assert e.compute_j == pytest.approx(0.3) and e.wait_j == pytest.approx(1.0)
    assert e.radio_j == pytest.approx(0.3 + 0.125 + 0.3)
    assert e.total_j == pytest.approx(0.3 + 1.0 + 0.725)
    assert e.connection_j == pytest.approx(0.2 + 10.0)  # reported beside, not in total_j


def test_the_5g_link_uses_the_lte_radio_model() -> None:
    assert energy.radio_for_link("5g") == energy.radio_for_link("lte")
    assert energy.radio_for_link("wifi").beta_mw < energy.radio_for_link("lte").beta_mw


# -- the composition


def test_compose_adds_device_network_and_server_per_mode() -> None:
    m, dev = measured(), times()
    rows = {r["mode"]: r for r in paper.compose(m, dev, [LINK])}
    assert rows["local"]["latency_ms"] == pytest.approx(1000.0)
    assert rows["local"]["network_ms"] == 0 and rows["local"]["payload_bytes"] == 0
    up = LINK.transfer_ms(_framed(20000 + paper.REQUEST_OVERHEAD_B))
    down = LINK.transfer_ms(_framed(paper.RESPONSE_B))
    assert rows["offload"]["network_ms"] == pytest.approx(120.0 + up + down)
    assert rows["offload"]["latency_ms"] == pytest.approx(12.0 + 120.0 + up + down + 45.0)
    up_s = LINK.transfer_ms(_framed(10092 + paper.REQUEST_OVERHEAD_B))
    assert rows["split"]["device_ms"] == pytest.approx(23.0)  # head + wire encoding
    assert rows["split"]["latency_ms"] == pytest.approx(23.0 + 120.0 + up_s + down + 40.0)
    assert rows["split"]["payload_bytes"] == 10092
    assert rows["split"]["device_basis"] == "predicted + assumed"
    assert rows["local"]["device_basis"] == "predicted" and rows["offload"]["device_basis"] == "assumed"
    pi4 = energy.board("pi4")
    assert rows["local"]["energy_j"] == pytest.approx(pi4.busy_w(1) * 1.0)


def test_ratios_and_headline_against_the_paper() -> None:
    rows = paper.compose(measured(), times(), [LINK])
    (r,) = paper.ratios(rows)
    by = {x["mode"]: x for x in rows}
    assert r["latency_vs_local_pct"] == pytest.approx(100 * (by["split"]["latency_ms"] / 1000.0 - 1))
    assert r["latency_vs_offload_pct"] == pytest.approx(
        100 * (by["split"]["latency_ms"] / by["offload"]["latency_ms"] - 1))
    assert r["energy_vs_local_pct"] == pytest.approx(100 * (by["split"]["energy_j"] / by["local"]["energy_j"] - 1))
    assert r["latency_vs_offload_pct_no_server"] == pytest.approx(100 * (
        (by["split"]["latency_ms"] - 40.0) / (by["offload"]["latency_ms"] - 45.0) - 1))
    h = paper.headline([r])
    assert "paper −89.0%" in h and "paper −55.0%" in h and "paper −49.0%" in h and "paper −37.0%" in h
    assert paper.signed(r["latency_vs_local_pct"]) in h


def test_device_time_labels() -> None:
    from bottlefit.emulation.devicetime import predict_ms

    f = host_factor("pi4")
    a = paper.assumed_ms(2.0, "pi4", "JPEG")
    assert a.basis is Basis.ASSUMED and a.value == pytest.approx(2.0 * f) and f"x {f:.2f}" in a.why
    m = measured()
    host = paper.host_times(m, "pi5")
    assert {host.head.basis, host.full.basis, host.jpeg_encode.basis, host.wire_encode.basis} == {Basis.ASSUMED}
    assert host.full.value == pytest.approx(100.0 * host_factor("pi5"))
    counted = paper.from_counts(m, "pi4", {"head": 5e6, "full": 9e9, "jpeg": 2e7})
    ref = predict_ms(9e9, "pi4", "onnxruntime", "fp32")
    # the device-time model's own figure and label, whatever its fit's state
    assert counted.full.value == pytest.approx(ref.ms) and str(counted.full.basis) == str(ref.basis)
    assert counted.head.value == pytest.approx(predict_ms(5e6, "pi4", "litert", "int8").ms)
    assert counted.jpeg_encode.value == pytest.approx(predict_ms(2e7, "pi4", "pillow", "fp32").ms)
    assert counted.wire_encode.basis is Basis.ASSUMED  # the wire encoder is not counted


def test_report_labels_every_kind_of_figure(tmp_path: Path) -> None:
    m = measured()
    dev = times()
    rows = paper.compose(m, dev, [LINK])
    src = PaperSource(12)
    counts = {"head": 5e6, "full": 9e9, "jpeg": 2e7}
    r = paper.assemble([src], [m], [tmp_path], [paper.device_record(12, dev, paper.count_key(m, "pi4"), counts)],
                       rows, [LINK], 1.0)
    assert r["devices"][0]["counts"] == counts and r["devices"][0]["key"]["head_sha256"] == "h" * 64
    assert r["untrained"] == [src.describe()]
    md = paper.markdown(r)
    for word in ("**measured**", "**predicted**", "**assumed**", "**modelled**", "(predicted)", "(assumed)",
                 "a model, not a measurement", "Untrained models", "Huang", "https://"):
        assert word in md, word
    assert "| 12 | pi4 | LTE | split | 23.0 (predicted + assumed) |" in md
    json.dumps(r)  # the result is JSON as it stands


def test_repredict_remakes_the_report_from_recorded_counts(tmp_path: Path) -> None:
    m = measured()
    counts = {"head": 5e6, "full": 9e9, "jpeg": 2e7}
    devs = [paper.from_counts(m, b, counts) for b in ("pi4", "pi5")]
    rows = [row for d in devs for row in paper.compose(m, d, [LINK])]
    records = [paper.device_record(12, d, paper.count_key(m, d.board), counts) for d in devs]
    r = json.loads(json.dumps(paper.assemble([PaperSource(12)], [m], [tmp_path], records, rows, [LINK], 1.0)))
    again = paper.repredict(r)
    assert [x["latency_ms"] for x in again["rows"]] == pytest.approx([x["latency_ms"] for x in r["rows"]])
    assert again["headline"] == r["headline"] and again["models"] == r["models"]
    # a record without counts is re-made from the host figures x factor
    r["devices"][0]["counts"] = None
    assert paper.repredict(r)["devices"][0]["full"]["basis"] == "assumed"


NCNN = {"head": "rpi/head.int8.ncnn.param", "runtime": "ncnn", "delegate": "cpu", "sha256": "n" * 64,
        "weights_sha256": "b" * 64}


def test_each_board_counts_its_profiles_default_head(tmp_path: Path) -> None:
    from bottlefit.targets.rpi.profiles import PROFILES as RPI_PROFILES

    rpi = tmp_path / "rpi"
    rpi.mkdir()
    names = ("head.int8.tflite", "head.fp32.tflite", "head.int8.onnx", "head.int8.ncnn.param", "head.int8.ncnn.bin")
    for i, name in enumerate(names):
        (rpi / name).write_bytes(bytes([i]))
    heads = paper.default_heads(tmp_path, ("pi4", "pi5", "pi3", "zero2"))
    assert set(heads) == {"pi4", "pi5", "pi3", "zero2"}
    for board, h in heads.items():
        p = RPI_PROFILES[board]
        assert (h["head"], h["runtime"], h["delegate"]) == (f"rpi/{p.model}", p.runtime, p.delegate)
        assert (h["head"], h["runtime"]) == ("rpi/head.int8.ncnn.param", "ncnn")  # every Pi's default today
        assert h["sha256"] == paper.sha256(rpi / "head.int8.ncnn.param")
        assert h["weights_sha256"] == paper.sha256(rpi / "head.int8.ncnn.bin")
    # an export without the ncnn head: the profile's cheapest int8 head that is there (ONNX Runtime u8 on the A72)
    (rpi / "head.int8.ncnn.param").unlink()
    h = paper.default_heads(tmp_path, ("pi4",))["pi4"]
    assert (h["head"], h["runtime"], h["delegate"]) == ("rpi/head.int8.onnx", "onnxruntime", "cpu-u8")
    assert "weights_sha256" not in h
    # a board without a Pi profile, or no rpi dir: the wire contract's head stands (nothing recorded)
    assert paper.default_heads(tmp_path, ("jetson",)) == {} and paper.default_heads(tmp_path / "no", ("pi4",)) == {}


def test_counts_and_keys_follow_the_boards_head() -> None:
    from bottlefit.emulation.devicetime import predict_ms

    m = measured()
    m.board_heads = {"pi4": NCNN}
    counts = {"head": 38e6, "full": 9e9, "jpeg": 2e7}
    ncnn = paper.from_counts(m, "pi4", counts)
    ref = predict_ms(38e6, "pi4", "ncnn", "int8")
    assert ncnn.head.value == pytest.approx(ref.ms) and str(ncnn.head.basis) == str(ref.basis) == "predicted"
    assert "head.int8.ncnn.param (ncnn)" in ncnn.head.why
    # pi5 has no recorded head: the contract's (LiteRT) is counted
    assert paper.from_counts(m, "pi5", counts).head.value == pytest.approx(predict_ms(38e6, "pi5", "litert",
                                                                                      "int8").ms)
    key = paper.count_key(m, "pi4")
    assert (key["head"], key["head_runtime"], key["head_sha256"], key["head_weights_sha256"]) == (
        "rpi/head.int8.ncnn.param", "ncnn", "n" * 64, "b" * 64)
    assert paper.count_key(m, "pi5")["head_sha256"] == "h" * 64
    assert paper.host_times(m, "pi4").head.basis is Basis.ASSUMED  # not counted: the contract head's host ms


def test_repredict_uses_each_boards_head_counts(tmp_path: Path) -> None:
    from bottlefit.emulation.devicetime import predict_ms

    m = measured()
    m.board_heads = {"pi4": NCNN, "pi5": {**NCNN, "sha256": "m" * 64}}
    per_board = {"pi4": {"head": 38e6, "full": 9e9, "jpeg": 2e7}, "pi5": {"head": 18e6, "full": 4e9, "jpeg": 1e7}}
    devs = [paper.from_counts(m, b, c) for b, c in per_board.items()]
    rows = [row for d in devs for row in paper.compose(m, d, [LINK])]
    records = [paper.device_record(12, d, paper.count_key(m, d.board), per_board[d.board], "", m.board_head(d.board))
               for d in devs]
    r = json.loads(json.dumps(paper.assemble([PaperSource(12)], [m], [tmp_path], records, rows, [LINK], 1.0)))
    assert r["models"][0]["board_heads"]["pi4"]["runtime"] == "ncnn"
    again = paper.repredict(r)
    for d in again["devices"]:
        ref = predict_ms(per_board[d["board"]]["head"], d["board"], "ncnn", "int8")
        assert d["head"]["value"] == pytest.approx(ref.ms) and d["head"]["basis"] == "predicted"
        assert d["head_file"]["head"] == "rpi/head.int8.ncnn.param"
    assert again["devices"][0]["head"]["value"] != pytest.approx(again["devices"][1]["head"]["value"])
    assert [x["latency_ms"] for x in again["rows"]] == pytest.approx([x["latency_ms"] for x in r["rows"]])
    md = paper.markdown(again)
    assert "| 12 | pi4 | rpi/head.int8.ncnn.param (ncnn) |" in md
    assert "| rpi/head.int8.tflite (litert) |" in md  # the contract head the payload was measured on


def test_counts_are_reused_from_an_earlier_result_of_the_same_artifacts(tmp_path: Path) -> None:
    m = measured()
    key = paper.count_key(m, "pi4")
    counts = {"head": 5e6, "full": 9e9, "jpeg": 2e7}
    earlier = tmp_path / "paper.json"
    earlier.write_text(json.dumps({"devices": [paper.device_record(12, times(), key, counts),
                                               paper.device_record(12, times(), None, None)]}))
    found = paper.earlier_counts(earlier)
    assert len(found) == 1
    assert paper.reuse(found, key) == counts
    assert paper.reuse(found, {**key, "full_sha256": "other"}) is None  # another artifact: counted again
    assert paper.reuse(found, paper.count_key(m, "pi5")) is None
    assert paper.earlier_counts(tmp_path / "missing.json") == []


def test_conv_macs_of_a_tiny_graph(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 3, 2, 2), np.float32), "w")
    fc = numpy_helper.from_array(np.zeros((8 * 4 * 4, 10), np.float32), "fc")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2]),
         helper.make_node("Flatten", ["y"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 10])], [w, fc])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    # conv: 8x4x4 outputs x (3x2x2) each; matmul: 10 outputs x 128 each
    assert paper.conv_macs(path) == 8 * 4 * 4 * 12 + 10 * 128


def test_paper_checkpoints_parsing(tmp_path: Path) -> None:
    assert [s.channels for s in paper.parse_sources(None)] == [12, 3]
    ck = tmp_path / "a.pt"
    ck.write_bytes(b"x")
    (s,) = paper.parse_sources(f"12={ck}")
    assert s.channels == 12 and s.checkpoint == ck and s.key().startswith("a-")
    from bottlefit.errors import UserError

    with pytest.raises(UserError, match="CHANNELS=PATH"):
        paper.parse_sources(str(ck))
    with pytest.raises(UserError, match="no such checkpoint"):
        paper.parse_sources(f"3={tmp_path / 'missing.pt'}")


def test_cli_refuses_a_board_without_power_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "split", "--paper", "--out", str(tmp_path), "--boards", "pi3"])
    assert rc == 2
    assert "--boards 'pi3'" in capsys.readouterr().err


@pytest.mark.slow
def test_paper_mode_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    """The whole --paper path (exports for rpi and onnx, host measurements, report) on mini_resnet, no counting."""
    from bottlefit.splitbench.links import parse_links

    opts = paper.PaperOptions(out=tmp_path / "out", sources=[PaperSource(4, arch="mini_resnet")], boards=("pi4",),
                              links=parse_links("lte,wifi"), images=2, workdir=tmp_path / "work", count=False)
    r = paper.run_paper(opts, lambda _m: None)
    paths = paper.write_report(opts.out, r)
    assert {p.name for p in paths} == {"paper.json", "paper.md", "paper_latency.png", "paper_energy.png"}
    assert len(r["rows"]) == 2 * 3 and len(r["ratios"]) == 2
    (m,) = r["models"]
    # the head the board profile runs, as run-head picks it
    assert m["head"] == "rpi/head.int8.ncnn.param" and m["jpeg_bytes"] > 0 and m["wire"] in m["wires"]
    assert all(d["head"]["basis"] == "assumed" for d in r["devices"])  # count=False: host x factor
    assert [d["head_file"] for d in r["devices"]] == [m["board_heads"]["pi4"]]
    assert m["board_heads"] == paper.default_heads(opts.workdir / "paper-export" / opts.sources[0].key(), ("pi4",))
    assert r["headline"].startswith("mini_resnet, up to")
