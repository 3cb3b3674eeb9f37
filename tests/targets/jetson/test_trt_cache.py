from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from bottlefit.calibration.trt_cache import check_cache, read_cache, scale_to_hex, write_cache
from bottlefit.errors import UserError


def test_scale_hex_is_big_endian_float32_bits() -> None:
    assert struct.pack(">f", 1 / 127).hex() == "3c010204"  # computed, not the rounded 3c010a14 seen in caches
    assert scale_to_hex(1 / 127) == "3c010204"
    assert scale_to_hex(1.0) == "3f800000"
    assert scale_to_hex(0.125) == "3e000000"
    assert scale_to_hex(0.0) == "0"  # TensorRT writes uniformly-zero tensors as "name: 0"


def test_write_exact_bytes(tmp_path: Path) -> None:
    path = write_cache(
        tmp_path / "head.calib.cache",
        8502,
        {"input": 1 / 127, "/stem/conv/Conv_output_0": 1.0, "a:b/c": 0.125, "dead": 0.0},
    )
    assert path.read_bytes() == (
        b"TRT-8502-EntropyCalibration2\ninput: 3c010204\n/stem/conv/Conv_output_0: 3f800000\na:b/c: 3e000000\ndead: 0\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["head.calib.cache"]  # no temp file left behind


def test_read_splits_at_last_colon_and_rounds_to_float32(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "c", 100300, {"x": 0.1, "ns:a:b": 2.5}, algorithm="MinMaxCalibration")
    code, algo, scales = read_cache(path)
    assert (code, algo) == (100300, "MinMaxCalibration")
    assert list(scales) == ["x", "ns:a:b"]
    assert scales["x"] == float(np.float32(0.1))
    assert scales["ns:a:b"] == 2.5


def test_trt_written_file_round_trips_byte_for_byte(tmp_path: Path) -> None:
    # As TensorRT writes it: numeric and unnamed-layer names, a zero entry, names with ':' and '/'.
    original = (
        b"TRT-8201-EntropyCalibration2\n"
        b"images: 3b66eddc\n"
        b"168: 3dc6cf6e\n"
        b"(Unnamed Layer* 3) [Constant]_output: 0\n"
        b"/backbone/stage1/Relu_output_0: 3c010a14\n"
        b"odd:name: 3d237c3a\n"
    )
    src = tmp_path / "trt.cache"
    src.write_bytes(original)
    code, algo, scales = read_cache(src)
    assert code == 8201 and algo == "EntropyCalibration2"
    assert scales["(Unnamed Layer* 3) [Constant]_output"] == 0.0
    assert scales["odd:name"] == struct.unpack(">f", bytes.fromhex("3d237c3a"))[0]
    again = write_cache(tmp_path / "again.cache", code, scales, algo)
    assert again.read_bytes() == original
    assert read_cache(again) == (code, algo, scales)


def test_padded_zero_reads_as_zero(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("TRT-8502-EntropyCalibration2\nt: 00000000\n")
    assert read_cache(path)[2] == {"t": 0.0}


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("TRT-8502-EntropyCalibration2\nt:3c010204\n", 2),  # trtexec reads 2 chars after ':'
        ("TRT-8502-EntropyCalibration2\nt: zz010204\n", 2),
        ("TRT-8502-EntropyCalibration2\nt: 3c0102041\n", 2),  # trtexec would silently take 8 of 9
        ("TRT-8502-EntropyCalibration2\nok: 3c010204\nno colon here\n", 3),
        ("TRT-8502-EntropyCalibration2\nt: 3c010204\nt: 3c010204\n", 3),
        ("TRT--EntropyCalibration2\nt: 3c010204\n", 1),
        ("input: 3c010204\n", 1),
    ],
)
def test_malformed_names_file_and_line(tmp_path: Path, body: str, line: int) -> None:
    path = tmp_path / "bad.cache"
    path.write_text(body)
    with pytest.raises(UserError, match=rf"bad\.cache:{line}:"):
        read_cache(path)


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_cache(tmp_path / "nope")
    (tmp_path / "empty").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_cache(tmp_path / "empty")


@pytest.mark.parametrize("scales", [{"t": -0.5}, {"t": float("nan")}, {"t": float("inf")}, {"a\nb": 1.0}])
def test_write_refuses_unwritable(tmp_path: Path, scales: dict[str, float]) -> None:
    with pytest.raises(UserError):
        write_cache(tmp_path / "c", 8502, scales)
    assert not list(tmp_path.iterdir())


def test_check_cache(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "head.calib.cache", 8502, {"input": 0.02})
    onnx_sha = "ab" * 32
    binding = {"onnx_sha256": onnx_sha, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert check_cache(path, 8502, onnx_sha, binding) == {"input": float(np.float32(0.02))}
    with pytest.raises(UserError, match="TensorRT version code 8502.*100300"):
        check_cache(path, 100300, onnx_sha, binding)
    with pytest.raises(UserError, match="stale calibration cache"):
        check_cache(path, 8502, "cd" * 32, binding)
    with pytest.raises(UserError, match="does not say which ONNX"):
        check_cache(path, 8502, onnx_sha, {})
    path.write_text(path.read_text() + "extra: 3f800000\n")
    with pytest.raises(UserError, match="modified after export"):
        check_cache(path, 8502, onnx_sha, binding)
