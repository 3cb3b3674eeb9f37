"""Every input of ``export`` is checked before any work: a bad --calib or --images source is one line and exit 2
before the model is loaded or anything is written; messages name the role of the images (calibration or held-out);
--quiet hides progress, never a warning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bottlefit.cli import main

MINI = ["--untrained", "--arch", "mini_resnet", "--bottleneck-channel", "2"]


def _noise_png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _empty(d: Path) -> Path:
    d.mkdir()
    return d


def _text_only(d: Path) -> Path:
    d.mkdir()
    (d / "readme.txt").write_text("x")
    return d


def _garbage_images(d: Path) -> Path:
    d.mkdir()
    (d / "a.jpg").write_bytes(b"definitely not a jpeg")
    (d / "b.png").write_bytes(b"")
    return d


def _garbage_npz(d: Path) -> Path:
    d.mkdir()
    (d / "calib.npz").write_bytes(b"garbage")
    return d / "calib.npz"


def _float64_npz(d: Path) -> Path:
    d.mkdir()
    np.savez(d / "calib.npz", images=np.zeros((2, 3, 32, 32)))
    return d / "calib.npz"


CASES: list[tuple[Callable[[Path], Path], str]] = [
    (_empty, "no .jpg/.jpeg/.png images found (searched recursively); put {role} images there or pass a .npz"),
    (_text_only, "no .jpg/.jpeg/.png images found (searched recursively); put {role} images there or pass a .npz"),
    (_garbage_images, "none of the 2 {role} image files could be read (first: {src}/a.jpg: cannot be read"),
    (_garbage_npz, "cannot be read as a .npz"),
    (_float64_npz, "array 'images' is float64 with shape (2, 3, 32, 32), expected float32 with shape (N, C, H, W)"),
]


@pytest.mark.parametrize("flag,role", [("--calib", "calibration"), ("--images", "held-out")])
@pytest.mark.parametrize("make,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_image_source_is_refused_before_any_work(tmp_path: Path, capsys, flag: str, role: str,
                                                     make: Callable[[Path], Path], message: str) -> None:
    src = make(tmp_path / "src")
    out = tmp_path / "out"
    # no --quiet: a progress line ("loading ...", "exporting head.onnx") would show that work had started
    rc = main(["export", *MINI, "--target", "onnx", "--int8", "--out", str(out), flag, str(src)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"bottlefit: error: {src}: ") and err.count("\n") == 1, err
    assert message.format(role=role, src=src) in err
    assert not out.exists()  # not even OUT, let alone OUT/onnx


def test_parity_count_zero_names_the_held_out_images(tmp_path: Path, capsys) -> None:
    assert main(["export", *MINI, "--target", "onnx", "--out", str(tmp_path / "out"), "--parity-count", "0"]) == 2
    assert capsys.readouterr().err == "bottlefit: error: --parity-count 0: give a positive number of held-out images\n"
    assert not (tmp_path / "out").exists()


def test_verify_images_are_checked_before_any_artifact_runs(tmp_path: Path, capsys) -> None:
    src = _empty(tmp_path / "src")
    assert main(["verify", str(tmp_path), "--images", str(src)]) == 2
    assert capsys.readouterr().err == (f"bottlefit: error: {src}: no .jpg/.jpeg/.png images found (searched "
                                       "recursively); put held-out images there or pass a .npz\n")


def test_quiet_hides_progress_but_not_warnings(tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        _noise_png(calib / f"{i}.png", i)
    rc = main(["export", *MINI, "--target", "onnx", "--int8", "--out", str(tmp_path / "out"), "--calib", str(calib),
               "--calib-count", "5", "--parity-count", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc in (0, 1)  # two noise images calibrate an untrained head: whether it passes is not the point here
    lines = [ln.split("] ", 1)[1] for ln in err.splitlines()]  # "[  1.2s] text"
    assert lines == [
        "NOTE: mini_resnet has UNTRAINED (random) weights: the figures below check the toolchain, not accuracy",
        f"warning: {calib}: asked for 5 calibration images but only 2 exist; using all 2",
    ]
