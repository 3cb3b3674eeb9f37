"""The command's contracts: exit codes by whose problem it is, and a console that shows only our own lines."""

from __future__ import annotations

import json
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


# --- the shell a newcomer meets: version, help with defaults, the profiles listing, the run script --------------

def test_version_prints_the_package_version(capsys) -> None:
    from bottlefit import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"bottlefit {__version__}\n"
    console = subprocess.run([sys.executable, "-m", "bottlefit", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert (console.returncode, console.stdout) == (0, f"bottlefit {__version__}\n")


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_is_for_users_and_shows_defaults(capsys) -> None:
    top = _help(capsys)
    assert "Thin:" not in top and "typed options" not in top  # not the module's note to developers
    for step in ("bottlefit demo", "bottlefit serve out/demo/export", "bottlefit run-head out/demo/export/onnx",
                 "bottlefit bench split", "bottlefit profiles"):
        assert step in top, step
    serve = " ".join(_help(capsys, "serve").split())
    assert "REST port (default 8000" in serve and "gRPC port (default 8001" in serve
    assert "(default: 16)" in serve  # --max-batch: its default added by the formatter
    run_head = " ".join(_help(capsys, "run-head").split())
    for default in ("(default: int8)", "(default: 3)", "(default: 10.0)", "(default: http://127.0.0.1:8000)"):
        assert default in run_head, default
    assert "(default: None)" not in run_head and "(default: False)" not in run_head
    export = " ".join(_help(capsys, "export").split())
    assert "mini_resnet" in export.split("when the checkpoint does not say (", 1)[1].split(")", 1)[0]
    assert "(default: True)" not in export  # a switch (--no-triton) shows no default
    # each target's own flags sit under its name, in the order of the registry
    sections = export.split("--target onnx:", 1)[1]
    onnx, rest = sections.split("--target jetson:", 1)
    jetson, rpi = rest.split("--target rpi:", 1)
    assert "--int8 " in onnx and "--no-triton" in onnx and "--precision" not in onnx
    assert all(f in jetson for f in ("--profile", "--jetpack", "--precision", "--build-engine", "--int8-output"))
    assert "--layout" in rpi and "--allow-float-ops" in rpi and "--jetpack" not in rpi
    train = " ".join(_help(capsys, "train").split())
    assert "mini_resnet" in train.split("student architecture (models.student_model.name):", 1)[1][:120]


def test_profiles_lists_the_boards_cores_and_links_the_commands_take(capsys) -> None:
    """Every name listed is one the commands accept, with the numbers of the table it comes from."""
    import json

    from bottlefit.emulation.arm64 import get_core
    from bottlefit.splitbench.links import parse_links
    from bottlefit.targets.jetson.profiles import get_profile as jetson_profile
    from bottlefit.targets.rpi.profiles import get_profile as rpi_profile

    assert main(["profiles", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert sorted(c) == ["boards", "cores", "links"] and sorted(c["boards"]) == ["jetson", "rpi"]
    jetson = c["boards"]["jetson"]
    assert {b["name"] for b in jetson} == {"nano", "xavier-nx", "orin"} and len(jetson) == 4
    for b in jetson:
        row = jetson_profile(b["name"], b["jetpack"][0])
        assert (row.trt_version, row.max_opset, row.fast_int8) == (b["tensorrt"], b["max_opset"], b["int8"])
        assert b["default_for_name"] == (jetson_profile(b["name"]) is row)
    assert [b["name"] for b in jetson if b["default_for_name"]] == ["nano", "xavier-nx", "orin"]
    rpi = c["boards"]["rpi"]
    assert [b["name"] for b in rpi] == ["pi4", "pi5", "pi3", "zero2"]
    assert [b["name"] for b in rpi if b["default"]] == ["pi4"]
    for b in rpi:
        row = rpi_profile(b["name"])
        assert (b["core"], b["head"], b["threads"]) == (row.core, row.model, row.threads)
        assert b["head_minstr_per_inference"] > 0 and 0 < b["ratio_vs_fp32_tflite"] < 1
    assert [k["name"] for k in c["cores"]] == ["pi4", "pi5", "pi3", "zero2"]
    for k in c["cores"]:
        assert get_core(k["name"]).cpu == k["cpu"] and k["cpu"].startswith("cortex-a")
    assert ("asimddp" in next(k for k in c["cores"] if k["name"] == "pi5")["features"],
            "asimddp" in next(k for k in c["cores"] if k["name"] == "pi4")["features"]) == (True, False)
    links = {link["name"]: link for link in c["links"]}
    assert sorted(links) == ["3g", "5g", "lte", "wifi"]
    assert [p.name for p in parse_links(",".join(links))] == ["3g", "lte", "wifi", "5g"]  # slowest first
    assert (links["lte"]["rate_mbit"], links["lte"]["rtt_ms"]) == (5.85, 60.0)
    assert all(link["rate_mbit"] > 0 and link["rtt_ms"] > 0 and 0 <= link["loss_pct"] < 1 for link in links.values())
    assert main(["profiles"]) == 0
    text = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in text if line.startswith("  ")]
    assert names == [b["name"] for b in jetson] + [b["name"] for b in rpi] + [k["name"] for k in c["cores"]] + \
        list(links)


def test_run_script_hands_help_and_version_to_the_command(tmp_path: Path) -> None:
    """`./run` dispatches: no arguments or only flags = the demo, `test` = pytest, --help/--version = the command's.
    The venv is a stand-in that records how it was called (the installer and apt are not what is tested here: the
    stamp matches and the emulator's tools are on PATH as stand-ins too)."""
    import hashlib
    import shutil

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "run", tmp_path / "run")
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    stamp = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (tmp_path / ".venv" / ".installed").write_text(stamp + "\n")
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, body in [(venv_bin / "bottlefit", 'echo "bottlefit $*"'), (venv_bin / "python", 'echo "python $*"'),
                       *((tools / t, "exit 0") for t in ("qemu-aarch64-static", "debootstrap", "qemu-aarch64",
                                                         "pkg-config"))]:
        name.write_text(f"#!/bin/sh\n{body}\n")
        name.chmod(0o755)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args: str) -> str:
        r = subprocess.run([str(tmp_path / "run"), *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        return r.stdout.strip()

    assert run() == "bottlefit demo"
    assert run("--verbose") == "bottlefit demo --verbose"
    assert run("--help") == "bottlefit --help"
    assert run("-h") == "bottlefit -h"
    assert run("--version") == "bottlefit --version"
    assert run("test", "-x") == "python -m pytest -q -n 2 --dist loadfile -x"
    assert run("export", "CKPT", "--target", "rpi") == "bottlefit export CKPT --target rpi"


# --- one flag name per concept: the renamed flags, their old spellings (one release: a warning line) ------------

RENAMES = [  # (command, new spelling, old spelling, value given, the parsed dest, the value parsed)
    (["train"], "--out", "--output-dir", "runs/r1", "out", "runs/r1"),
    (["demo"], "--out", "--workdir", "out/d", "out", "out/d"),
    (["triton", "out"], "--out", "--repo", "repo", "out", "repo"),
    (["bench", "split", "--out", "b"], "--image-count", "--images", "4", "image_count", 4),
    (["bench", "split", "--out", "b"], "--accuracy-image-count", "--accuracy-images", "50", "accuracy_image_count",
     50),
    (["bench", "split", "--out", "b"], "--board", "--device", "pi5", "board", "pi5"),
    (["bench", "split", "--out", "b"], "--demo-out", "--workdir", "out/d", "demo_out", "out/d"),
]


@pytest.mark.parametrize(("command", "new", "old", "value", "dest", "parsed"), RENAMES,
                         ids=[f"{r[0][0]}:{r[2]}->{r[1]}" for r in RENAMES])
def test_a_renamed_flag_works_and_its_old_spelling_warns_and_still_works(
        capsys, command: list[str], new: str, old: str, value: str, dest: str, parsed: object) -> None:
    from bottlefit.cli import build_parser

    args = build_parser(command[0]).parse_args([*command, new, value])
    assert getattr(args, dest) == parsed and capsys.readouterr().err == ""
    args = build_parser(command[0]).parse_args([*command, old, value])
    assert getattr(args, dest) == parsed
    assert capsys.readouterr().err == f"bottlefit: warning: {old} is deprecated; use {new}\n"
    help_text = _help(capsys, *command[:2] if command[0] == "bench" else command[:1])
    assert new in help_text and f"{old} " not in help_text  # the old spelling is not advertised
    with pytest.raises(SystemExit) as e:  # one flag, two spellings: not both
        build_parser(command[0]).parse_args([*command, new, value, old, value])
    assert e.value.code == 2


@pytest.mark.parametrize("flag", ["--image-count", "--images"])
def test_bench_counts_are_checked_in_either_spelling(tmp_path: Path, capsys, flag: str) -> None:
    """The old spelling reaches the same check (exit 2, the flag's new name in the one error line)."""
    assert main(["bench", "split", "--out", str(tmp_path), flag, "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "bottlefit: error: --image-count 0: must be at least 1"
    assert len(err) == (2 if flag == "--images" else 1)


def test_a_required_flag_may_be_given_in_its_old_spelling(tmp_path: Path, mini_export: Path, capsys) -> None:
    """`triton --repo` (now --out, required): still runs, writes the same repository; --json lists the files."""
    assert main(["triton", str(mini_export), "--repo", str(tmp_path / "old")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "bottlefit: warning: --repo is deprecated; use --out\n"
    old = sorted(p.relative_to(tmp_path / "old").as_posix() for p in (tmp_path / "old").rglob("*") if p.is_file())
    assert main(["triton", str(mini_export), "--out", str(tmp_path / "new"), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert captured.err == "" and doc["repository"] == str(tmp_path / "new")
    new = sorted(Path(f).relative_to(tmp_path / "new").as_posix() for f in doc["files"])
    assert new == old and len(new) > 3
    with pytest.raises(SystemExit) as e:
        main(["triton", str(mini_export)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_the_checkpoint_is_positional_or_a_flag_in_export_and_inspect(tmp_path: Path, capsys) -> None:
    """One name for the checkpoint: `CKPT` or `--checkpoint CKPT` (as verify and bench split take it); two
    different files are refused (exit 2, before any work)."""
    from bottlefit.cli import build_parser, checkpoint_path

    for command in ("export", "inspect"):
        for argv in (["a.pt"], ["--checkpoint", "a.pt"], ["a.pt", "--checkpoint", "a.pt"]):
            extra = ["--target", "onnx", "--out", "o"] if command == "export" else []
            assert checkpoint_path(build_parser(command).parse_args([command, *argv, *extra])) == Path("a.pt")
    assert main(["inspect", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "b.pt")]) == 2
    assert capsys.readouterr().err == (f"bottlefit: error: {tmp_path / 'a.pt'} and --checkpoint {tmp_path / 'b.pt'}: "
                                       "name one checkpoint\n")
    assert main(["inspect", "--checkpoint", str(tmp_path / "missing.pt")]) == 2  # the flag reaches the loader
    assert "missing.pt" in capsys.readouterr().err


def test_json_where_a_script_parses_the_result(capsys) -> None:
    """Every command that prints a result a script would read takes --json."""
    from bottlefit.cli import build_parser

    for command in (["inspect"], ["export"], ["verify"], ["profiles"], ["run-head"], ["triton"], ["train"],
                    ["bench", "split"]):
        assert "--json" in _help(capsys, *command), command
    assert build_parser("train").parse_args(["train", "--json"]).json is True


def test_export_json_prints_the_verdict_as_verify_does(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["export", "--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "2", "--target", "onnx",
                 "--out", str(out), "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "onnx" / "report.json").read_text()) and printed["passed"] is True
    assert main(["verify", str(out / "onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checks"] == printed["checks"]
