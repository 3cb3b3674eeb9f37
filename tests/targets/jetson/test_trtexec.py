from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bottlefit.errors import UserError
from bottlefit.targets.jetson.profiles import get_profile
from bottlefit.targets.jetson.trtexec import (
    build_args,
    format_export_output,
    format_value,
    golden_file_names,
    infer_args,
    load_inputs_bytes,
    load_inputs_flag,
    parse_export_output,
    parse_export_output_text,
    render_build_script,
    write_export_output,
    write_golden,
    write_load_inputs,
)

INFER_TAIL = ["--iterations=1", "--warmUp=0", "--duration=0", "--avgRuns=1"]


# ------------------------------------------------------------------------------------- value formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (np.float32(1e-7), "1e-07"),
        (np.float32(1234567.0), "1.23457e+06"),
        (np.float32(-0.0), "-0"),
        (np.float32(0.123456789), "0.123457"),
        (np.float32(100000.0), "100000"),
        (np.float32(1e6), "1e+06"),
        (np.float32(0.0001), "0.0001"),
        (np.float32(1e-5), "1e-05"),
        (np.float32(0.1), "0.1"),  # float32(0.1) = 0.100000001...: 6 digits hide it, as in C++
        (np.float32(-1.5), "-1.5"),
        (np.float16(0.333), "0.333008"),  # fp16 prints through float
        (np.float32("nan"), "nan"),
        (-np.float32("nan"), "-nan"),  # glibc prints the sign of a NaN
        (np.float32("inf"), "inf"),
        (np.float32("-inf"), "-inf"),
        (np.int8(-128), "-128"),
        (np.int32(7), "7"),
        (np.bool_(True), "1"),
        (False, "0"),
    ],
)
def test_format_value_like_cpp_ostream(value: object, text: str) -> None:
    assert format_value(value) == text


def test_export_output_exact_layout() -> None:
    text = format_export_output(
        {
            "logits": np.array([[0.0435101, -1.5, 3e-07]], np.float32),
            "feat": np.array([[1, 2, 3, 4]], np.float32),
        }
    )
    assert text == (
        "[\n"
        '  { "name" : "logits"\n'
        '  , "dimensions" : "1x3"\n'
        '  , "values" : [ 0.0435101, -1.5, 3e-07 ]\n'
        "  }\n"
        ', { "name" : "feat"\n'
        '  , "dimensions" : "1x4"\n'
        '  , "values" : [ 1, 2, 3, 4 ]\n'
        "  }\n"
        "]\n"
    )


