"""The rpi bundle as a person meets it on a Pi: a README that names the folder to copy, the exact wheel versions
the bundle is checked with and an image that is in the bundle; board scripts with the host's flag names (old
spellings warn and still work), no file written unasked, softmax probabilities; the same default head on host and
board; the manifest names the board it was made for."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bottlefit.emulation.arm64 import WHEELS
from bottlefit.targets.rpi.profiles import DEFAULT, PROFILES

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of a mini_resnet export for onnx (int8) and rpi, no emulation (seconds): OUT/onnx and OUT/rpi."""
    from bottlefit.pipeline.export import export_targets
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions
    from bottlefit.targets.rpi import RpiOptions

    out = tmp_path_factory.mktemp("rpi-shell") / "out"
    model = ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4)
    parity = ParityOptions(emulate=Emulate.parse("none"))
    results = export_targets([ExportRequest(model, "onnx", out, OnnxOptions(int8=True, triton=False), parity=parity),
                              ExportRequest(model, "rpi", out, RpiOptions(), parity=parity)])
    assert all(r.verdict.passed for r in results)
    return out


def _script(out: Path, name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(out / "rpi" / "board" / name), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _pins(line: str) -> list[str]:
    return line.split("pip install", 1)[1].split("#", 1)[0].replace("'", "").split()


def test_readme_names_the_folder_the_pinned_wheels_and_an_image_of_the_bundle(bundle: Path) -> None:
    board = bundle / "rpi" / "board"
    text = (board / "README.md").read_text()
    golden = json.loads((board / "golden.json").read_text())
    assert "scp -r OUT/rpi " in text and "`rpi/` folder" in text and "python3 -m venv" in text
    heads = re.findall(r"`([^`]+)`", text.split("Heads: ", 1)[1].split("\n", 1)[0])
    assert heads == ["head.fp32.tflite", "head.int8.ncnn.param", "head.int8.onnx", "head.int8.tflite"]
    assert all((bundle / "rpi" / h).is_file() for h in heads)
    assert f"default head is `{golden['profile']['model']}`" in " ".join(text.split())
    # the versions: exactly the wheels the emulated Pi checks the bundle with, which are pyproject's own pins
    pip = [line for line in text.splitlines() if line.strip().startswith("pip install")]
    assert _pins(pip[0]) == list(WHEELS)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {r.split("==")[0]: r for r in project["dependencies"] + project["optional-dependencies"]["rpi"]
              if "==" in r}
    assert [w for w in WHEELS if w.split("==")[0] in pinned] == [pinned[w.split("==")[0]] for w in WHEELS
                                                                 if w.split("==")[0] in pinned]
    assert len([w for w in WHEELS if w.split("==")[0] in pinned]) == 3  # onnxruntime, ai-edge-litert, ncnn
    assert _pins(pip[1]) == [r for r in project["dependencies"] if r.startswith("pillow")]
    assert _pins(pip[2]) == project["optional-dependencies"]["board"]
    # every image the README sends is in the bundle (no cat.jpg for a digits model)
    commands = [line for line in text.splitlines() if line.strip().startswith("python3 ")]
    images = {m for line in commands for m in re.findall(r"--image (\S+)", line)}
    assert images == {"example.png"} and all((board / i).is_file() for i in images) and "cat.jpg" not in text


def test_the_example_image_is_a_golden_input(bundle: Path) -> None:
    """example.png through the board's own preprocessing is the first golden input, within 8-bit rounding."""
    board = bundle / "rpi" / "board"
    spec = importlib.util.spec_from_file_location("bundle_run_head", board / "run_head.py")
    run_head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_head)
    golden = json.loads((board / "golden.json").read_text())
    entry = next(m for m in golden["models"] if m["runtime"] == "onnxruntime")  # float NCHW input
    x = run_head.preprocess(str(board / "example.png"), golden["preprocess"], entry["input"])
    want = np.load(board / entry["inputs_file"])[:1]
    step = 1 / 255 / min(golden["preprocess"]["std"])
    assert x.shape == want.shape and float(np.abs(x - want).max()) <= step / 2 + 1e-6


