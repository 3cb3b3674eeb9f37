"""The export as explicit steps (bottlefit.pipeline.export): each target says up front what its build reads
(``Target.needs``), the pipeline's round step makes the int8 head once for every target, ``Target.build`` returns a
``BuildResult`` and leaves its (frozen) context as it was, and a target's executions start right after its build,
run beside parity, are collected when its rung is kept and cancelled when the rung moves on or the export fails.

On the untrained mini_resnet (4 bottleneck channels): seconds per build."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bottlefit.calibration.observers import ObserverKind
from bottlefit.exporter.artifact import Artifact, Layout, Precision, Role, Runtime, TensorSpec
from bottlefit.exporter.rounding import WeightRounding
from bottlefit.exporter.split import split
from bottlefit.pipeline import export as export_mod
from bottlefit.pipeline.export import _round_step, _Shared, export
from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ModelSource, ParityOptions
from bottlefit.pipeline.recipe import RECIPES, Recipe
from bottlefit.runtimes.execution import Execution, Status, Where
from bottlefit.targets import BuildContext, Emulate, Finished, Needs, get_target
from bottlefit.targets.jetson import JetsonOptions
from bottlefit.targets.onnx import OnnxOptions
from bottlefit.targets.rpi import RpiOptions

MINI = ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4)
# the fast recipe's int8 head measures 34.09 dB, the best recipe's 40.56 dB (tests/pipeline/test_ladder.py): a
# 37 dB gate moves the ladder on from fast to best
GATE_37 = ("head.int8.onnx:bottleneck.sqnr_db=37",)


def test_each_target_says_what_its_build_reads() -> None:
    onnx = get_target("onnx")
    assert onnx.needs(OnnxOptions()) == Needs(calibration=False, int8_head=False)
    assert onnx.needs(OnnxOptions(int8=True)) == Needs(calibration=True, int8_head=True)
    assert get_target("jetson").needs(JetsonOptions(profile="orin")) == Needs(calibration=True, int8_head=True)
    assert get_target("rpi").needs(RpiOptions()) == Needs(calibration=True, int8_head=True)
    with pytest.raises(ValueError, match="needs calibration=True"):
        Needs(calibration=False, int8_head=True)
    assert [get_target(n).emulates for n in ("onnx", "jetson", "rpi")] == [False, False, True]


@pytest.fixture(scope="module")
def mini() -> Any:
    from bottlefit.calibration.dataset import CalibrationSet
    from bottlefit.pipeline import source

    lm = source.load(MINI)
    sm = split(lm.model, lm.card)
    calib = CalibrationSet.builtin(lm.card, count=8, log=lambda m: None)
    held = CalibrationSet.builtin(lm.card, part="heldout", count=4, log=lambda m: None)
    return sm, calib, held


def _ctx(mini: Any, out: Path, options: OnnxOptions, int8_head: Any = None, rounding: Any = None) -> BuildContext:
    sm, calib, held = mini
    return BuildContext(sm, out, options, held, ObserverKind.MINMAX, calib if options.int8 else None, int8_head,
                        rounding, lambda m: None)


def test_build_returns_its_records_and_leaves_the_context_as_it_was(mini: Any, tmp_path: Path) -> None:
    target = get_target("onnx")
    fp32 = _ctx(mini, tmp_path / "fp32", OnnxOptions(triton=False))
    (tmp_path / "fp32").mkdir()
    before = dataclasses.replace(fp32)
    r = target.build(fp32)
    assert [(a.file, a.role, a.runtime, a.precision) for a in r.artifacts] == [
        ("head.onnx", Role.HEAD, Runtime.ONNXRUNTIME, Precision.FP32),
        ("tail.onnx", Role.TAIL, Runtime.ONNXRUNTIME, Precision.FP32)]
    assert r.calibration is None and r.rounding is None  # fp32 only: no calibration read, none recorded
    assert fp32 == before  # field by field, the same objects
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp32.rounding = None  # type: ignore[misc]

    # the round step: gptq on the 8 calibration images, once for every target of the export
    sm, calib, _ = mini
    shared = _Shared(lambda: calib, lambda: None)
    knobs = dataclasses.replace(RECIPES[Recipe.FAST], weight_rounding=WeightRounding.GPTQ)
    lines: list[str] = []
    head, rounding = _round_step(sm, calib, knobs, shared, lines.append)
    again, same = _round_step(sm, calib, knobs, shared, lines.append)
    assert again is head and same is rounding and len(shared.rounded) == 1  # made once, said twice
    assert head is not sm.head and rounding.method == WeightRounding.GPTQ and rounding.images == 8
    assert len(lines) == 2 * len(rounding.layers) and lines[0].startswith("weight rounding gptq: ")
    assert _round_step(sm, calib, RECIPES[Recipe.FAST], shared, lines.append) == (sm.head, None)

    (tmp_path / "int8").mkdir()
    int8 = _ctx(mini, tmp_path / "int8", OnnxOptions(int8=True, triton=False), head, rounding)
    r8 = target.build(int8)
    assert r8.calibration is calib and r8.rounding is rounding
    assert [a.file for a in r8.artifacts][:3] == ["head.onnx", "tail.onnx", "head.int8.onnx"]
    assert r8.artifacts[2].quantization["calibration"]["count"] == 8


def test_enums_keep_the_manifest_text() -> None:
    """StrEnum members are their strings: JSON and comparisons with the old strings are unchanged."""
    a = Artifact("h.onnx", "head", "onnxruntime", "int8", [TensorSpec("x", (1, 4), "float32", "")])
    assert (a.role, a.runtime, a.precision, a.inputs[0].layout) == (Role.HEAD, Runtime.ONNXRUNTIME,
                                                                     Precision.INT8, Layout.NONE)
    text = json.dumps(a.to_dict(), indent=2, sort_keys=True)
    assert '"role": "head"' in text and '"layout": ""' in text
    assert Artifact.from_dict(json.loads(text)) == a
    with pytest.raises(ValueError, match="'weights'"):
        Artifact("w.bin", "weights", "none", "int8")
    e = Execution("h.onnx", "onnxruntime", "emulated", "aarch64", True, "not run")
    assert (e.where, e.status, e.passed) == (Where.EMULATED, Status.NOT_RUN, False)


class _Recorded:
    """A Started whose collect/cancel are written to ``events``."""

    def __init__(self, events: list[str], tag: str) -> None:
        self.events, self.tag = events, tag

    def collect(self) -> list[Execution]:
        self.events.append(f"collect {self.tag}")
        return [Execution("head.int8.onnx", "onnxruntime", Where.EMULATED, "aarch64 test", True, Status.AGREES,
                          {"max_abs_lsb": 0.0}, f"recorded {self.tag}")]

    def cancel(self) -> None:
        self.events.append(f"cancel {self.tag}")


class _Spy:
    """The onnx target with its executions recorded: which rung's build they belong to, and when."""

    def __init__(self, events: list[str]) -> None:
        self.inner, self.events, self.builds = get_target("onnx"), events, 0
        self.name, self.options_type, self.emulates = "onnx", OnnxOptions, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def build(self, ctx: BuildContext) -> Any:
        self.builds += 1
        self.events.append(f"build {self.builds}")
        return self.inner.build(ctx)

    def start_execution(self, target_dir: Path, artifacts: list[Artifact], emulate: Emulate, log: Any) -> Any:
        self.events.append(f"start {self.builds}")
        return _Recorded(self.events, str(self.builds))


