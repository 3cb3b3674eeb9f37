"""The device-time model (bottlefit.emulation.devicetime): its arithmetic, its one data file (boards.json: sources,
counts and the fit recomputed from them), and ``bench split``'s device labels (measured / predicted / extrapolated /
assumed). The end-to-end run counts a tiny untrained model under qemu and skips with EmulationUnavailable's line
where the tools are missing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bottlefit.bench.device import DEVICES, DevicePlan, encode_ms, host_factor, read_timings
from bottlefit.emulation import devicetime
from bottlefit.emulation.arm64 import CORES
from bottlefit.emulation.devicetime import Basis, predict_ms
from bottlefit.errors import UserError


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(devicetime.DATA.read_text())


def test_ms_is_instructions_over_clock_times_ipc() -> None:
    # 1.8 G instructions at 1.8 GHz and IPC 1 take one second; IPC 0.5 doubles it; 4 threads at x3 divide by 3
    assert devicetime.ms_from(1.8e9, 1.8, 1.0) == pytest.approx(1000.0)
    assert devicetime.ms_from(1.8e9, 1.8, 0.5) == pytest.approx(2000.0)
    assert devicetime.ms_from(1.8e9, 1.8, 1.0, 3.0) == pytest.approx(1000.0 / 3)
    assert devicetime.row_ipc(1.8e9, 1.8, 1000.0) == pytest.approx(1.0)


def test_predict_ms_uses_the_board_clock_and_the_fitted_ipc(doc: dict) -> None:
    for name in ("pi4", "pi5", "pi3", "zero2"):
        b = doc["boards"][name]
        for prec in ("fp32", "int8"):
            fit = doc["fit"]["ipc"]["ncnn"][b["core"]][prec]["ipc"]
            p = predict_ms(100e6, name, "ncnn", prec)
            assert p.ms == pytest.approx(100e6 / (b["clock_ghz"] * 1e6 * fit))
            assert p.basis is Basis.PREDICTED and "fitted on" in p.why
    # another runtime: the same core's ncnn IPC, flagged as an extrapolation
    ort = predict_ms(100e6, "pi4", "onnxruntime", "int8")
    assert ort.ms == pytest.approx(predict_ms(100e6, "pi4", "ncnn", "int8").ms)
    assert ort.basis is Basis.EXTRAPOLATED and "extrapolation" in ort.why


def test_threads_divide_by_the_fitted_speedup(doc: dict) -> None:
    one = predict_ms(100e6, "pi4", "ncnn", "fp32")
    four = predict_ms(100e6, "pi4", "ncnn", "fp32", threads=4)
    speed = doc["fit"]["threads"]["cortex-a72"]["4"]["speedup"]
    assert 1.0 < speed <= 4.0
    assert four.ms == pytest.approx(one.ms / speed)
    with pytest.raises(UserError, match="no published 3-thread timings"):
        predict_ms(100e6, "pi4", "ncnn", "fp32", threads=3)
    with pytest.raises(UserError, match="unknown board 'pi9'"):
        predict_ms(100e6, "pi9", "ncnn", "fp32")
    with pytest.raises(UserError, match="finite count"):
        predict_ms(float("nan"), "pi4", "ncnn", "fp32")


def test_the_data_file_is_one_consistent_source(doc: dict) -> None:
    cpus = {c.cpu for c in CORES.values()}
    for name, b in doc["boards"].items():
        assert b["core"] in cpus, name
        if b["profile"] is not None:  # a bottlefit profile emulates this board on the same core
            assert CORES[b["profile"]].cpu == b["core"]
    for r in doc["published"]:
        src = doc["sources"][r["source"]]
        assert src["repository"] and src["path"] and len(src["commit"]) == 40
        assert r["board"] in doc["boards"] and r["model"] in doc["models"] and r["ms"] > 0
    assert doc["counted_with"]["ncnn_wheel"].startswith("ncnn-1.0.20250503")
    # every core a Pi board uses has counts for >= 8 models per precision it was fitted on
    for core in {b["core"] for b in doc["boards"].values()}:
        fits = doc["fit"]["ipc"]["ncnn"][core]
        assert fits["fp32"]["models"] >= 8 and fits["fp32"]["basis"] == "predicted"
        assert fits["int8"]["models"] >= 3


def test_the_stored_fit_is_recomputed_from_the_stored_counts(doc: dict) -> None:
    again = devicetime.fit(doc)

    def close(a: object, b: object) -> None:
        if isinstance(a, dict):
            assert isinstance(b, dict) and set(a) == set(b)
            for k in a:
                close(a[k], b[k])
        elif isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b)
        elif isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-6, abs=1e-4)
        else:
            assert a == b

    close(again, doc["fit"])
    # leave-one-model-out by hand for one row: the A72 fp32 rows without squeezenet predict squeezenet's
    rows = [r for r in doc["published"] if r["threads"] == 1 and r["precision"] == "fp32"
            and doc["boards"][r["board"]]["core"] == "cortex-a72"
            and r["model"] in doc["counts"]["ncnn"]["cortex-a72"]]
    ipc = {(r["board"], r["model"]): devicetime.row_ipc(doc["counts"]["ncnn"]["cortex-a72"][r["model"]],
                                                       doc["boards"][r["board"]]["clock_ghz"], r["ms"]) for r in rows}
    others = devicetime.geomean([v for (_, m), v in ipc.items() if m != "squeezenet"])
    pub = next(r["ms"] for r in rows if r["board"] == "pi4" and r["model"] == "squeezenet")
    n = doc["counts"]["ncnn"]["cortex-a72"]["squeezenet"]
    assert 100 * abs(devicetime.ms_from(n, 1.8, others) / pub - 1) == pytest.approx(
        abs(ipc[("pi4", "squeezenet")] / others - 1) * 100)


def test_bench_devices_come_from_the_data_file(doc: dict) -> None:
    for name in ("pi4", "pi5", "pi3", "zero2"):
        d, b = DEVICES[name], doc["boards"][name]
        assert d.board == name and d.factor is None
        assert f"{b['clock_ghz']:g} GHz" in d.basis
    # the uncounted wire encoder: pi4's stated factor scaled by clock x IPC of the other cores
    assert host_factor("pi4") == pytest.approx(6.0)
    assert host_factor("zero2") > host_factor("pi3") > host_factor("pi4") > host_factor("pi5")


def test_labels_without_emulation() -> None:
    host = DevicePlan(DEVICES["host"])
    assert host.ms("local", 2.0) == 2.0 and host.basis("split") is Basis.MEASURED
    from dataclasses import replace

    pi4x = DevicePlan(replace(DEVICES["pi4"], factor=5.0))
    assert pi4x.ms("offload", 2.0) == 10.0 and pi4x.basis("offload") is Basis.ASSUMED
    assert encode_ms(DEVICES["host"], "int8", 1.5).basis is Basis.MEASURED
    assert encode_ms(DEVICES["pi4"], "int8", 1.5).basis is Basis.ASSUMED
    # a board's counted encoder: predicted from its instructions (Python at ncnn's IPC: extrapolated), not host ms
    counted = encode_ms(DEVICES["pi4"], "context", 1.5, 5.44e6)
    assert counted.basis is Basis.EXTRAPOLATED
    assert counted.ms == pytest.approx(predict_ms(5.44e6, "pi4", "python", "fp32").ms)
    assert encode_ms(replace(DEVICES["pi4"], factor=5.0), "context", 1.5, 5.44e6).ms == pytest.approx(7.5)
    # a counted plan: split = head + encoder, labelled by its weakest part
    plan = DevicePlan(DEVICES["pi4"], parts={
        "local": predict_ms(9e6, "pi4", "onnxruntime", "fp32"), "offload": predict_ms(1e6, "pi4", "pillow", "fp32"),
        "split_head": devicetime.measured(3.0, "run-head"), "split_encode": predict_ms(1e5, "pi4", "ncnn", "fp32")})
    assert plan.basis("local") is Basis.EXTRAPOLATED and plan.basis("split") is Basis.PREDICTED
    assert plan.ms("split", 99.0) == pytest.approx(3.0 + plan.parts["split_encode"].ms)


def test_device_timings_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text('{"model": "head.int8.onnx"}')
    with pytest.raises(UserError, match="no positive \"median_ms\""):
        read_timings(bad)
    with pytest.raises(UserError, match="cannot read it as JSON"):
        read_timings(tmp_path / "missing.json")
    bad.write_text('{"model": "head.int8.onnx", "runtime": "onnxruntime", "median_ms": 4.5, "runs": 50}')
    t = read_timings(bad)
    assert (t.median_ms, t.model, t.threads) == (4.5, "head.int8.onnx", None)
    assert t.describe() == "run-head --json on the board: head.int8.onnx (onnxruntime, ? thread(s), median of 50 runs)"


@pytest.fixture(scope="module")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    out = tmp_path_factory.mktemp("devbench") / "export"
    export(ExportRequest(ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4), "onnx", out,
                         OnnxOptions(int8=True), parity=ParityOptions(emulate=Emulate.parse("none"))))
    return out


def test_bench_split_on_a_pi_labels_every_device_figure(export_root: Path, tmp_path: Path) -> None:
    """--device pi4 with the board's own run-head --json: the head measured, the whole model, JPEG and the raw wire's
    board encoder counted under emulation (ONNX Runtime / Pillow / numpy at ncnn's IPC: extrapolated)."""
    from bottlefit.cli import main
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot
    from bottlefit.emulation.cost import ensure_plugin

    try:
        ensure_sysroot(), ensure_plugin()
    except EmulationUnavailable as e:
        pytest.skip(str(e))
    timings = tmp_path / "run-head.json"
    timings.write_text(json.dumps({"model": "head.int8.onnx", "runtime": "onnxruntime", "threads": 1, "runs": 20,
                                   "median_ms": 4.25}))
    out = tmp_path / "report"
    rc = main(["bench", "split", "--out", str(out), "--quick", "--no-tradeoff", "--export", str(export_root),
               "--links", "5g", "--image-count", "2", "--accuracy-image-count", "2", "--wire", "raw", "--board", "pi4",
               "--device-timings", str(timings)])
    assert rc == 0
    r = json.loads((out / "split.json").read_text())
    parts = r["device"]["parts"]
    assert {k: v["basis"] for k, v in parts.items()} == {
        "local": "extrapolated", "offload": "extrapolated", "split_head": "measured", "split_encode": "extrapolated"}
    assert parts["split_head"]["ms"] == 4.25
    assert r["device"]["counts"]["full.onnx"]["instructions"] > 0 and r["device"]["counts"]["jpeg"]["instructions"] > 0
    rows = {x["mode"]: x for x in r["rows"]}
    assert rows["local"]["device_basis"] == "extrapolated" and rows["split"]["device_basis"] == "extrapolated"
    assert r["device"]["counts"]["wire"]["instructions"] > 0
    raw = r["accuracy"]["wires"]["raw"]  # the wire asked for: its board encoder counted, and that count used
    assert raw["encode_instructions"] == r["device"]["counts"]["wire"]["instructions"]
    assert raw["encode_basis"] == "extrapolated"
    assert raw["encode_ms_device"] == pytest.approx(parts["split_encode"]["ms"])
    assert r["accuracy"]["wires"]["int8"]["encode_instructions"] is None  # not asked for: not counted
    assert rows["local"]["device_ms_median"] == pytest.approx(parts["local"]["ms"])
    assert rows["split"]["device_ms_median"] == pytest.approx(4.25 + parts["split_encode"]["ms"])
    md = (out / "split.md").read_text()
    assert "**extrapolated**" in md and "split_head 4.25 ms measured: run-head --json" in md
    assert "| device basis |" in md and "| local | 5G |" in md


@pytest.mark.parametrize("args, needle", [
    (["--device-timings", "t.json"], "--device-timings needs --board pi4|pi5|pi3|zero2"),
    (["--board", "pi4", "--device-timings", "missing.json"], "--device-timings missing.json: cannot read it"),
    (["--board", "pi4", "--device-factor", "0"], "--device-factor 0.0: must be > 0"),
])
def test_bad_device_flags_are_one_line_exit_2(args: list[str], needle: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from bottlefit.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "split", "--out", str(tmp_path / "r"), "--no-tradeoff", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and needle in err
    assert not (tmp_path / "r").exists()


def _conv_param(path: Path, cout: int) -> Path:
    """An ncnn model of one 3x3 conv 16 -> cout on 32x32 (weights come from DataReaderFromEmpty: zeros)."""
    path.write_text("7767517\n2 2\nInput data 0 1 data 0=32 1=32 2=16\n"
                    f"Convolution conv 1 1 data out 0={cout} 1=3 4=1 5=1 6={cout * 16 * 9}\n")
    return path


def test_benchncnn_counting_scales_with_the_work(tmp_path: Path) -> None:
    """bottlefit.emulation.cost.ncnn_bench_instructions (what the fit counts): 4x the output channels, 2.5 to
    4.5x the guest instructions of one inference, on the A72 under emulation."""
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot
    from bottlefit.emulation.cost import ensure_plugin, ncnn_bench_instructions

    try:
        sysroot, _ = ensure_sysroot(), ensure_plugin()
    except EmulationUnavailable as e:
        pytest.skip(str(e))
    small, big = (ncnn_bench_instructions(sysroot, CORES["pi4"], _conv_param(tmp_path / f"c{c}.param", c),
                                          (32, 32, 16)) for c in (32, 128))
    assert small > 32 * 32 * 32 * 16 * 9 / 8  # >= an eighth of the direct MACs (4 NEON lanes, winograd)
    assert 2.5 < big / small < 4.5, (small, big)  # 4x the MACs; the input transform is shared


def test_bench_split_counts_the_head_the_board_runs(tmp_path: Path) -> None:
    """--device pi4 on an export with an rpi/ bundle counts the board profile's default head (ncnn int8), from OUT
    or OUT/rpi; --head, or an export without rpi/, keeps the wire contract's head."""
    from bottlefit.bench.split import device_head

    rpi = tmp_path / "rpi"
    rpi.mkdir()
    for i, name in enumerate(("head.int8.tflite", "head.int8.onnx", "head.int8.ncnn.param", "head.int8.ncnn.bin")):
        (rpi / name).write_bytes(bytes([i]))
    contract = (rpi / "head.int8.tflite", "litert")
    assert device_head(tmp_path, "pi4", None, *contract) == (rpi / "head.int8.ncnn.param", "ncnn")
    assert device_head(rpi, "pi5", None, *contract) == (rpi / "head.int8.ncnn.param", "ncnn")
    assert device_head(tmp_path, "pi4", "rpi/head.int8.tflite", *contract) == contract
    onnx_only = tmp_path / "o"
    (onnx_only / "onnx").mkdir(parents=True)
    assert device_head(onnx_only, "pi4", None, onnx_only / "onnx" / "head.int8.onnx", "onnxruntime") == (
        onnx_only / "onnx" / "head.int8.onnx", "onnxruntime")