def test_run_head_writes_a_payload_only_when_asked_and_takes_the_hosts_flag_names(bundle: Path,
                                                                                    tmp_path: Path) -> None:
    r = _script(bundle, "run_head.py", "--image", str(bundle / "rpi" / "board" / "example.png"), "--runs", "1",
                cwd=tmp_path)
    assert r.returncode == 0 and list(tmp_path.iterdir()) == [] and "not written" in r.stdout
    r = _script(bundle, "run_head.py", "--golden", "--runs", "1", "--out", "p.bin", "--json", cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and (tmp_path / "p.bin").stat().st_size == doc["bytes"] == 4 * 100
    assert doc["model"] == PROFILES[DEFAULT].model  # the board profile's default head
    onnx = str(bundle / "rpi" / "head.int8.onnx")
    new = _script(bundle, "run_head.py", "--golden", "--runs", "1", "--runtime", "onnxruntime", "--head", onnx,
                  "--json")
    old = _script(bundle, "run_head.py", "--golden", "--runs", "1", "--runtime", "onnxruntime", "--model", onnx,
                  "--json")
    assert (new.returncode, old.returncode, new.stderr) == (0, 0, "")
    assert old.stderr == "warning: --model is deprecated; use --head\n"
    assert json.loads(new.stdout)["model"] == json.loads(old.stdout)["model"] == "head.int8.onnx"
    v = _script(bundle, "verify_on_board.py", "--runtime", "onnxruntime", "--model", onnx, "--json")
    assert v.returncode == 0 and v.stderr == "warning: --model is deprecated; use --head\n"


@pytest.mark.parametrize(("flags", "warning"), [
    (["--model-name", "x_tail"], ""),
    (["--model", "x_tail"], "warning: --model is deprecated; use --model-name\n"),
    (["--model-name", "x_tail", "--wire", "fp32"], ""),
    (["--model-name", "x_tail", "--fp32"], "warning: --fp32 is deprecated; use --wire fp32\n"),
    (["--model-name", "x_tail", "--codec", "context"], "warning: --codec context is deprecated; use --wire context\n"),
])
def test_board_client_takes_the_hosts_flag_names(bundle: Path, flags: list[str], warning: str) -> None:
    """The model name reaches the URL in either spelling (a server that is not there: each image fails, exit 1)."""
    r = _script(bundle, "client.py", "--golden", "--server", "http://127.0.0.1:9", "--retries", "0", "--timeout",
                "2", "--json", *flags)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 1 and r.stderr == warning and len(lines) == 4
    assert all("/v2/models/x_tail/infer" in line["error"] for line in lines)


def test_board_client_refuses_two_wires_in_the_old_spelling(bundle: Path) -> None:
    r = _script(bundle, "client.py", "--golden", "--codec", "context", "--fp32")
    assert r.returncode == 2 and "--codec context sends int8 codes; drop --fp32" in r.stderr


def test_host_and_board_pick_the_same_default_head(bundle: Path) -> None:
    """run-head on the export (or its rpi/) runs the head the board's scripts run: the board profile's default."""
    from bottlefit.serve.client import pick_head

    golden = json.loads((bundle / "rpi" / "board" / "golden.json").read_text())
    for where in (bundle, bundle / "rpi"):
        target, contract = pick_head(where)
        assert (target.path.name, contract.head) == ("rpi", golden["profile"]["model"])
        assert (contract.head, contract.runtime) == ("head.int8.ncnn.param", "ncnn") == (PROFILES[DEFAULT].model,
                                                                                         PROFILES[DEFAULT].runtime)
    assert pick_head(bundle / "onnx")[1].head == "head.int8.onnx"  # no board bundle: the int8 head
    assert pick_head(bundle, "head.int8.tflite")[1].head == "head.int8.tflite"


def test_the_manifest_names_the_board_the_bundle_is_for(bundle: Path) -> None:
    m = json.loads((bundle / "rpi" / "manifest.json").read_text())
    golden = json.loads((bundle / "rpi" / "board" / "golden.json").read_text())
    assert m["options"]["target"]["profile"] == DEFAULT == golden["profile"]["name"]  # not null: the board used
