"""arm64 user-mode emulation under real qemu: the sysroot is built once (~30 s, as root) and cached in cache_dir()."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bottlefit.emulation import arm64
from bottlefit.emulation.arm64 import (
    CORES,
    WHEELS,
    EmulationUnavailable,
    Sysroot,
    cache_dir,
    core_root,
    ensure_sysroot,
    get_core,
    guest_machine,
    run_python,
    sysroot_key,
)
from bottlefit.errors import UserError

# fixed int8 vectors at the type's edges; their int32 dot product, worked by hand
A = [-128, 127, 5, -3, 100, -100, 64, 1]
B = [127, -128, 7, 9, -2, 3, -64, 127]
DOT = -36973

GUEST_SCRIPT = """\
import importlib.metadata, json, sys, time
import numpy as np
import ai_edge_litert.interpreter
import ncnn
t = time.perf_counter()
import onnxruntime as ort
import_s = time.perf_counter() - t
a = np.array(json.loads(sys.argv[1]), dtype=np.int8)
b = np.array(json.loads(sys.argv[2]), dtype=np.int8)
session = ort.InferenceSession(sys.argv[3], providers=["CPUExecutionProvider"])
(ort_out,) = session.run(None, {"a": a.reshape(1, -1)})
print(json.dumps({
    "numpy": np.__version__,
    "ai-edge-litert": importlib.metadata.version("ai-edge-litert"),
    "onnxruntime": ort.__version__,
    "ncnn": importlib.metadata.version("ncnn"),
    "device": ort.get_device(),
    "dot": int(np.dot(a.astype(np.int32), b.astype(np.int32))),
    "ort_dot": int(ort_out.reshape(-1)[0]),
    "ort_dtype": str(ort_out.dtype),
    "cpuinfo": open("/proc/cpuinfo").read(),
    "onnxruntime_import_s": import_s,
}))
"""


@pytest.fixture(scope="session")
def sysroot() -> Sysroot:
    try:
        return ensure_sysroot()
    except EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def matmul_integer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX MatMulInteger graph: int8 a[1,8] times the int8 constant B[8,1], int32 out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array(B, dtype=np.int8).reshape(-1, 1), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "dot",
                              [helper.make_tensor_value_info("a", TensorProto.INT8, [1, len(A)])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "dot.onnx"
    onnx.save(model, path)
    return path


def test_dot_is_worked_right() -> None:
    assert sum(x * y for x, y in zip(A, B, strict=True)) == DOT


@pytest.mark.parametrize("profile", ["pi4", "pi5"])
def test_guest_is_aarch64(sysroot: Sysroot, profile: str) -> None:
    assert guest_machine(sysroot, get_core(profile)) == "aarch64"


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["pi4", "pi5"])
def test_guest_runtimes(sysroot: Sysroot, matmul_integer: Path, tmp_path: Path, profile: str) -> None:
    core = get_core(profile)
    script = tmp_path / "guest.py"
    script.write_text(GUEST_SCRIPT)
    proc = run_python(sysroot, core, script, [json.dumps(A), json.dumps(B), str(matmul_integer)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    pins = dict(pin.split("==") for pin in WHEELS)
    assert {name: got[name] for name in pins} == pins
    assert got["device"] == "CPU"
    assert got["dot"] == DOT
    assert (got["ort_dot"], got["ort_dtype"]) == (DOT, "int32")
    # the guest sees its own core's cpuinfo (4 processors, the core's part and features), not the host's
    assert got["cpuinfo"] == core.cpuinfo()
    assert got["cpuinfo"].count("processor\t:") == 4
    assert f"CPU part\t: {core.cpuinfo_part}" in got["cpuinfo"]
    assert ("asimddp" in got["cpuinfo"]) == (profile == "pi5")


@pytest.mark.slow
def test_exit_code_is_returned(sysroot: Sysroot, tmp_path: Path) -> None:
    script = tmp_path / "exit3.py"
    script.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n")
    proc = run_python(sysroot, get_core("pi4"), script, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


@pytest.mark.slow
def test_relative_script_with_cwd(sysroot: Sysroot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a relative script path means the caller's working directory, not cwd's (the demo's out/demo/... bundle)
    (tmp_path / "board").mkdir()
    (tmp_path / "board" / "hi.py").write_text("print('hi')\n")
    monkeypatch.chdir(tmp_path)
    proc = run_python(sysroot, get_core("pi4"), Path("board/hi.py"), cwd=Path("board"))
    assert (proc.returncode, proc.stdout) == (0, "hi\n"), proc.stderr


@pytest.mark.slow
def test_args_env_and_cwd_reach_the_guest(sysroot: Sysroot, tmp_path: Path) -> None:
    script = tmp_path / "echo.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps([sys.argv[1:], os.environ['BOTTLEFIT_X'], os.getcwd(), sys.version_info[:2]]))"
                      "\n")
    proc = run_python(sysroot, get_core("zero2"), script, ["a b", "é"], cwd=tmp_path, env={"BOTTLEFIT_X": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [["a b", "é"], "1", str(tmp_path), [3, 11]]


@pytest.mark.slow
def test_second_call_reuses_the_sysroot(sysroot: Sysroot) -> None:
    marker = sysroot.root.parent / arm64.MARKER
    before = (os.stat(sysroot.root).st_ino, marker.stat().st_mtime_ns)
    again = ensure_sysroot()
    assert again == sysroot
    assert (os.stat(again.root).st_ino, marker.stat().st_mtime_ns) == before
    assert sysroot.root.parent.parent == cache_dir()
    assert sysroot.root.parent.name == f"arm64-{sysroot.key}"
    assert not list(cache_dir().glob(f".arm64-{sysroot.key}.building-*"))


@pytest.mark.slow
def test_sysroot_contents(sysroot: Sysroot) -> None:
    assert sysroot.python().is_file()
    assert not list((sysroot.root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    assert not (sysroot.root / "proc" / "cpuinfo").exists()  # each core's cpuinfo lives in its own -L prefix
    info = sysroot.describe()
    assert info["debian"] == "bookworm" and info["python"] == "3.11" and info["key"] == sysroot.key
    assert info["qemu"].startswith("qemu-aarch64 version")
    assert [w.split("-")[0] for w in info["wheels"]] == ["ai_edge_litert", "ncnn", "numpy", "onnxruntime"]
    assert all("aarch64" in w and "cp311" in w for w in info["wheels"])
    for core in CORES.values():
        view = core_root(sysroot, core)
        assert (view / "proc" / "cpuinfo").read_text() == core.cpuinfo()
        assert (view / "usr" / "bin" / "python3.11").resolve() == sysroot.python().resolve()


@pytest.mark.slow
def test_a_new_core_gets_its_own_prefix(sysroot: Sysroot) -> None:
    pi4 = get_core("pi4")
    odd = arm64.Core("test", pi4.cpu, "test board", "0xd08", pi4.features + " evtstrm")
    view = core_root(sysroot, odd)
    assert view != core_root(sysroot, pi4)
    assert core_root(sysroot, odd) == view
    assert (view / "proc" / "cpuinfo").read_text() == odd.cpuinfo()
    shutil.rmtree(view)


def test_unknown_profile() -> None:
    with pytest.raises(UserError) as err:
        get_core("pi9")
    assert "pi9" in str(err.value) and "pi4" in str(err.value) and "pi5" in str(err.value)


def test_cores() -> None:
    """The CPU part the emulated /proc/cpuinfo shows is the one ARM gives the core qemu emulates (runtimes pick
    kernels by it), keyed by core, not by board, on every processor the board has."""
    arm = {"cortex-a53": "0xd03", "cortex-a72": "0xd08", "cortex-a76": "0xd0b"}  # MIDR_EL1 PartNum, ARM's TRMs
    for p, c in CORES.items():
        assert get_core(p).profile == p and c.cpuinfo_part == arm[c.cpu], p
        info = c.cpuinfo()
        assert info.count(f"CPU part\t: {c.cpuinfo_part}\n") == info.count("processor\t:") == c.processors
    a76 = set(CORES["pi5"].features.split())
    assert set(CORES["pi4"].features.split()) < a76
    assert {"atomics", "fphp", "asimdhp", "asimdrdm", "lrcpc", "dcpop", "asimddp"} <= a76


def test_sysroot_key() -> None:
    base = sysroot_key("bookworm", ("python3.11", "libstdc++6"), WHEELS, 1)
    assert base == sysroot_key("bookworm", ["python3.11", "libstdc++6"], list(WHEELS), 1)
    assert len(base) == 16 and int(base, 16) >= 0
    changed = ("numpy==2.4.5", *WHEELS[1:])
    others = [sysroot_key("bookworm", ("python3.11", "libstdc++6"), changed, 1),
              sysroot_key("trixie", ("python3.11", "libstdc++6"), WHEELS, 1),
              sysroot_key("bookworm", ("python3.11",), WHEELS, 1),
              sysroot_key("bookworm", ("python3.11", "libstdc++6"), WHEELS, 2)]
    assert len({base, *others}) == 5


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BOTTLEFIT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BOTTLEFIT_CACHE")
    assert cache_dir() == tmp_path / "x" / "bottlefit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "bottlefit"


def test_no_qemu_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: the missing-tool path, not a faked runtime
    monkeypatch.setenv("BOTTLEFIT_CACHE", str(tmp_path / "cache"))
    for call in (ensure_sysroot, lambda: run_python(Sysroot(tmp_path, tmp_path, "k"), get_core("pi4"), tmp_path)):
        with pytest.raises(EmulationUnavailable) as err:
            call()
        assert "apt-get install qemu-user-static" in str(err.value)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_uncached_and_not_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if shutil.which(arm64.QEMU) is None:
        pytest.skip(f"{arm64.QEMU} is not installed")
    monkeypatch.setenv("BOTTLEFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(arm64.os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationUnavailable) as err:
        ensure_sysroot()
    assert "root" in str(err.value) and "debootstrap" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()