def test_parse_round_trip_with_awkward_names_and_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bottleneck = rng.normal(size=(1, 12, 29, 29)).astype(np.float32)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-7], np.float32)
    outputs = {
        'odd "name": nan/inf': special,
        "/head/bottleneck/Conv_output_0": bottleneck,
        "scalar": np.array(3.5, np.float32),
        "codes": np.array([[-128, 0, 127]], np.int8),
        "empty": np.zeros((1, 0), np.float32),
    }
    path = write_export_output(tmp_path / "out.json", outputs)
    parsed = parse_export_output(path)
    assert list(parsed) == list(outputs)
    assert parsed["/head/bottleneck/Conv_output_0"].shape == (1, 12, 29, 29)
    np.testing.assert_allclose(parsed["/head/bottleneck/Conv_output_0"], bottleneck, rtol=5e-6, atol=1e-30)
    got = parsed['odd "name": nan/inf']
    assert np.isnan(got[:2]).all() and list(got[2:4]) == [np.inf, -np.inf]
    assert np.signbit(got[4]) and got[5] == pytest.approx(1e-7)
    assert parsed["scalar"].shape == () and float(parsed["scalar"]) == 3.5
    assert parsed["codes"].tolist() == [[-128, 0, 127]]
    assert parsed["empty"].shape == (1, 0)
    assert parse_export_output_text(path.read_text()).keys() == parsed.keys()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ 1, 2 ]\n  }\n', "closing"),
        ('[\n  { "name" : "y"\n  , "dimensions" : "1x3"\n  , "values" : [ 1, 2 ]\n  }\n]\n', "3 values|2 values"),
        ('[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ 1, \x7f ]\n  }\n]\n', "not a number"),
        ('{"name": "y"}\n', "expected"),
        ('[\n  { "name" : "y"\n  , "values" : [ 1 ]\n  }\n]\n', "layout"),
    ],
)
def test_parse_rejects_broken_files(text: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        parse_export_output_text(text)


def test_parse_reports_missing_and_raw_bytes(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        parse_export_output(tmp_path / "none.json")
    raw = tmp_path / "int8_on_82.json"  # TensorRT 8.2 streams int8 outputs as characters
    raw.write_bytes(b'[\n  { "name" : "y"\n  , "dimensions" : "1x2"\n  , "values" : [ \x80, \xff ]\n  }\n]\n')
    with pytest.raises(UserError, match="raw bytes"):
        parse_export_output(raw)


# ---------------------------------------------------------------------------------------- --loadInputs


def test_load_inputs_bytes_little_endian_c_order(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float64).reshape(2, 3).T  # Fortran-ordered view
    data = load_inputs_bytes(x)
    assert len(data) == 6 * 4
    assert data[:8] == bytes.fromhex("00000000") + bytes.fromhex("00004040")  # 0.0, 3.0 little-endian
    assert np.frombuffer(data, "<f4").reshape(3, 2).tolist() == x.tolist()
    assert load_inputs_bytes(np.array([1.0], np.float32), "float16") == bytes.fromhex("003c")
    assert load_inputs_bytes(np.array([-1, 127], np.int8), "int8") == b"\xff\x7f"
    path = write_load_inputs(tmp_path / "in.bin", np.ones((1, 3, 4, 4), np.float32))
    assert path.stat().st_size == 1 * 3 * 4 * 4 * 4


def test_load_inputs_refuses_what_trtexec_would_misread() -> None:
    with pytest.raises(UserError):
        load_inputs_bytes(np.array([200]), "int8")
    with pytest.raises(UserError):
        load_inputs_bytes(np.array([0.5]), "int8")
    with pytest.raises(UserError):
        load_inputs_bytes(np.array([0.5]), "float64")
    assert load_inputs_flag({"in:put": "golden/a.bin", "b": "golden/b.bin"}) == (
        "--loadInputs=in:put:golden/a.bin,b:golden/b.bin"  # trtexec splits at the last ':'
    )
    with pytest.raises(UserError):
        load_inputs_flag({"a,b": "x.bin"})
    with pytest.raises(UserError):
        load_inputs_flag({"a": "C:/x.bin"})


def test_golden_file_names_are_safe_and_distinct() -> None:
    assert golden_file_names(["input", "a/b:c", "a_b_c"], "output") == {
        "input": "output.input.bin",
        "a/b:c": "output.a_b_c.bin",
        "a_b_c": "output.a_b_c-2.bin",
    }


# -------------------------------------------------------------------------------------- command lines


def test_nano_fp16_lines() -> None:
    nano = get_profile("nano")
    assert build_args(nano, "fp16") == [
        "--onnx=head.onnx",
        "--fp16",
        "--saveEngine=engines/head.fp16.engine",
        "--timingCacheFile=engines/timing.cache",
        "--workspace=1024",
        "--buildOnly",
    ]
    assert infer_args("fp16") == [
        "--loadEngine=engines/head.fp16.engine",
        "--loadInputs=input:golden/input.input.bin",
        "--exportOutput=results/fp16.output.json",
        *INFER_TAIL,
    ]


def test_nano_refuses_int8_unless_forced() -> None:
    nano = get_profile("nano")
    with pytest.raises(UserError, match="int8"):
        build_args(nano, "qdq")
    assert "--int8" in build_args(nano, "qdq", force=True)
    with pytest.raises(UserError, match="raw bytes"):
        build_args(nano, "cache", force=True, int8_output=True)


def test_xavier_nx_int8_lines() -> None:
    nx = get_profile("xavier-nx")
    assert build_args(nx, "qdq", fp16=True) == [
        "--onnx=head.qdq.onnx",
        "--int8",
        "--fp16",
        "--saveEngine=engines/head.qdq.engine",
        "--timingCacheFile=engines/timing.cache",
        "--memPoolSize=workspace:1024",
        "--buildOnly",
    ]
    assert build_args(nx, "cache", workspace_mib=512, int8_output=True) == [
        "--onnx=head.onnx",
        "--int8",
        "--calib=head.calib.cache",
        "--outputIOFormats=int8:chw",  # one broadcast entry: 8.5 checks a list against #inputs
        "--saveEngine=engines/head.cache.engine",
        "--timingCacheFile=engines/timing.cache",
        "--memPoolSize=workspace:512",
        "--buildOnly",
    ]
    with pytest.raises(UserError, match="int8 route"):
        build_args(nx, "fp16", int8_output=True)
    # A Q/DQ graph that ends in QuantizeLinear emits int8: the format flag pins the binding to it.
    assert "--outputIOFormats=int8:chw" in build_args(nx, "qdq", int8_output=True)


def test_orin_lines_per_jetpack() -> None:
    orin = get_profile("orin")
    assert build_args(orin, "qdq") == [
        "--onnx=head.qdq.onnx",
        "--int8",
        "--saveEngine=engines/head.qdq.engine",
        "--timingCacheFile=engines/timing.cache",
        "--memPoolSize=workspace:1024M",
        "--skipInference",
    ]
    assert "--noTF32" in build_args(orin, "fp32")
    assert "--noTF32" not in build_args(orin, "fp16")
    assert "--noTF32" not in build_args(get_profile("xavier-nx"), "fp32")  # Volta has no TF32
    jp5 = build_args(get_profile("orin", jetpack="5.1"), "cache")
    assert jp5[-2:] == ["--memPoolSize=workspace:1024", "--buildOnly"]
    for args in (build_args(orin, r) for r in ("qdq", "cache", "fp16", "fp32")):
        assert not any(a.startswith(("--workspace", "--buildOnly")) for a in args)  # unknown options on 10.x


def test_unknown_route() -> None:
    with pytest.raises(UserError, match="qdq, cache, fp16, fp32"):
        build_args(get_profile("orin"), "dla")


# ------------------------------------------------------------------------------------------- the script


def test_render_build_script(tmp_path: Path) -> None:
    files = {"inputs": ["images"], "golden_dir": "gold"}
    script = render_build_script(get_profile("orin"), ["qdq", "cache"], files, int8_output=True)
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail\n" in script
    assert "TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}\n" in script
    assert "route_qdq() {" in script and "route_cache() {" in script
    assert "--loadInputs=images:gold/input.images.bin" in script
    assert "--memPoolSize=workspace:1024M --skipInference" in script
    assert "--outputIOFormats=int8:chw" in script and "--engine-output=int8" in script
    assert script.count("--outputIOFormats") == 2  # both int8 routes emit int8 codes
    assert ("verify_on_board.py --golden=gold --output=results/qdq.output.json --precision=int8 "
            "--engine-output=int8\n") in script
    path = tmp_path / "build_engine.sh"
    path.write_text(script)
    path.chmod(0o755)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # No trtexec here: the script stops before any work with exit 2 and says how to point it at one.
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(tmp_path / "no-trtexec")}
    run = subprocess.run([str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 2 and "trtexec not found" in run.stderr
    assert not (tmp_path / "engines").exists()


def test_render_build_script_rejects_unknown_route_at_run_time(tmp_path: Path) -> None:
    path = tmp_path / "build_engine.sh"
    path.write_text(render_build_script(get_profile("nano"), ["fp16", "fp32"]))
    # Point TRTEXEC at an existing executable that is NOT trtexec; the route check runs before it is used.
    true = shutil.which("true")
    assert true
    run = subprocess.run(
        ["bash", str(path), "int8"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "TRTEXEC": true},
    )
    assert run.returncode == 2 and "unknown route 'int8'" in run.stderr


def test_write_golden(tmp_path: Path) -> None:
    x = np.ones((1, 3, 2, 2), np.float32)
    y = np.arange(4, dtype=np.float32).reshape(1, 4)
    tol = {"int8": {"max_abs_error": 0.1, "cosine": 0.99}}
    path = write_golden(tmp_path / "golden", {"input": x}, {"/out:y": y}, tol, output_scales={"/out:y": 0.05})
    doc = json.loads(path.read_text())
    assert doc["format"] == "bottlefit-golden-1"
    assert doc["inputs"] == [{"name": "input", "file": "input.input.bin", "shape": [1, 3, 2, 2], "dtype": "float32"}]
    assert doc["outputs"] == [
        {"name": "/out:y", "file": "output._out_y.bin", "shape": [1, 4], "dtype": "float32", "scale": 0.05}
    ]
    assert doc["tolerances"] == tol
    assert (tmp_path / "golden" / "output._out_y.bin").read_bytes() == y.astype("<f4").tobytes()
    with pytest.raises(UserError, match="unknown keys"):
        write_golden(tmp_path / "g2", {"input": x}, {"y": y}, {"int8": {"rtol": 1.0}})
