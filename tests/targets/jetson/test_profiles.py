from __future__ import annotations

import pytest

from bottlefit.errors import UserError
from bottlefit.exporter.onnx import MIN_QDQ_OPSET
from bottlefit.targets.jetson.lint import load_ops_table
from bottlefit.targets.jetson.profiles import PROFILES, Profile, check_request, get_profile, names, trt_version_code


def _sm(p: Profile) -> tuple[int, int]:
    major, minor = p.sm.split(".")
    return int(major), int(minor)


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: f"{p.name}-{p.jetpack[0]}")
def test_each_row_agrees_with_its_gpu_and_its_tensorrt(p: Profile) -> None:
    """A row's flags follow from its GPU and its TensorRT, so a row edited on one side only fails here: int8 kernels
    need SM >= 6.1 (else an int8 engine is slower than fp16: fp16 is the default), TF32 exists from Ampere (SM 8),
    trtexec 8.2 knows only --workspace and 10.x only --memPoolSize with a unit and --skipInference, 8.2 streams
    int8 outputs as raw characters, and lint needs the row's parser support table."""
    trt = tuple(int(v) for v in p.trt_version.split(".")[:2])
    assert p.fast_int8 == (_sm(p) >= (6, 1))
    assert p.default_precision == ("int8" if p.fast_int8 else "fp16")
    assert p.tf32 == (_sm(p)[0] >= 8)
    assert p.workspace(512) == ("--workspace=512" if trt < (8, 4) else
                                "--memPoolSize=workspace:512" + ("M" if trt >= (10, 0) else ""))
    assert p.build_only_flag == ("--skipInference" if trt >= (8, 6) else "--buildOnly")
    assert p.int8_export_numeric == (trt > (8, 2))
    assert p.trt_code == trt_version_code(p.trt_version) and p.ops_key in load_ops_table()
    assert p.max_opset >= MIN_QDQ_OPSET  # per-channel Q/DQ heads (the int8 routes) need it


def test_orin_defaults_to_jetpack6_and_takes_jetpack51() -> None:
    jp6 = get_profile("orin")
    assert (jp6.trt_version, jp6.trt_code, jp6.sm) == ("10.3.0", 100300, "8.7")
    assert jp6.workspace(1024) == "--memPoolSize=workspace:1024M"
    assert jp6.build_only_flag == "--skipInference"  # --buildOnly is an unknown option on 10.x
    assert jp6.tf32
    for jp in ("6.1", "6.2", "6", "6.2.1"):
        assert get_profile("orin", jetpack=jp) is jp6
    jp5 = get_profile("orin", jetpack="5.1")
    assert (jp5.trt_version, jp5.trt_code, jp5.build_only_flag) == ("8.5.2", 8502, "--buildOnly")
    assert get_profile("orin", jetpack="5.1.2") is jp5


def test_nano_jetpack_versions() -> None:
    assert get_profile("nano", jetpack="4.6.4").trt_version == "8.2.1"
    with pytest.raises(UserError, match=r"4\.6\.0 ships TensorRT 8\.0\.1"):
        get_profile("nano", jetpack="4.6.0")


def test_unknown_profile_and_jetpack() -> None:
    with pytest.raises(UserError, match="nano, xavier-nx, orin"):
        get_profile("tx2")
    with pytest.raises(UserError, match="6.0 ships TensorRT 8.6.2"):
        get_profile("orin", jetpack="6.0")
    with pytest.raises(UserError, match="supported: 5.1"):
        get_profile("xavier-nx", jetpack="6.1")


@pytest.mark.parametrize(
    ("version", "code"),
    [("8.2.1", 8201), ("8.5.2", 8502), ("10.3.0", 100300), ("8.6.1", 8601), ("8.5.2.2", 8502), ("10.3.0.30", 100300)],
)
def test_trt_version_code(version: str, code: int) -> None:
    assert trt_version_code(version) == code


def test_trt_version_code_rejects_garbage() -> None:
    with pytest.raises(UserError):
        trt_version_code("ten")


def test_check_request() -> None:
    nano, nx, orin = get_profile("nano"), get_profile("xavier-nx"), get_profile("orin")
    reasons = check_request(nano, "int8", 13, force=False)
    assert len(reasons) == 1 and "int8" in reasons[0] and "--force" in reasons[0]
    assert "--force" not in check_request(nano, "int8", 13, force=True)[0]
    assert check_request(nano, "fp16", 13, force=False) == []
    assert "opset 17" in check_request(nano, "fp16", 17, force=False)[0]
    assert len(check_request(nano, "int8", 17, force=False)) == 2
    assert check_request(nx, "int8", 17, force=False) == []
    assert check_request(orin, "int8", 18, force=False)
    with pytest.raises(UserError, match="precision"):
        check_request(orin, "int4", 13, force=False)


def test_every_row_has_an_operator_table() -> None:
    table = load_ops_table()
    assert names() == ["nano", "xavier-nx", "orin"]
    for p in PROFILES:
        assert p.ops_key in table
