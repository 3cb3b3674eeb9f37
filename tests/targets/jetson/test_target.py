"""``bottlefit export --target jetson`` end to end: bundles for ResNet-152 (ver2, 12ch) and DenseNet-169 on
Orin and Nano, checked the way the board will check them, and the refusals (exit 2, one line).

Each bundle is exported once per module. To keep the run short, two of the four exports also carry an option:
DenseNet-169/Orin uses --int8-output (the wire contract), DenseNet-169/Nano forces int8 (--precision int8 --force).
The models have untrained (random) weights, whose logits are near ties: top-1 agreement of an int8 head is not
meaningful there, so it is reported but not gated (--tolerance logits.top1_agreement=0); every bottleneck
tolerance stays at parity's default.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bottlefit.calibration.trt_cache import check_cache, read_cache
from bottlefit.cli import main
from bottlefit.errors import UserError
from bottlefit.exporter.manifest import check_hashes
from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner
from bottlefit.targets.jetson import TARGET, JetsonOptions, lint_or_fail
from bottlefit.targets.jetson.lint import lint_onnx
from bottlefit.targets.jetson.profiles import get_profile
from bottlefit.targets.jetson.trtexec import write_export_output

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False
NO_TRT = "TensorRT is not installable on this host (no tensorrt wheel/GPU here); engine build runs on a Jetson"

# the authors'-format R152 file holds random weights it cannot declare: the untrained int8 gates are stated
FAST = ["--parity-count", "4", "--calib-count", "16", "--quiet", "--tolerance", "logits.top1_agreement=0",
        "--tolerance", "bottleneck.cosine=0.98", "--tolerance", "bottleneck.sqnr_db=15"]
D169 = ["--untrained", "--arch", "custom_densenet169", "--bottleneck-channel", "12"]
# (id, model, profile, extra options, engine precision of build_engine.sh)
BUNDLES = {
    "r152-orin": ("r152", "orin", [], "int8"),
    "r152-nano": ("r152", "nano", [], "fp16"),
    "d169-orin": ("d169", "orin", ["--int8-output"], "int8"),
    "d169-nano": ("d169", "nano", ["--precision", "int8", "--force"], "int8"),
}
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def bundles(authors_r152: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    out: dict[str, tuple[Path, int]] = {}
    for key, (model, profile, extra, _) in BUNDLES.items():
        root = tmp_path_factory.mktemp(key)
        src = [str(authors_r152)] if model == "r152" else D169
        rc = main(["export", *src, "--target", "jetson", "--profile", profile, "--out", str(root), *FAST, *extra])
        out[key] = (root / "jetson", rc)
    return out


@pytest.fixture(params=list(BUNDLES))
def bundle(request: pytest.FixtureRequest, bundles: dict[str, tuple[Path, int]]) -> tuple[str, Path]:
    d, rc = bundles[request.param]
    assert rc == 0, f"{request.param}: export exit code {rc}"
    return request.param, d


def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "manifest.json").read_text())


def _arts(d: Path) -> dict[str, dict[str, Any]]:
    return {a["file"]: a for a in _manifest(d)["artifacts"]}


def _qdq_activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of every QuantizeLinear on an activation, keyed by the fp32 tensor it quantizes."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            # ONNX Runtime renames a quantized graph output "<name>_QuantizeLinear_Input".
            name = n.input[0].removesuffix("_QuantizeLinear_Input")
            out[name] = float(inits[n.input[1]].reshape(()))
    return out


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}


# ------------------------------------------------------------------------------------------ the bundles


@pytest.mark.slow
def test_bundle_files_and_parity(bundle: tuple[str, Path]) -> None:
    key, d = bundle
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    config = json.loads((d / "client.json").read_text())
    (client,) = config["heads"]
    assert files == sorted(["README.md", "boardcodec.py", "boardhead.py", "boardhttp.py", "build_engine.sh",
                            "client.json", "client.py",
                            f"codec/{client['contract_id']}.npz", "golden/golden.json", "golden/input.input.bin",
                            "golden/output.bottleneck.bin", "head.calib.cache", "head.onnx", "head.qdq.onnx",
                            "manifest.json", "report.json", "report.md", "verify_on_board.py"])
    # the board client's wire: the Q/DQ head's symmetric int8 codes, its tables, the tail's name on the server
    assert client["head"] == "head.qdq.onnx" and client["dtype"] == "int8" and client["zero_point"] == 0
    assert client["codec_tables"] == f"codec/{client['contract_id']}.npz" and config["golden_input"]
    report = json.loads((d / "report.json").read_text())
    assert report["passed"] is True and report["images"]["count"] == 4
    checks = {(c["artifact"], c["metric"]): c for c in report["checks"]}
    qdq = {m: checks[("head.qdq.onnx", f"bottleneck.{m}")] for m in ("cosine", "sqnr_db")}
    assert qdq["cosine"]["value"] >= 0.98 and qdq["cosine"]["tolerance"] == 0.98
    assert qdq["sqnr_db"]["value"] >= 15.0 and qdq["sqnr_db"]["tolerance"] == 15.0
    assert checks[("head.onnx", "bottleneck.max_abs_error")]["value"] <= 1e-4
    arts = _arts(d)
    assert arts["head.qdq.onnx"]["role"] == "head" and arts["head.qdq.onnx"]["runtime"] == "onnxruntime"
    assert arts["head.qdq.onnx"]["precision"] == "int8" and arts["head.qdq.onnx"]["parity"] is True
    assert arts["head.onnx"]["precision"] == "fp32" and arts["head.onnx"]["parity"] is True
    assert {a["role"] for f, a in arts.items() if not f.startswith("head.") or f == "head.calib.cache"} == {"aux"}
    assert not any(a["parity"] for f, a in arts.items() if a["role"] == "aux")
    check_hashes(d, _manifest(d))  # every listed file is there, byte for byte


@pytest.mark.slow
def test_qdq_is_symmetric_and_lint_clean(bundle: tuple[str, Path]) -> None:
    key, d = bundle
    profile = get_profile(BUNDLES[key][1])
    qdq = onnx.load(str(d / "head.qdq.onnx"))
    inits = {i.name: i for i in qdq.graph.initializer}
    nodes = [n for n in qdq.graph.node if n.op_type in QDQ]
    assert len(nodes) >= 10
    for n in nodes:
        assert len(n.input) == 3 and n.input[2] in inits, n.name  # explicit zero point (TensorRT 8 needs it)
        zp = inits[n.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8, n.name
        assert not numpy_helper.to_array(zp).any(), n.name
    weight_scales = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes
                     if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert any(s.size > 1 for s in weight_scales)  # per-channel weights
    assert all(s.size == 1 for s in _qdq_activation_scales(qdq).values() for s in [np.array(s)])
    for name in ("head.onnx", "head.qdq.onnx"):
        model = onnx.load(str(d / name))
        assert model.opset_import[0].version == 13
        assert [i for i in lint_onnx(model, profile) if i.severity == "error"] == []


@pytest.mark.slow
def test_cache_matches_qdq_scales_and_names(bundle: tuple[str, Path]) -> None:
    key, d = bundle
    profile = get_profile(BUNDLES[key][1])
    lines = (d / "head.calib.cache").read_text().splitlines()
    assert lines[0] == f"TRT-{profile.trt_code}-EntropyCalibration2"
    assert lines[0] == ("TRT-100300-EntropyCalibration2" if profile.name == "orin" else "TRT-8201-EntropyCalibration2")
    cache: dict[str, float] = {}
    for line in lines[1:]:
        pos = line.rfind(":")  # trtexec's rule: the last ':', then 8 hex digits two characters after it
        assert line[pos : pos + 2] == ": " and re.fullmatch(r"[0-9a-f]{8}", line[pos + 2 :]), line
        cache[line[:pos]] = float(np.frombuffer(bytes.fromhex(line[pos + 2 :])[::-1], dtype="<f4")[0])
    assert read_cache(d / "head.calib.cache")[2] == cache

    head = onnx.load(str(d / "head.onnx"))
    names = _tensor_names(head)
    node_outputs = [o for n in head.graph.node for o in n.output]
    assert set(cache) <= names and "input" in cache and "bottleneck" in cache
    assert list(cache) == ["input", *node_outputs]  # every tensor TensorRT names, in graph order
    qdq_scales = _qdq_activation_scales(onnx.load(str(d / "head.qdq.onnx")))
    assert set(cache) <= set(qdq_scales)
    for name, scale in cache.items():
        assert np.float32(scale) == np.float32(qdq_scales[name]), name  # bit-identical, the same ranges

    binding = _arts(d)["head.calib.cache"]["extra"]["binds"]
    sha = hashlib.sha256((d / "head.onnx").read_bytes()).hexdigest()
    assert binding == {"onnx": "head.onnx", "onnx_sha256": sha}
    assert check_cache(d / "head.calib.cache", profile.trt_code, sha, binding) == cache


def _run_verify(d: Path, output: Path, precision: str, int8: bool) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(d / "verify_on_board.py"), f"--golden={d / 'golden'}", f"--output={output}",
            f"--precision={precision}"] + (["--engine-output=int8"] if int8 else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_board_verifier_on_ort_outputs(bundle: tuple[str, Path], tmp_path: Path) -> None:
    """What trtexec would write on the board, made here by ONNX Runtime from the route's ONNX under ONNX spec
    semantics (TensorRT computes the Q/DQ graph as specified; this host's fused int8 kernels may not)."""
    key, d = bundle
    precision = BUNDLES[key][3]
    int8_out = "--int8-output" in BUNDLES[key][2]
    golden = json.loads((d / "golden" / "golden.json").read_text())
    x = np.fromfile(d / "golden" / "input.input.bin", dtype="<f4").reshape(golden["inputs"][0]["shape"])
    onnx_file = "head.qdq.onnx" if precision == "int8" else "head.onnx"
    (z,) = OnnxRuntimeRunner(d / onnx_file, reference=True).infer({"input": x}).values()
    assert z.dtype == (np.int8 if int8_out else np.float32)
    good = write_export_output(tmp_path / "good.json", {"bottleneck": z})
    run = _run_verify(d, good, precision, int8_out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("PASS")

    rng = np.random.default_rng(0)
    if int8_out:
        bad_z = np.clip(z.astype(np.int32) + rng.integers(-40, 41, z.shape), -128, 127).astype(np.int8)
    else:
        bad_z = z + rng.normal(0, float(np.abs(z).max()) * 0.3, z.shape).astype(np.float32)
    bad = write_export_output(tmp_path / "bad.json", {"bottleneck": bad_z})
    run = _run_verify(d, bad, precision, int8_out)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL" in run.stdout


@pytest.mark.slow
def test_build_script_flags(bundle: tuple[str, Path]) -> None:
    key, d = bundle
    script = (d / "build_engine.sh").read_text()
    assert subprocess.run(["bash", "-n", str(d / "build_engine.sh")], capture_output=True).returncode == 0
    assert (d / "build_engine.sh").stat().st_mode & 0o111
    if BUNDLES[key][1] == "nano":
        assert "--workspace=1024 --buildOnly" in script and "--memPoolSize" not in script
    else:
        assert "--memPoolSize=workspace:1024M --skipInference" in script
        assert "--workspace=" not in script and "--buildOnly" not in script
    routes = re.findall(r"^route_(\w+)\(\) \{$", script, re.M)
    assert routes == (["qdq", "cache"] if BUNDLES[key][3] == "int8" else ["fp16", "fp32"])
    if "cache" in routes:
        assert "--onnx=head.onnx --int8 --calib=head.calib.cache" in script
    if "qdq" in routes:
        assert "--onnx=head.qdq.onnx --int8" in script
    if "fp16" in routes:
        assert "--onnx=head.onnx --fp16" in script
    readme = (d / "README.md").read_text()
    assert "./build_engine.sh" in readme and "scp" in readme


@pytest.mark.slow
def test_wire_contract_default_float(bundles: dict[str, tuple[Path, int]]) -> None:
    d, _ = bundles["r152-orin"]
    out = _arts(d)["head.qdq.onnx"]["outputs"][0]
    assert out == {"name": "bottleneck", "shape": [1, 12, 29, 29], "dtype": "float32", "layout": "NCHW",
                   "scale": None, "zero_point": None}
    assert onnx.load(str(d / "head.qdq.onnx")).graph.node[-1].op_type == "DequantizeLinear"


@pytest.mark.slow
def test_wire_contract_int8_output(bundles: dict[str, tuple[Path, int]]) -> None:
    d, rc = bundles["d169-orin"]
    assert rc == 0
    out = _arts(d)["head.qdq.onnx"]["outputs"][0]
    qdq = onnx.load(str(d / "head.qdq.onnx"))
    assert out["dtype"] == "int8" and out["zero_point"] == 0
    assert out["scale"] == pytest.approx(_qdq_activation_scales(qdq)["bottleneck"], rel=0, abs=0)
    assert qdq.graph.node[-1].op_type == "QuantizeLinear"
    assert qdq.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT8  # 1 byte per element
    golden = json.loads((d / "golden" / "golden.json").read_text())
    assert golden["outputs"][0]["scale"] == out["scale"]
    script = (d / "build_engine.sh").read_text()
    assert script.count("--outputIOFormats=int8:chw") == 2 and script.count("--engine-output=int8") == 2


@pytest.mark.slow
def test_nano_default_is_fp16_and_forced_int8(bundles: dict[str, tuple[Path, int]]) -> None:
    fp16, _ = bundles["r152-nano"]
    forced, rc = bundles["d169-nano"]
    assert rc == 0
    assert _arts(fp16)["head.onnx"]["extra"]["jetson"]["precision"] == "fp16"
    assert _arts(forced)["head.onnx"]["extra"]["jetson"]["precision"] == "int8"
    assert _arts(forced)["head.onnx"]["extra"]["jetson"]["force"] is True
    # The fp16 bundle still ships the int8 pieces for users who force int8 on the board.
    assert (fp16 / "head.qdq.onnx").is_file() and (fp16 / "head.calib.cache").is_file()
    # fp16 golden outputs are PyTorch fp32, int8 golden outputs are the Q/DQ graph in ONNX Runtime.
    assert _arts(fp16)["golden/output.bottleneck.bin"]["extra"]["reference"] == "PyTorch fp32 head"
    assert _arts(forced)["golden/output.bottleneck.bin"]["extra"]["reference"] == (
        "head.qdq.onnx under ONNX spec semantics (ONNX Runtime, graph optimizations off)")
    golden = json.loads((forced / "golden" / "golden.json").read_text())
    assert golden["made_with"] == _arts(forced)["golden/output.bottleneck.bin"]["extra"]["reference"]


# ------------------------------------------------------------------------------------------ refusals


def _opts(**kw: Any) -> JetsonOptions:
    return JetsonOptions(**{"profile": "orin", **kw})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"profile": None}, "--target jetson needs --profile {nano,xavier-nx,orin}"),
        ({"profile": "tx2"}, "unknown Jetson profile 'tx2'"),
        ({"profile": "nano", "precision": "int8"}, "no int8 kernels"),
        ({"profile": "nano", "opset": 17}, "parses ONNX opsets up to 13"),
        ({"profile": "nano", "opset": 17, "force": True}, "parses ONNX opsets up to 13"),
        ({"profile": "orin", "jetpack": "6.0"}, "TensorRT 8.6.2"),
        ({"profile": "nano", "int8_output": True, "precision": "int8", "force": True}, "raw bytes"),
        ({"profile": "orin", "precision": "fp16", "int8_output": True}, "needs an int8 engine"),
    ],
)
def test_validate_refuses(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        TARGET.validate(_opts(**kw))


def test_validate_accepts_forced_int8_on_nano() -> None:
    TARGET.validate(_opts(profile="nano", precision="int8", force=True))
    TARGET.validate(_opts(profile="xavier-nx", opset=17, int8_output=True))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--profile", "tx2"], "unknown Jetson profile 'tx2'"),
        (["--profile", "nano", "--precision", "int8"], "no int8 kernels"),
        (["--profile", "nano", "--opset", "17"], "opsets up to 13"),
        (["--profile", "orin", "--calib", "/nonexistent"], "calibration data not found"),
    ],
)
def test_export_refuses_with_one_line(extra: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", *D169, "--target", "jetson", "--out", str(tmp_path), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("bottlefit: error: ") and message in err
    assert not (tmp_path / "jetson").exists()


@pytest.mark.slow
def test_lint_failure_names_node_and_op(bundles: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    d, _ = bundles["r152-nano"]
    model = onnx.load(str(d / "head.onnx"))
    # Unique: no TensorRT parser has it; the op check must name the node even in an otherwise valid graph.
    last = model.graph.node[-1]
    model.graph.node.append(helper.make_node("Unique", [last.output[0]], ["uniq_values"], name="uniq"))
    path = tmp_path / "head.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserError) as e:
        lint_or_fail(path, get_profile("nano"))
    msg = str(e.value)
    assert "\n" not in msg and "head.onnx" in msg and "TensorRT 8.2.1" in msg
    assert "uniq (Unique)" in msg and "not in the verified TensorRT 8.2 ONNX parser support table" in msg


def _copy_bundle(d: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "jetson"
    shutil.copytree(d, dst)
    return dst


@pytest.mark.slow
@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the build itself is exercised instead")
def test_jetson_build_without_tensorrt(bundles: dict[str, tuple[Path, int]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy_bundle(bundles["r152-orin"][0], tmp_path)
    assert main(["jetson", "build", str(d), "--route", "cache"]) == 3  # no TensorRT here: environment
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT is not installed here: " in err


@pytest.mark.slow
def test_jetson_build_refuses_stale_cache(bundles: dict[str, tuple[Path, int]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy_bundle(bundles["r152-orin"][0], tmp_path / "a")
    cache = d / "head.calib.cache"
    cache.write_text(cache.read_text().replace("TRT-100300-", "TRT-8502-", 1))  # a JetPack 5 cache
    assert main(["jetson", "build", str(d), "--route", "cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT version code 8502, the board runs 100300" in err

    d = _copy_bundle(bundles["r152-orin"][0], tmp_path / "b")
    model = onnx.load(str(d / "head.onnx"))
    model.doc_string = "edited after export"
    onnx.save(model, str(d / "head.onnx"))
    assert main(["jetson", "build", str(d), "--route", "cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale calibration cache" in err

    binding = _arts(d)["head.calib.cache"]["extra"]["binds"]
    with pytest.raises(UserError, match="stale"):
        check_cache(d / "head.calib.cache", 100300, "0" * 64, binding)
    with pytest.raises(UserError, match="version code 100300, the board runs 8201"):
        check_cache(d / "head.calib.cache", 8201, binding["onnx_sha256"], binding)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_build_engine_option_needs_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", *D169, "--target", "jetson", "--profile", "orin", "--build-engine", "--out",
               str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    # this machine lacks TensorRT: an environment problem (3), not the user's input (2)
    assert rc == 3 and err.count("\n") == 1 and err.startswith("bottlefit: cannot run here: ")
    assert "TensorRT is not installed here" in err and not (tmp_path / "jetson").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
@pytest.mark.parametrize("route", ["qdq", "cache", "fp16"])
def test_tensorrt_engine_build_and_golden(bundles: dict[str, tuple[Path, int]], tmp_path: Path,
                                          route: str) -> None:
    """Where TensorRT and a GPU exist: build through the Python API and check against the golden outputs."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    if route == "cache" and not trt.__version__.startswith("10.3.0"):
        pytest.skip(f"the Orin JetPack 6 cache is for TensorRT 10.3.0; this is {trt.__version__}")
    d = _copy_bundle(bundles["r152-orin"][0], tmp_path)
    assert main(["jetson", "build", str(d), "--route", route]) == 0
    assert (d / "engines" / f"head.{route}.engine").stat().st_size > 0


def test_board_files_ship_as_package_data() -> None:
    from importlib.resources import files

    pkg = files("bottlefit.targets.jetson")
    assert pkg.joinpath("board/verify_on_board.py").is_file() and pkg.joinpath("trt_ops.json").is_file()
    text = Path("pyproject.toml").read_text() if Path("pyproject.toml").is_file() else ""
    assert '"bottlefit.targets.jetson" = ["board/*", "*.json"]' in text
