"""The jetson bundle's README offers exactly the routes its build_engine.sh builds: every route the README lists
runs through the script (trtexec and the verifier stubbed: this checks the script's route table, not TensorRT),
and the script names the same routes when given an unknown one."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from bottlefit.targets.jetson import GOLDEN_DIR, SCRIPT, JetsonOptions, _readme, resolve
from bottlefit.targets.jetson.trtexec import DEFAULT_FILES, render_build_script

CASES = [  # (options, routes offered, routes built by default)
    (JetsonOptions(profile="nano"), ["fp16", "fp32"], ["fp16"]),  # the Nano's default precision
    (JetsonOptions(profile="orin"), ["qdq", "cache"], ["qdq", "cache"]),
    (JetsonOptions(profile="orin", precision="fp32"), ["fp32", "fp16"], ["fp32"]),
    (JetsonOptions(profile="nano", precision="int8", force=True), ["qdq", "cache"], ["qdq", "cache"]),
]


def _bundle(tmp_path: Path, options: JetsonOptions) -> tuple[str, Path]:
    req = resolve(options)
    script = render_build_script(req.profile, req.routes, dict(DEFAULT_FILES, golden_dir=GOLDEN_DIR),
                                 int8_output=req.int8_output, force=req.force, default_routes=req.default_routes)
    (tmp_path / SCRIPT).write_text(script)
    os.chmod(tmp_path / SCRIPT, 0o755)
    return _readme(req, [SCRIPT]), tmp_path / SCRIPT


def _run(script: Path, *routes: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TRTEXEC="/bin/true", PYTHON="true")  # each step "succeeds": only routing is tested
    return subprocess.run([str(script), *routes], capture_output=True, text=True, env=env, cwd=script.parent,
                          timeout=60)


@pytest.mark.parametrize("options,offered,default", CASES)
def test_readme_offers_exactly_the_routes_the_script_builds(tmp_path: Path, options: JetsonOptions,
                                                            offered: list[str], default: list[str]) -> None:
    readme, script = _bundle(tmp_path, options)
    listed = re.findall(r"^- `(\w+)`: ", readme, re.M)
    assert listed == offered
    assert f"# routes: {' '.join(offered)} (default: {' '.join(default)})" in readme
    for route in listed:  # every route the README offers builds, runs and verifies
        run = _run(script, route)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"== {route}: PASS" in run.stdout
    run = _run(script)  # no argument: the default routes only
    assert run.returncode == 0 and re.findall(r"^== (\w+): PASS$", run.stdout, re.M) == default
    run = _run(script, "int4")
    assert run.returncode == 2
    assert run.stderr == f"unknown route 'int4'; choose from: {' '.join(offered)}\n"


def test_fp16_route_builds_head_onnx_with_fp16_and_fp32_without_tf32(tmp_path: Path) -> None:
    _, script = _bundle(tmp_path, JetsonOptions(profile="orin", precision="fp16"))
    text = script.read_text()
    assert '"$TRTEXEC" --onnx=head.onnx --fp16 --saveEngine=engines/head.fp16.engine' in text
    assert '"$TRTEXEC" --onnx=head.onnx --noTF32 --saveEngine=engines/head.fp32.engine' in text
    assert "--golden=golden --output=results/fp32.output.json --precision=fp32" in text
