"""rpi board profiles as data: the default head is the cheapest measured int8 head, the choice reaches the CLI
options, the manifest's record and golden.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bottlefit.errors import UserError
from bottlefit.targets import options_from
from bottlefit.targets.jetson import TARGET as JETSON
from bottlefit.targets.rpi import TARGET, RpiOptions
from bottlefit.targets.rpi.profiles import (
    COSTS_SCHEMA,
    DEFAULT,
    HEADS,
    NOT_KERNEL_FEATURES,
    ORT_CONFIG,
    PROFILES,
    REFERENCE,
    get_profile,
    make_profiles,
    read_costs,
)


def test_every_profile_defaults_to_its_cheapest_measured_int8_head() -> None:
    from bottlefit.emulation.devicetime import boards

    assert list(PROFILES) == [b.profile for b in boards() if b.profile]  # every emulated Pi has a profile
    for p in PROFILES.values():
        int8 = {k: v for k, v in p.costs.items() if "int8" in k}
        assert p.costs[p.default_key] == min(int8.values()) and REFERENCE in p.costs
        assert p.ratio() is not None and p.ratio() < 1.0  # cheaper than fp32 TFLite on its own core
        assert p.dotprod == (p.core == "cortex-a76")
        rec = p.record()
        assert rec["cost_command"].startswith("PYTHONPATH=. .venv/bin/python bench/bench_pi_cost.py")
        assert rec["why"] and rec["costs_minstr_per_inference"] == p.costs
    # the Pi 4 finding: int8 + XNNPACK costs more than fp32 on the A72, and is not the default there
    pi4 = PROFILES["pi4"]
    assert pi4.ratio("head.int8.tflite/xnnpack") > 1.5 and pi4.default_key != "head.int8.tflite/xnnpack"
    # the bar: the default head at most 0.55x fp32 TFLite + XNNPACK on every core; ncnn's int8 head is
    # the cheapest everywhere, and the only one under the bar on the A72 and A53 (ONNX Runtime u8: 0.59x, 0.62x)
    for p in PROFILES.values():
        assert p.default_key == "head.int8.ncnn.param/cpu" and p.runtime == "ncnn" and p.ratio() <= 0.55, p.name
        if not p.dotprod:
            assert p.ratio("head.int8.onnx/cpu-u8") > 0.55


def test_onnxruntime_kernel_choice_per_core_is_the_measured_cheaper_one() -> None:
    """Without the dot product (A72, A53) ONNX Runtime's uint8 kernels (session.qdqisint8allowed=0) retired fewer
    instructions than its int8 ones on the same file; the A76's int8 dot-product kernels are not worse."""
    for p in PROFILES.values():
        s8, u8 = p.costs["head.int8.onnx/cpu"], p.costs["head.int8.onnx/cpu-u8"]
        assert p.ort_session_config == ORT_CONFIG["cpu-u8" if u8 < s8 else "cpu"]
        assert p.record()["ort_session_config"] == p.ort_session_config
        if not p.dotprod:
            assert u8 < 0.95 * s8 and p.ort_session_config == {"session.qdqisint8allowed": "0"}


def test_profiles_are_the_board_tables_rows() -> None:
    """One board table (bottlefit/emulation/boards.json): the profile's board, core and threads are its row's, its
    features the row's cpuinfo Features less those no kernel selects on, and the emulated core shows the same row."""
    from bottlefit.emulation.arm64 import CORES
    from bottlefit.emulation.devicetime import board

    for name, p in PROFILES.items():
        row, core = board(name), CORES[name]
        assert (p.board, p.core, p.threads) == (row.short_name, row.core, row.cores) == (core.board, core.cpu,
                                                                                           core.processors)
        assert p.features == tuple(f for f in core.features.split() if f not in NOT_KERNEL_FEATURES)
        assert {"fp", "asimd"} <= set(p.features) and not {"aes", "sha2", "evtstrm"} & set(p.features)
    # the Pi 5's A76 has the dot product and fp16 arithmetic, the others' A72/A53 neither
    assert [n for n, p in PROFILES.items() if p.dotprod] == ["pi5"]
    assert CORES["pi5"].features.split()[-1] == "asimddp" and "asimddp" not in CORES["pi4"].features


def _costs_doc(per_profile: dict[str, float]) -> dict:
    """A costs.json whose heads cost ``base`` x their position (int8 ncnn the cheapest int8 head)."""
    costs = {}
    for prof, base in per_profile.items():
        costs[prof] = {f"{f}/{d}": base * (i + 2) for i, (f, _, d) in enumerate(HEADS)}
        costs[prof]["head.int8.ncnn.param/cpu"] = base
        costs[prof]["head.s2d.int8.onnx/cpu"] = 0.1  # a measured variant no bundle ships: not a profile's cost
    return {"schema": COSTS_SCHEMA, "command": "bench/bench_pi_cost.py --test", "head": "a test head",
            "costs_minstr": costs}


