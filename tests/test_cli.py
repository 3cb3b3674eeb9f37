"""The command's contracts: exit codes by whose problem it is, and a console that shows only our own lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bottlefit.cli import main
from bottlefit.errors import EnvironmentProblem, UserError, VerificationError
from bottlefit.runtimes import RuntimeUnavailable

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_exit_codes() -> dict[str, int]:
    """The README's stable exit-code sentence: code -> what it says the code means (first words)."""
    text = " ".join(README.read_text().split("Exit codes (stable, for CI): ", 1)[1].split(";", 1)[0].split())
    return {m.group(2).strip(): int(m.group(1)) for m in re.finditer(r"\*\*(\d)\*\* ([a-z ]+)", text)}


@pytest.mark.parametrize(("raised", "meaning"), [
    (None, "success"),
    (VerificationError("head.int8.onnx: bottleneck.sqnr_db 12.0 < 25"), "a verification failed"),
    (UserError("--images x: no such folder"), "bad input or usage"),
    (EnvironmentProblem("qemu-user-static is missing: apt-get install qemu-user-static"), "this machine"),
    (RuntimeUnavailable("TensorRT is not installed here"), "this machine"),
])
def test_exit_code_is_what_the_readme_promises_for_each_kind_of_problem(
        monkeypatch: pytest.MonkeyPatch, capsys, raised: Exception | None, meaning: str) -> None:
    """The stable contract CI scripts read: each kind of problem, raised inside a command, leaves it with the code
    the README gives that kind, and one line on stderr that is the problem's own message."""
    import bottlefit.pipeline.inspect as inspect_mod

    codes = _readme_exit_codes()
    assert sorted(codes.values()) == [0, 1, 2, 3], codes
    want = next(c for text, c in codes.items() if text.startswith(meaning))
    if raised is not None:
        def fail(_lm: object) -> dict:
            raise raised

        monkeypatch.setattr(inspect_mod, "describe", fail)
    assert main(["inspect", "--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "2"]) == want
    err = capsys.readouterr().err
    if raised is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and str(raised) in err and "internal error" not in err


def test_internal_error_is_exit_3_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A bug of ours must never read as "verification failed" (1) or as the user's mistake (2)."""
    import bottlefit.pipeline.inspect as inspect_mod

    def broken(_lm: object) -> dict:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(inspect_mod, "describe", broken)
    assert main(["inspect", "--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "2"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bottlefit: internal error: ZeroDivisionError: division by zero")
    assert "Traceback" not in err and "--verbose" in err
    assert main(["inspect", "--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "2", "--verbose"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_usage_error_is_exit_2(capsys) -> None:
    assert main(["export", "--untrained", "--target", "rpi", "--out", "/tmp/x", "--emulate", "pi9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pi9" in err and "pi4" in err


# Our own lines: progress "[  1.2s] ...", the verdict table, PASS/FAIL, and "bottlefit: ..." errors.
OURS = re.compile(r"^(\[\s*\d+\.\ds\] |  (ok |FAIL|info) |PASS: |FAIL: |bottlefit: |  \S+: (first|no ))")


def _export(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bottlefit", "export", "--untrained", "--arch", "mini_resnet",
                           "--bottleneck-channel", "4", "--target", "rpi", "--out", str(tmp_path), "--emulate",
                           "none", *extra], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_console_shows_only_our_lines_unless_verbose(tmp_path: Path) -> None:
    quiet = _export(tmp_path / "q")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    lines = [ln for ln in (quiet.stdout + quiet.stderr).splitlines() if ln.strip()]
    foreign = [ln for ln in lines if not OURS.match(ln)]
    assert not foreign, foreign
    verbose = _export(tmp_path / "v", "--verbose")
    assert verbose.returncode == 0
    # the converters' and runtimes' own chatter is there, only hidden
    assert len([ln for ln in verbose.stderr.splitlines() if not OURS.match(ln)]) > 0


@pytest.mark.parametrize("target,given,takers", [
    ("onnx", ["--profile", "orin"], "jetson and rpi"),
    ("onnx", ["--precision", "fp16"], "jetson"),
    ("rpi", ["--opset", "17"], "onnx and jetson"),
    ("rpi", ["--int8"], "onnx"),
    ("rpi", ["--no-triton"], "onnx"),
    ("jetson", ["--profile", "orin", "--layout", "nchw"], "rpi"),
])
def test_a_flag_the_target_does_not_take_is_refused(tmp_path: Path, capsys, target: str, given: list[str],
                                                    takers: str) -> None:
    """Every target's flags share one parser; a flag the chosen target ignores is an error naming both, not a
    silent no-op, and it comes before any work (no output directory)."""
    out = tmp_path / "out"
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--target", target, "--out", str(out), *given])
    flag = given[-2] if given[-1] not in ("--int8", "--no-triton") else given[-1]
    assert rc == 2
    assert capsys.readouterr().err == (f"bottlefit: error: {flag} is not an option of --target {target} "
                                       f"(it is for --target {takers}); drop it\n")
    assert not out.exists()


def test_emulate_on_a_target_without_a_board_to_emulate_is_refused(tmp_path: Path, capsys) -> None:
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--target", "jetson", "--profile", "orin",
               "--out", str(tmp_path / "out"), "--emulate", "pi4"])
    assert rc == 2
    assert capsys.readouterr().err == ("bottlefit: error: --emulate pi4: --target jetson has no board to emulate "
                                       "(only --target rpi does); drop it or pass --emulate none\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "inspect"])
def test_checkpoint_with_untrained_is_refused(tmp_path: Path, capsys, command: str) -> None:
    ckpt = tmp_path / "model.pt"
    extra = ["--target", "onnx", "--out", str(tmp_path / "out")] if command == "export" else []
    assert main([command, str(ckpt), "--untrained", "--arch", "mini_resnet", *extra]) == 2
    assert capsys.readouterr().err == (f"bottlefit: error: {ckpt} and --untrained: a checkpoint has trained "
                                       "weights, --untrained random ones; pass one of them\n")
    assert not (tmp_path / "out").exists()
