"""The built-in calibration / held-out images: real photos that ship inside scikit-image and scikit-learn.

No download at run time: only loaders that read files inside the installed wheels are used (skimage's
``eagle``, ``kidney``, ``lily`` and ``skin`` need pooch + network and are left out; ``cat`` is the same
pixels as ``chelsea``, so only one of them is used; ``colorwheel`` and ``logo`` are drawings, not photos).

Ten colour photos, each cut into seven deterministic views (``VIEWS``) → 70 images. The split is by source
photo so that no held-out image shares a photo with a calibration image (parity never judges on data the
ranges were calibrated on):

- calibration (7 photos, 49 images): astronaut, coffee, rocket, retina, hubble_deep_field,
  immunohistochemistry (skimage), china (sklearn)
- heldout (3 photos, 21 images): chelsea, stereo_motorcycle (left view) (skimage), flower (sklearn)

The held-out photos are the most ImageNet-like (a tabby cat, a motorcycle, a flower), which is what the
top-1 agreement check wants; the calibration part spans very different statistics (dark sky, microscopy,
fundus), which is what range calibration wants.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from bottlefit.calibration.preprocessing import preprocess
from bottlefit.errors import UserError
from bottlefit.models.card import ModelCard

PARTS: dict[str, tuple[str, ...]] = {
    "calibration": (
        "skimage.astronaut",
        "skimage.coffee",
        "skimage.rocket",
        "skimage.retina",
        "skimage.hubble_deep_field",
        "skimage.immunohistochemistry",
        "sklearn.china",
    ),
    "heldout": ("skimage.chelsea", "skimage.stereo_motorcycle", "sklearn.flower"),
}

# (name, top, left, height, width) as fractions of the photo; "flip" is the full photo mirrored.
# Corner crops at 70% move the object around the frame and change the scale the resize sees.
VIEWS: tuple[tuple[str, float, float, float, float], ...] = (
    ("full", 0.0, 0.0, 1.0, 1.0),
    ("flip", 0.0, 0.0, 1.0, 1.0),
    ("tl70", 0.0, 0.0, 0.7, 0.7),
    ("tr70", 0.0, 0.3, 0.7, 0.7),
    ("bl70", 0.3, 0.0, 0.7, 0.7),
    ("br70", 0.3, 0.3, 0.7, 0.7),
    ("center60", 0.2, 0.2, 0.6, 0.6),
)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        # stereo_motorcycle returns (left, right, disparity): the left view is the photo.
        return img[0] if isinstance(img, tuple) else img

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{p: _skimage(p.split(".", 1)[1]) for part in PARTS.values() for p in part if p.startswith("skimage.")},
    **{p: _sklearn(p.split(".", 1)[1]) for part in PARTS.values() for p in part if p.startswith("sklearn.")},
}


@functools.cache
def photo(name: str) -> np.ndarray:
    """One decoded source photo, HxWx3 uint8 RGB (cached: the loaders decode the file on every call)."""
    img = np.asarray(LOADERS[name]())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)
    img.flags.writeable = False  # shared by every caller through the cache
    return img


def _view(img: np.ndarray, view: tuple[str, float, float, float, float]) -> np.ndarray:
    name, top, left, hf, wf = view
    h, w = img.shape[:2]
    y0, x0 = round(top * h), round(left * w)
    out = img[y0 : y0 + round(hf * h), x0 : x0 + round(wf * w)]
    return out[:, ::-1] if name == "flip" else out


@functools.lru_cache(maxsize=8)
def _part_arrays(
    part: str, resize: int, input_shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
    card = ModelCard(arch="builtin", params={}, input_shape=input_shape, resize=resize, mean=mean, std=std)
    images: list[np.ndarray] = []
    names: list[str] = []
    for src in PARTS[part]:
        img = photo(src)
        for view in VIEWS:
            images.append(preprocess(_view(img, view), card))
            names.append(f"{src}/{view[0]}")
    arr = np.stack(images).astype(np.float32, copy=False)
    arr.flags.writeable = False
    return arr, tuple(names)


def builtin_arrays(card: ModelCard, part: str) -> tuple[np.ndarray, list[str]]:
    """The preprocessed images of one part (read-only, cached per preprocessing) and their names."""
    if part not in PARTS:
        raise UserError(f"unknown built-in part {part!r}; choose one of {sorted(PARTS)}")
    arr, names = _part_arrays(
        part, int(card.resize), tuple(int(d) for d in card.input_shape), tuple(card.mean), tuple(card.std)
    )
    return arr, list(names)