def test_profiles_read_the_cost_benchs_data_file_by_core(tmp_path: Path) -> None:
    """costs.json (written by bench/bench_pi_cost.py --update) holds each measured board's costs; every board reads
    those measured on its core (the Zero 2 W the Pi 3's: both are Cortex-A53), its shipped heads only."""
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(_costs_doc({"pi4": 10.0, "pi5": 20.0, "pi3": 30.0})))
    run = read_costs(path)
    assert run.command == "bench/bench_pi_cost.py --test" and run.head == "a test head"
    got = make_profiles(run)
    assert list(got) == ["pi4", "pi5", "pi3", "zero2"]
    assert got["zero2"].costs == got["pi3"].costs and got["pi3"].costs["head.int8.ncnn.param/cpu"] == 30.0
    for p in got.values():
        assert list(p.costs) == [f"{f}/{d}" for f, _, d in HEADS]  # the order golden.json records them in
        assert p.default_key == "head.int8.ncnn.param/cpu" and p.ratio() == pytest.approx(1 / 4)
    # the package's own file is read the same way
    assert make_profiles(read_costs()) == PROFILES


def test_a_costs_file_without_a_core_or_schema_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(_costs_doc({"pi4": 10.0, "pi3": 30.0})))
    with pytest.raises(UserError, match="no costs measured on cortex-a76 \\(board pi5\\)"):
        make_profiles(read_costs(path))
    path.write_text(json.dumps(_costs_doc({"pi4": 10.0, "pi9": 30.0})))
    with pytest.raises(UserError, match="costs measured on 'pi9', a board the board table lacks"):
        read_costs(path)
    path.write_text(json.dumps({**_costs_doc({"pi4": 1.0}), "schema": "other/1"}))
    with pytest.raises(UserError, match="schema 'other/1'"):
        read_costs(path)
    with pytest.raises(UserError, match="cannot read the Pi head costs"):
        read_costs(tmp_path / "missing.json")


def test_profile_flag_is_shared_with_jetson_and_defaults_to_pi4() -> None:
    p = argparse.ArgumentParser()
    JETSON.add_arguments(p)
    TARGET.add_arguments(p)
    assert options_from(RpiOptions, vars(p.parse_args([]))).profile == DEFAULT  # the board used, by name
    assert get_profile(None).name == DEFAULT == "pi4"
    opts = options_from(RpiOptions, vars(p.parse_args(["--profile", "pi5"])))
    assert opts.profile == "pi5"
    with pytest.raises(UserError, match="choose one of pi4, pi5, pi3, zero2"):
        get_profile("orin")


@pytest.mark.slow
def test_bundle_records_the_profile_choice_and_why() -> None:
    import json

    from tests.targets.rpi import rpi_bundle

    out, arts = rpi_bundle()  # RpiOptions(): profile pi4
    pi4 = PROFILES["pi4"]
    golden = json.loads((out / "board" / "golden.json").read_text())
    assert golden["default_runtime"] == pi4.runtime and golden["default_delegate"] == pi4.delegate
    assert golden["profile"]["name"] == "pi4" and golden["profile"]["costs_minstr_per_inference"] == pi4.costs
    # the board scripts give ONNX Runtime the profile's kernel choice from here
    assert golden["profile"]["ort_session_config"] == pi4.ort_session_config
    chosen = next(a for a in arts if a.file == pi4.model)
    assert chosen.extra["board_choice"]["why"] == pi4.why
    # every artifact names the board in one shape (a string); only the default head carries the choice's record
    assert {a.extra["board_profile"] for a in arts if a.file.startswith("head.")} == {"pi4"}
    assert [a.file for a in arts if "board_choice" in a.extra] == [pi4.model]


@pytest.mark.slow
def test_board_scripts_refuse_a_malformed_ort_option_in_one_line() -> None:
    import subprocess
    import sys

    from tests.targets.rpi import rpi_bundle

    out, _ = rpi_bundle()
    for script in ("run_head.py", "verify_on_board.py"):
        cp = subprocess.run([sys.executable, str(out / "board" / script), "--runtime", "onnxruntime",
                             "--ort-option", "session.qdqisint8allowed", *(["--golden"] if script == "run_head.py"
                                                                            else [])],
                            cwd=out / "board", capture_output=True, text=True, timeout=120)
        assert cp.returncode == 2, (script, cp.stdout, cp.stderr)
        assert cp.stderr.strip().splitlines() == [
            "error: --ort-option 'session.qdqisint8allowed': write KEY=VALUE, e.g. session.qdqisint8allowed=0"]
