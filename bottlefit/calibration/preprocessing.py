"""The eval preprocessing every calibration image goes through: one function, shared by the image loaders
(``dataset.py``) and the built-in photo set (``builtin.py``), so neither has to import the other for it."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF

from bottlefit.models.card import ModelCard


def preprocess(rgb: np.ndarray, card: ModelCard) -> np.ndarray:
    """HxWx3 uint8 RGB → (3, H, W) float32, normalized as the card says."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    # torch cannot wrap a read-only array (the cached built-in photos are): copy only then.
    t = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)
    # uint8 in, uint8 out: the same rounding a PIL-based torchvision pipeline applies after Resize.
    t = TF.resize(t, [card.resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    t = TF.center_crop(t, [int(card.input_shape[1]), int(card.input_shape[2])])
    return card.normalize(t.permute(1, 2, 0).numpy()[None])[0]
