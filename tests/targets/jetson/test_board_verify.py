"""verify_on_board.py run as the board runs it: a subprocess over golden files and a trtexec-format output."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import bottlefit.targets.jetson.trtexec as trtexec_mod
from bottlefit.errors import UserError
from bottlefit.targets.jetson.trtexec import write_export_output, write_golden

SCRIPT = Path(trtexec_mod.__file__).with_name("board") / "verify_on_board.py"
TOL = {
    "fp32": {"max_abs_error": 1e-4, "mean_abs_error": 1e-5, "cosine": 0.99999, "sqnr_db": 80.0},
    "int8": {"max_abs_error": 0.08, "mean_abs_error": 0.02, "cosine": 0.999, "sqnr_db": 30.0},
}
SCALE = 0.05  # range ±6.35: no golden value clips


def _bundle(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    outputs = {
        "/head/bottleneck/Conv_output_0": rng.normal(size=(1, 12, 29, 29)).astype(np.float32),
        "aux": rng.uniform(-2, 2, size=(1, 5)).astype(np.float32),
    }
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    scales = dict.fromkeys(outputs, SCALE)
    write_golden(tmp_path / "golden", {"input": x}, outputs, TOL, output_scales=scales)
    return tmp_path / "golden", outputs


def _run(golden: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(SCRIPT), f"--golden={golden}", f"--output={output}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_close_outputs_pass(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    rng = np.random.default_rng(1)
    # Reverse order: trtexec writes outputs in hash order, the verifier matches by name.
    noisy = {k: v + rng.normal(scale=1e-6, size=v.shape).astype(np.float32) for k, v in reversed(outputs.items())}
    out = write_export_output(tmp_path / "fp32.output.json", noisy)
    run = _run(golden, out, "--precision=fp32")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("PASS")
    assert "/head/bottleneck/Conv_output_0" in run.stdout and "1x12x29x29" in run.stdout
    assert "cosine" in run.stdout and "sqnr_dB" in run.stdout


def test_one_channel_scaled_fails(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    bad = dict(outputs)
    bn = outputs["/head/bottleneck/Conv_output_0"].copy()
    bn[:, 3] *= 1.5
    bad["/head/bottleneck/Conv_output_0"] = bn
    out = write_export_output(tmp_path / "fp32.output.json", bad)
    run = _run(golden, out, "--precision=fp32")
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("FAIL")
    bottleneck_row = next(line for line in run.stdout.splitlines() if line.startswith("/head/bottleneck"))
    assert "FAIL: max_abs_error" in bottleneck_row
    aux_row = next(line for line in run.stdout.splitlines() if line.startswith("aux"))
    assert aux_row.rstrip().endswith("PASS")


def test_large_noise_fails_int8_tolerances(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    rng = np.random.default_rng(2)
    noisy = {k: v + rng.normal(scale=0.3, size=v.shape).astype(np.float32) for k, v in outputs.items()}
    run = _run(golden, write_export_output(tmp_path / "o.json", noisy), "--precision=int8")
    assert run.returncode == 1 and "sqnr_db" in run.stdout


def test_int8_codes_are_dequantized_with_golden_scale(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    codes = {k: np.clip(np.round(v / SCALE), -128, 127).astype(np.int8) for k, v in outputs.items()}
    out = write_export_output(tmp_path / "cache.output.json", codes)
    run = _run(golden, out, "--precision=int8", "--engine-output=int8")
    assert run.returncode == 0, run.stdout + run.stderr
    # Read as floats the same codes are 20x off: the flag matters.
    assert _run(golden, out, "--precision=int8").returncode == 1


def test_nan_output_fails(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    bad = dict(outputs)
    bad["aux"] = outputs["aux"].copy()
    bad["aux"][0, 2] = np.nan
    run = _run(golden, write_export_output(tmp_path / "o.json", bad), "--precision=fp32")
    assert run.returncode == 1 and "non-finite" in run.stdout


def test_missing_output_and_wrong_shape_fail(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    only_aux = {"aux": outputs["aux"].reshape(5, 1)}
    run = _run(golden, write_export_output(tmp_path / "o.json", only_aux), "--precision=fp32")
    assert run.returncode == 1
    assert "missing from the trtexec output" in run.stdout and "shape 5x1 != golden 1x5" in run.stdout


@pytest.mark.parametrize("missing", ["output", "golden.json", "golden output"])
def test_missing_files_exit_2_with_one_line(tmp_path: Path, missing: str) -> None:
    golden, outputs = _bundle(tmp_path)
    out = write_export_output(tmp_path / "o.json", outputs)
    if missing == "output":
        out.unlink()
    elif missing == "golden.json":
        (golden / "golden.json").unlink()
    else:
        (golden / "output.aux.bin").unlink()
    run = _run(golden, out, "--precision=fp32")
    assert run.returncode == 2
    assert run.stdout == "" and len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith("verify_on_board: cannot read")


def test_no_tolerance_for_precision_exits_2(tmp_path: Path) -> None:
    golden, outputs = _bundle(tmp_path)
    run = _run(golden, write_export_output(tmp_path / "o.json", outputs), "--precision=fp16")
    assert run.returncode == 2 and "no tolerances for precision 'fp16'" in run.stderr


def test_runs_on_python_36() -> None:
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed (pip install vermin==1.9.2): cannot check Python 3.6 compatibility")
    run = subprocess.run(
        [vermin, "-t=3.6-", "--no-tips", "--violations", str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_board_script_uses_only_the_standard_library() -> None:
    import ast

    tree = ast.parse(SCRIPT.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names)


# --------------------------------------------- one format, two parsers: the host's and the board's copy
# verify_on_board.py must stay standard-library Python 3.6, so it keeps its own --exportOutput reader. These
# tests feed both readers the same documents, so the two cannot drift apart silently.


def _board_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verify_on_board", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BOARD = _board_module()

# Documents as trtexec writes them (docs/tensorrt.md): comma-first, three lines per output, hash order.
TENSORRT_MD_SKETCH = (
    "[\n"
    '  { "name" : "logits"\n'
    '  , "dimensions" : "1x10"\n'
    '  , "values" : [ 0.0435101, -1.5, 3e-07, 1.23457e+06, -0, 100000, 1e-07, 0.123457, 42, -7 ]\n'
    "  }\n"
    ', { "name" : "feat"\n'
    '  , "dimensions" : "1x4"\n'
    '  , "values" : [ 1, 2, 3, 4 ]\n'
    "  }\n"
    "]\n"
)
OBSERVED_1X5 = (  # the layout of a real third-party file (seen in the public code index)
    "[\n"
    '  { "name" : "output"\n'
    '  , "dimensions" : "1x5"\n'
    '  , "values" : [ 0.0435101, 0.671385, -0.290129, 2.13887e-05, -3.5e+08 ]\n'
    "  }\n"
    "]\n"
)
SPECIAL_TOKENS = (  # glibc's spellings of non-finite floats; 8.5+ prints int8/int32 outputs as integers
    "[\n"
    '  { "name" : "odd "name": nan/inf"\n'  # trtexec writes names unescaped
    '  , "dimensions" : "2x3"\n'
    '  , "values" : [ nan, -nan, inf, -inf, -0, 1e-45 ]\n'
    "  }\n"
    ', { "name" : "codes"\n'
    '  , "dimensions" : "1x3"\n'
    '  , "values" : [ -128, 0, 127 ]\n'
    "  }\n"
    ', { "name" : "scalar"\n'
    '  , "dimensions" : ""\n'
    '  , "values" : [ 3.5 ]\n'
    "  }\n"
    ', { "name" : "empty"\n'
    '  , "dimensions" : "1x0"\n'
    '  , "values" : [  ]\n'
    "  }\n"
    "]\n"
)


def _written_by_host() -> str:
    rng = np.random.default_rng(11)
    return trtexec_mod.format_export_output({
        "/head/bottleneck/Conv_output_0": rng.normal(size=(1, 12, 29, 29)).astype(np.float32),
        'odd "name": nan/inf': np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-7], np.float32),
        "scalar": np.array(3.5, np.float32),
        "codes": np.array([[-128, 0, 127]], np.int8),
        "ints": np.array([[-(2**31), 2**31 - 1]], np.int32),
        "empty": np.zeros((1, 0), np.float32),
        "fp16": rng.normal(size=(2, 3)).astype(np.float16),
    })


DOCUMENTS = {
    "tensorrt-md-sketch": TENSORRT_MD_SKETCH,
    "observed-1x5": OBSERVED_1X5,
    "special-tokens": SPECIAL_TOKENS,
    "written-by-host": _written_by_host(),
}


def _both(tmp_path: Path, text: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[list[int], list[float]]]]:
    path = tmp_path / "out.json"
    path.write_bytes(text.encode("utf-8"))
    return trtexec_mod.parse_export_output(path), BOARD.read_export_output(str(path))


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_host_and_board_parsers_agree(tmp_path: Path, name: str) -> None:
    host, board = _both(tmp_path, DOCUMENTS[name])
    assert list(board) == list(host)  # same names, in file order
    for tensor, array in host.items():
        shape, values = board[tensor]
        assert shape == list(array.shape), tensor
        # bit for bit: nan vs -nan and 0 vs -0 included
        assert np.array(values, np.float64).tobytes() == array.astype(np.float64).reshape(-1).tobytes(), tensor


BROKEN = {
    "no-closing-bracket": '[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ 1, 2 ]\n  }\n',
    "not-a-number": '[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ 1, \x7f ]\n  }\n]\n',
    "raw-int8-char": '[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ 1, A ]\n  }\n]\n',
    "plain-json": '{"name": "y"}\n',
    "no-dimensions-line": '[\n  { "name" : "y"\n  , "values" : [ 1 ]\n  }\n]\n',
    "no-brace-line": '[\n  { "name" : "y"\n  , "dimensions" : "1"\n  , "values" : [ 1 ]\n]\n',
    "bad-dimensions": '[\n  { "name" : "y"\n  , "dimensions" : "1,2"\n  , "values" : [ 1, 2 ]\n  }\n]\n',
    "empty-file": "",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_host_and_board_parsers_reject_the_same_broken_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / "out.json"
    path.write_bytes(BROKEN[name].encode("utf-8"))
    with pytest.raises(UserError):
        trtexec_mod.parse_export_output(path)
    with pytest.raises(BOARD.Unreadable):
        BOARD.read_export_output(str(path))


def test_host_and_board_parsers_reject_raw_bytes_and_missing_files(tmp_path: Path) -> None:
    raw = tmp_path / "int8_on_82.json"  # TensorRT 8.2 streams int8 outputs as characters
    raw.write_bytes(b'[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ \x80, \xff ]\n  }\n]\n')
    for path, host_match in ((raw, "raw bytes"), (tmp_path / "none.json", "not found")):
        with pytest.raises(UserError, match=host_match):
            trtexec_mod.parse_export_output(path)
        with pytest.raises(BOARD.Unreadable):
            BOARD.read_export_output(str(path))


STRICT_CASES = {
    "fewer-values-than-dimensions": '[\n  { "name" : "y"\n  , "dimensions" : "1x3"\n  , "values" : [ 1, 2 ]\n  }\n]\n',
    "duplicate-name": ('[\n  { "name" : "y"\n  , "dimensions" : "1"\n  , "values" : [ 1 ]\n  }\n'
                       ', { "name" : "y"\n  , "dimensions" : "1"\n  , "values" : [ 2 ]\n  }\n]\n'),
}


@pytest.mark.parametrize("name", list(STRICT_CASES))
def test_board_parser_rejects_what_the_host_parser_rejects(tmp_path: Path, name: str) -> None:
    path = tmp_path / "out.json"
    path.write_bytes(STRICT_CASES[name].encode("utf-8"))
    with pytest.raises(UserError):
        trtexec_mod.parse_export_output(path)
    try:
        BOARD.read_export_output(str(path))
    except BOARD.Unreadable:
        return
    raise AssertionError(f"the board reader accepted {name}")
