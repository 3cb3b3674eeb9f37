"""Shared, session-cached inputs for the rpi tests: the real BottleFit heads, built once each.

Untrained models have identity BatchNorms (gamma 1, beta 0, mean 0, var 1), which would make the BN rewrite
trivially exact; the heads here get seeded random BN statistics, as a trained checkpoint would carry.
"""

from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HEADS: dict[str, tuple[str, dict[str, Any]]] = {
    "r152v1": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "1"}),
    "r152v2": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "2"}),
    "r152v3": ("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "3"}),
    "d201": ("custom_densenet201", {"bottleneck_channel": 12}),
}
CALIB_COUNT = 12
HELDOUT_COUNT = 6

@functools.cache
def _scratch_root() -> Path:
    """One scratch folder for the session's cached builds, made on first use (not at import) and removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="bottlefit-rpi-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def scratch(name: str) -> Path:
    d = _scratch_root() / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def randomize_bn(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))


@functools.cache
def head(key: str) -> tuple[nn.Module, Any]:
    """(head in eval mode, ModelCard). Callers must not modify the head."""
    from tests.helpers import shared_untrained

    arch, params = HEADS[key]
    loaded = shared_untrained(arch, params)
    h = copy.deepcopy(loaded.model.get_submodule(loaded.card.bottleneck.module)).eval()
    randomize_bn(h)
    return h, loaded.card


@functools.cache
def images(part: str, count: int) -> np.ndarray:
    from bottlefit.calibration.dataset import CalibrationSet
    from bottlefit.models.card import ModelCard

    card = ModelCard(arch="any", params={})  # only the preprocessing matters: all heads share it
    return np.array(CalibrationSet.builtin(card, part=part, count=count, log=lambda s: None).images)


@functools.cache
def rewritten(key: str) -> Any:
    from bottlefit.exporter.head_rewrite import rewrite_head

    h, card = head(key)
    return rewrite_head(h, card.bottleneck.module, torch.from_numpy(images("heldout", HELDOUT_COUNT)))


@functools.cache
def int8_tflite(key: str, layout: str = "NHWC") -> tuple[Path, Any]:
    from bottlefit.targets.rpi.tflite import export_tflite

    path = scratch(f"{key}-{layout}") / "head.int8.tflite"
    info = export_tflite(rewritten(key), images("calibration", CALIB_COUNT), path, int8=True, layout=layout)
    return path, info


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    return float(10 * np.log10((ref64**2).sum() / ((ref64 - got.astype(np.float64)) ** 2).sum()))


@functools.cache
def rpi_bundle() -> tuple[Path, list]:
    """The rpi target built for real from the r152v2 head (12 calibration, 4 held-out photos): (folder, artifacts)."""
    from types import SimpleNamespace

    from bottlefit.calibration.dataset import CalibrationSet
    from bottlefit.calibration.observers import ObserverKind
    from bottlefit.exporter.split import Head
    from bottlefit.targets import BuildContext
    from bottlefit.targets.rpi import TARGET, RpiOptions

    h, card = head("r152v2")
    out = scratch("target")
    split = SimpleNamespace(head=Head(h), card=card)
    ctx = BuildContext(
        split=split,
        out_dir=out,
        options=RpiOptions(),
        heldout=CalibrationSet.builtin(card, part="heldout", count=4, log=lambda s: None),
        observer=ObserverKind.MINMAX,
        calibration=CalibrationSet.builtin(card, count=CALIB_COUNT, log=lambda s: None),
        int8_head=split.head,  # round-to-nearest: the converters round the split's own head
        log=lambda s: None,
    )
    return out, TARGET.build(ctx).artifacts
