"""rpi board profiles as data: the default head is the cheapest measured int8 head, the choice reaches the CLI
options, the manifest's record and golden.json."""

from __future__ import annotations

import argparse

import pytest

from bottlefit.errors import UserError
from bottlefit.targets import options_from
from bottlefit.targets.jetson import TARGET as JETSON
from bottlefit.targets.rpi import TARGET, RpiOptions
from bottlefit.targets.rpi.profiles import DEFAULT, ORT_CONFIG, PROFILES, REFERENCE, get_profile


def test_every_profile_defaults_to_its_cheapest_measured_int8_head() -> None:
    assert set(PROFILES) == {"pi4", "pi5", "pi3", "zero2"}
    assert {p.core for p in PROFILES.values()} == {"cortex-a72", "cortex-a76", "cortex-a53"}
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


def test_recorded_costs_are_the_committed_bench_baseline() -> None:
    """profiles.py and bench/bench_pi_cost_baseline.json (the CI regression baseline) hold the same measurement."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "bench_pi_cost_baseline.json"
    base = json.loads(path.read_text())["costs_minstr"]
    for name, p in PROFILES.items():
        row = base[name if name in base else {"zero2": "pi3"}[name]]
        assert {k: row[k] for k in p.costs} == p.costs, name


def test_profile_flag_is_shared_with_jetson_and_defaults_to_pi4() -> None:
    p = argparse.ArgumentParser()
    JETSON.add_arguments(p)
    TARGET.add_arguments(p)
    assert options_from(RpiOptions, vars(p.parse_args([]))).profile is None
    assert get_profile(None).name == DEFAULT == "pi4"
    opts = options_from(RpiOptions, vars(p.parse_args(["--profile", "pi5"])))
    assert opts.profile == "pi5"
    with pytest.raises(UserError, match="choose one of pi4, pi5, pi3, zero2"):
        get_profile("orin")


@pytest.mark.slow
def test_bundle_records_the_profile_choice_and_why() -> None:
    import json

    from tests.targets.rpi import rpi_bundle

    out, arts = rpi_bundle()  # RpiOptions(): profile None -> pi4
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