def _spied(monkeypatch: pytest.MonkeyPatch, events: list[str], fail_parity: bool = False) -> None:
    spy = _Spy(events)
    monkeypatch.setattr(export_mod, "get_target", lambda name: spy)
    real = export_mod.verify

    def verify(*args: Any, **kw: Any) -> Any:
        events.append("parity")
        if fail_parity:
            raise RuntimeError("parity broke")
        return real(*args, **kw)

    monkeypatch.setattr(export_mod, "verify", verify)


def _request(out: Path) -> ExportRequest:
    return ExportRequest(MINI, "onnx", out, OnnxOptions(int8=True, triton=False),
                         CalibrationOptions(count=16),
                         ParityOptions(count=8, tolerance=GATE_37, emulate=Emulate.parse("none")))


@pytest.mark.slow
def test_executions_run_beside_parity_and_stop_when_the_rung_moves_on(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    events: list[str] = []
    _spied(monkeypatch, events)
    result = export(_request(tmp_path / "out"), log=lambda m: None)
    # fast fails the 37 dB gate: its executions are cancelled; best passes: its executions are collected
    assert events == ["build 1", "start 1", "parity", "cancel 1", "build 2", "start 2", "parity", "collect 2"]
    assert result.verdict.passed
    report = json.loads((result.path / "report.json").read_text())
    emulated = [e for e in report["execution"] if e["where"] == "emulated"]
    assert [e["note"] for e in emulated] == ["recorded 2"]
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["recipe"]["taken"] == "best" and manifest["weight_rounding"]["method"] == "gptq"
    assert manifest["calibration"]["count"] == 16


def test_an_error_during_parity_cancels_the_executions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    events: list[str] = []
    _spied(monkeypatch, events, fail_parity=True)
    with pytest.raises(RuntimeError, match="parity broke"):
        export(_request(tmp_path / "out"), log=lambda m: None)
    assert events == ["build 1", "start 1", "parity", "cancel 1"]
    assert not (tmp_path / "out" / "onnx").exists()  # nothing half-written


def test_a_target_without_emulation_returns_finished_records(tmp_path: Path) -> None:
    assert get_target("onnx").start_execution(tmp_path, [], Emulate(), print).collect() == []
    spec = TensorSpec("input", (1, 3, 8, 8), "float32")
    qdq = Artifact("head.qdq.onnx", "head", "onnxruntime", "int8", [spec], [spec],
                   extra={"jetson": {"trt_version": "10.3.0", "profile": "orin"}})
    started = get_target("jetson").start_execution(tmp_path, [qdq], Emulate(), print)
    assert isinstance(started, Finished)
    [e] = started.collect()
    assert (e.artifact, e.runtime, e.where, e.status, e.gated) == ("head.qdq.onnx", Runtime.TENSORRT, Where.BOARD,
                                                                   Status.NOT_RUN, False)
    started.cancel()
    assert len(started.collect()) == 1  # cancelling a finished handle changes nothing
