"""The README's promises that code can check: its Python example runs as written (in a scratch folder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    block = README.read_text().split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./run", "./run test"]


@pytest.mark.slow
def test_library_example_runs_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = re.search(r"## From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - our own README's example
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "out/rpi PASS"
    assert any("head.int8.onnx on emulated" in line for line in out)
    assert (tmp_path / "out" / "rpi" / "manifest.json").is_file()


def test_readme_says_what_the_first_run_does_and_costs() -> None:
    """What `./run` does on a fresh clone, with its measured costs: the install, the training, the sysroot."""
    paragraph = README.read_text().split("**The first run**", 1)[1].split("\n\n", 1)[0]
    first = " ".join(paragraph.split())
    for fact in ("7.6 GB", "2 min", "3 + 4 + 4 epochs", "arm64 sysroot", "110 MB downloaded", "447 MB on disk",
                 "55 s wall", "1.76 GB peak memory", "Later runs reuse"):
        assert fact in first, fact
    run = (README.parent / "run").read_text()
    assert "a few minutes" not in run and "about 7.6 GB" in run


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `./run` leaves in out/demo that the README's next steps read, at mini size: export/onnx (int8 head and
    tail) and export/rpi (the Pi bundle), and 8 sample images in images/ as the demo writes them (untrained
    weights: the commands are checked, not the accuracy)."""
    import numpy as np
    import torch

    from bottlefit.calibration.builtin import builtin_arrays
    from bottlefit.demo import N_IMAGES, write_sample_images
    from bottlefit.models.card import ModelCard
    from bottlefit.pipeline.export import export_targets
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions
    from bottlefit.targets.rpi import RpiOptions

    work = tmp_path_factory.mktemp("readme") / "demo"
    model = ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4)
    parity = ParityOptions(emulate=Emulate.parse("none"))
    results = export_targets([ExportRequest(model, "onnx", work / "export", OnnxOptions(int8=True), parity=parity),
                              ExportRequest(model, "rpi", work / "export", RpiOptions(), parity=parity)])
    card = ModelCard.from_dict(json.loads((work / "export" / "onnx" / "manifest.json").read_text())["model_card"])
    x, _ = builtin_arrays(card, "heldout")
    x = np.resize(np.asarray(x, dtype=np.float32), (N_IMAGES, *x.shape[1:]))  # the built-in set may hold fewer
    write_sample_images(work / "images", torch.from_numpy(x), np.zeros(N_IMAGES, dtype=int), card)
    assert all(r.verdict.passed for r in results)
    return work


@pytest.mark.slow
def test_the_path_after_the_demo_runs(demo_out: Path, tmp_path: Path) -> None:
    """Every command of "After the demo" runs as written, on a folder laid out as the demo leaves it: `out/demo` is
    that folder; the server listens on free ports (the README's defaults may be taken here) and run-head is told
    where; bench split runs on two links without the trade-off (CI size; the full --quick is tests/splitbench's)."""
    import glob
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(README.parent)}

    def argv(words: list[str]) -> list[str]:
        assert words[0] == "./run"
        out = []
        for w in words[1:]:
            w = w.replace("out/demo", str(demo_out)).replace("out/bench", str(tmp_path / "bench"))
            out += sorted(glob.glob(w)) if "*" in w else [w]
        return [sys.executable, "-m", "bottlefit", *out]

    from tests.test_docs import _after_the_demo

    commands = _after_the_demo()
    assert [c[1] for c in commands] == ["serve", "run-head", "run-head", "bench", "profiles"]
    serve = subprocess.Popen([*argv(commands[0]), "--http-port", "0", "--grpc-port", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in serve.stdout:
            if line.strip().startswith("REST "):
                url = line.split()[1].removesuffix("/v2")
                break
        assert url, serve.stderr.read()
        for command in commands[1:3]:
            r = subprocess.run([*argv(command), "--server", url], capture_output=True, text=True, timeout=300, env=env)
            lines = r.stdout.splitlines()
            assert r.returncode == 0, r.stderr[-2000:]
            assert len(lines) == 8 and all("top-k class:probability" in line for line in lines)
        r = subprocess.run([*argv(commands[3]), "--demo-out", str(demo_out), "--links", "lte,wifi", "--no-tradeoff"],
                           capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((tmp_path / "bench" / "split.json").read_text())["schema"] == "bottlefit.splitbench.split/1"
        r = subprocess.run(argv(commands[4]), capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0 and "Network links" in r.stdout
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
