"""ncnn's own aarch64 kernels on emulated Pi cores (qemu-user; its wheel in the sysroot) against the ncnn
reference semantics (bottlefit.runtimes.ncnn) for the same files: what a board would compute, judged without the
build host's kernels. Skipped with EmulationUnavailable's line where qemu or the sysroot are missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot, get_core, run_python
from bottlefit.exporter.ncnn import write_ncnn
from bottlefit.runtimes import get_runner

GUEST = '''
import json, sys
import numpy as np
import ncnn

folder = sys.argv[1]
x = np.load(folder + "/x.npy")
out = {}
for name in json.loads(sys.argv[2]):
    net = ncnn.Net()
    net.opt.num_threads, net.opt.use_int8_inference = 1, True
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    assert net.load_param(folder + "/" + name) == 0 and net.load_model(folder + "/" + name[:-6] + ".bin") == 0
    ys = []
    for img in x:
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(np.ascontiguousarray(img)))
        ys.append(np.array(ex.extract("out0")[1]))
    np.save(folder + "/" + name + ".npy", np.stack(ys))
print("ok")
'''


@pytest.fixture(scope="module")
def guest() -> Any:
    try:
        return ensure_sysroot()
    except EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("profile", ["pi4", pytest.param("pi5", marks=pytest.mark.slow)])
def test_ncnn_on_the_pi_core_computes_the_reference(guest: Any, tmp_path: Path, profile: str) -> None:
    sysroot = guest
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1),
                               torch.nn.Conv2d(16, 6, 2, 2, 1, bias=False)).eval()
    x = np.random.default_rng(1).standard_normal((3, 3, 48, 48)).astype(np.float32)
    names = ["fp32.param", "int8.param"]
    for name in names:
        write_ncnn(head, x, tmp_path / name, int8=name.startswith("int8"))
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "guest.py"
    script.write_text(GUEST)
    proc = run_python(sysroot, get_core(profile), script, [str(tmp_path), json.dumps(names)], timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    with torch.no_grad():
        step = float(head(torch.from_numpy(x)).abs().max()) / 127
    for name in names:
        board = np.load(tmp_path / f"{name}.npy")
        r = get_runner("ncnn", tmp_path / name, reference=True)
        ref = np.concatenate([r.infer({"in0": x[i:i + 1]})["out0"] for i in range(len(x))])
        assert board.shape == ref.shape == (3, 6, 7, 7)
        # fp32: float sums in another order; int8: integer sums are exact, the float32 dequantization is not
        # (measured on both cores: 3.6e-7 fp32, 6e-8 int8, against a step of 9.3e-3)
        bound = 1e-4 * step if name.startswith("fp32") else 1e-2 * step
        assert float(np.abs(board - ref).max()) < bound, (profile, name, float(np.abs(board - ref).max()), step)
