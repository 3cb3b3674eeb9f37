"""Shared fixtures: real architectures, checkpoints written in the formats users bring."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bottlefit.models.checkpoint import LoadedModel
from tests.helpers import authors_dict, shared_untrained

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `./run test` runs two pytest workers on a 2-core host: one compute thread each (and in the processes they
    # start), or OpenMP's spinning threads of one worker take the core the other one needs
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def r152() -> LoadedModel:
    return shared_untrained("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "2"})


@pytest.fixture(scope="session")
def authors_r152(tmp_path_factory: pytest.TempPathFactory, r152: LoadedModel) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ilsvrc2012-custom_resnet152_from_resnet152-12ch.pt"
    torch.save(authors_dict(r152, "custom_resnet152", {"bottleneck_channel": 12, "bottleneck_idx": 7,
                                                      "bottleneck_ver": "2"}), path)
    return path


@pytest.fixture(scope="session")
def d169() -> LoadedModel:
    return shared_untrained("custom_densenet169", {"bottleneck_channel": 12})


# `bottlefit export CKPT --target onnx --int8` of the authors' R152 checkpoint, for untrained weights: top-1 is
# reported only, and the int8 head must keep 25 dB (measured 30-33 dB under reference semantics). The authors'
# format cannot say its weights are random, so the file is judged as trained unless the untrained cosine is stated.
UNTRAINED_INT8_TOLERANCES = ["--tolerance", "head.int8.onnx:logits.top1_agreement=0",
                             "--tolerance", "head.int8.onnx:bottleneck.cosine=0.98",
                             "--tolerance", "head.int8.onnx:bottleneck.sqnr_db=25"]


@pytest.fixture(scope="session")
def r152_int8_export(tmp_path_factory: pytest.TempPathFactory, authors_r152: Path) -> Path:
    """OUT/onnx of the int8 ONNX export (built-in calibration, 4 held-out photos), made once per session; tests
    that change it work on a copy (tests.helpers.clone_export)."""
    from bottlefit.cli import main

    out = tmp_path_factory.mktemp("int8-r152")
    rc = main(["export", str(authors_r152), "--target", "onnx", "--int8", "--out", str(out), "--parity-count", "4",
               "--quiet", *UNTRAINED_INT8_TOLERANCES])
    assert rc == 0
    return out / "onnx"


@pytest.fixture(scope="session")
def mini_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of a mini_resnet export (onnx target, int8 Q/DQ head, fp32 head and tail; no emulation): seconds to
    build, made once per session for serve/ and bench/. Read-only: tests that change it work on a copy."""
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    out = tmp_path_factory.mktemp("mini") / "out"
    export(ExportRequest(ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4), "onnx", out,
                         OnnxOptions(int8=True), parity=ParityOptions(emulate=Emulate.parse("none"))))
    return out
