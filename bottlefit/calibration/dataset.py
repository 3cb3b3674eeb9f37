"""Calibration sets: images preprocessed exactly as the model card says, as one float32 NCHW array.

Preprocessing (``preprocessing.py``) mirrors torchvision's ImageNet eval transform (the one the checkpoints
were evaluated with): decode to RGB → resize the shorter side to ``card.resize`` (bilinear, antialiased,
rounded back to uint8 like a PIL image) → center crop to ``card.input_shape[1:]`` → /255 → (x - mean) / std.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bottlefit.calibration.preprocessing import preprocess
from bottlefit.errors import UserError
from bottlefit.models.card import ModelCard

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Log = Callable[[str], object]


def decode_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; grey, RGBA and palette images are converted.

    Alpha is dropped (not composited), as torchvision's default ImageFolder loader does.
    Raises UserError naming the file when it cannot be decoded.
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()  # decode now: a truncated file fails here, not later
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{p}: cannot be read as an image ({e}); replace or remove the file") from e
    return np.asarray(rgb, dtype=np.uint8)


def load_image(path: str | Path, card: ModelCard) -> np.ndarray:
    """One image file → (3, H, W) float32, preprocessed as the model card says."""
    return preprocess(decode_rgb(path), card)


CALIBRATION, HELDOUT = "calibration", "held-out"  # the two roles a set of images plays (messages name them)


def _choose(n: int, count: int | None, seed: int, what: str, log: Log, role: str = CALIBRATION) -> np.ndarray:
    """Indices of a seeded, sorted choice of ``count`` out of ``n`` (all when count is None or > n)."""
    if count is None:
        return np.arange(n)
    if count <= 0:
        raise UserError(f"{what}: {role} image count must be positive, got {count}; pass a count >= 1")
    if count >= n:
        if count > n:
            log(f"warning: {what}: asked for {count} {role} images but only {n} exist; using all {n}")
        return np.arange(n)
    idx = np.random.default_rng(seed).choice(n, size=count, replace=False)
    return np.sort(idx)


def _existing(path: str | Path, role: str) -> Path:
    """``path`` when it is a folder, a .npz or an image file; else UserError saying what to pass."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {role} data not found; pass a folder of images or a .npz file")
    if not p.is_dir() and p.suffix.lower() != ".npz" and p.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{p}: not a folder or .npz; pass a folder of .jpg/.jpeg/.png images or a .npz file")
    return p


def _chosen_files(folder: Path, count: int | None, seed: int, log: Log, role: str) -> list[Path]:
    """The image files of ``folder`` (recursive, sorted) a set of ``count`` takes (seeded choice)."""
    # Dot-files are skipped: macOS "._x.jpg" AppleDouble files carry an image suffix but no image.
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    )
    if not files:
        raise UserError(
            f"{folder}: no .jpg/.jpeg/.png images found (searched recursively); "
            f"put {role} images there or pass a .npz"
        )
    return [files[i] for i in _choose(len(files), count, seed, str(folder), log, role)]


def _read_npz(file: Path, expected: tuple[int, int, int] | None = None) -> tuple[str, np.ndarray]:
    """(key, array) of a .npz of preprocessed images: float32, N x C x H x W (C x H x W = ``expected`` when
    given), N >= 1, finite; else UserError."""
    try:
        with np.load(file, allow_pickle=False) as z:
            keys = list(z.files)
            if "images" in keys:
                key = "images"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise UserError(
                    f"{file}: holds arrays {keys} and none is named 'images'; "
                    "save the preprocessed batch under the key 'images'"
                )
            arr = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{file}: cannot be read as a .npz ({e}); save it with numpy.savez") from e
    if arr.dtype != np.float32 or arr.ndim != 4 or (expected is not None and tuple(arr.shape[1:]) != expected):
        want = ", ".join(map(str, expected)) if expected is not None else "C, H, W"
        raise UserError(
            f"{file}: array '{key}' is {arr.dtype} with shape {tuple(arr.shape)}, expected float32 with shape "
            f"(N, {want}) preprocessed as the model card says; re-save it in that form or pass a folder of images"
        )
    if len(arr) == 0:
        raise UserError(f"{file}: array '{key}' holds no images; save at least one")
    if not np.isfinite(arr).all():
        raise UserError(f"{file}: array '{key}' contains NaN or Inf; re-save it with finite values")
    return key, arr


def check_source(path: str | Path, role: str = CALIBRATION, count: int | None = None, seed: int = 0) -> None:
    """Refuse (UserError naming the file) a source ``from_path`` would refuse, before any model is loaded or
    artifact exported: it must exist, and hold images that decode (a folder: the ones a set of ``count`` takes,
    at least one readable) or a well-formed .npz. Only the .npz's C x H x W against the model card waits for
    the card."""
    p = _existing(path, role)
    if p.suffix.lower() == ".npz" and not p.is_dir():
        _read_npz(p)
        return
    files = _chosen_files(p, count, seed, lambda m: None, role) if p.is_dir() else [p]
    errors: list[str] = []
    for f in files:
        try:
            decode_rgb(f)
        except UserError as e:
            errors.append(str(e))
            continue
        return  # one readable image makes a set (unreadable ones are skipped with a warning when loaded)
    if p.is_dir():
        raise UserError(f"{p}: none of the {len(files)} {role} image files could be read (first: {errors[0]}); "
                        "replace them with valid .jpg/.png images")
    raise UserError(errors[0])


@dataclass
class CalibrationSet:
    """Preprocessed images (float32 N×C×H×W), where they came from, and one name per image."""

    images: np.ndarray
    source: str
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(f"images must be float32 NCHW, got {self.images.shape} {self.images.dtype}")
        if len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} names for {len(self.images)} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def sha256(self) -> str:
        """Content hash: shape, dtype and the array bytes (C order), hex."""
        h = hashlib.sha256()
        h.update(f"{self.images.dtype.str}{tuple(self.images.shape)}".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size]

    def describe(self) -> dict[str, object]:
        """What the manifest records about the calibration data."""
        return {"source": self.source, "count": len(self), "sha256": self.sha256, "names": list(self.names)}

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        card: ModelCard,
        count: int | None = None,
        seed: int = 0,
        log: Log = print,
        role: str = CALIBRATION,
    ) -> CalibrationSet:
        """A folder of images (recursive, ImageFolder trees included), one image file, or a ``.npz``; ``role``
        (calibration or held-out) is what messages call them."""
        p = _existing(path, role)
        if p.is_dir():
            return cls._from_folder(p, card, count, seed, log, role)
        if p.suffix.lower() == ".npz":
            return cls._from_npz(p, card, count, seed, log, role)
        return cls(load_image(p, card)[None], str(p), [p.name])

    @classmethod
    def _from_folder(
        cls, folder: Path, card: ModelCard, count: int | None, seed: int, log: Log, role: str = CALIBRATION
    ) -> CalibrationSet:
        # Choose before decoding so a small count over a big ImageNet folder decodes only what it uses.
        chosen = _chosen_files(folder, count, seed, log, role)
        images: list[np.ndarray] = []
        names: list[str] = []
        skipped: list[str] = []
        for f in chosen:
            try:
                images.append(load_image(f, card))
            except UserError as e:
                skipped.append(str(e))
                continue
            names.append(f.relative_to(folder).as_posix())
        for msg in skipped:
            log(f"warning: skipping {msg}")
        if not images:
            raise UserError(
                f"{folder}: none of the {len(chosen)} image files could be read; "
                "replace them with valid .jpg/.png images"
            )
        return cls(np.stack(images).astype(np.float32, copy=False), str(folder), names)

    @classmethod
    def _from_npz(cls, file: Path, card: ModelCard, count: int | None, seed: int, log: Log,
                  role: str = CALIBRATION) -> CalibrationSet:
        _, arr = _read_npz(file, (int(card.input_shape[0]), int(card.input_shape[1]), int(card.input_shape[2])))
        idx = _choose(len(arr), count, seed, str(file), log, role)
        return cls(np.ascontiguousarray(arr[idx]), str(file), [f"{file.name}[{int(i)}]" for i in idx])

    @classmethod
    def builtin(
        cls,
        card: ModelCard,
        part: str = "calibration",
        count: int | None = None,
        seed: int = 0,
        log: Log = print,
    ) -> CalibrationSet:
        """The built-in set from photos shipped inside scikit-image / scikit-learn (see ``builtin.py``)."""
        from bottlefit.calibration.builtin import builtin_arrays

        images, names = builtin_arrays(card, part)

        role = HELDOUT if part == "heldout" else CALIBRATION
        idx = _choose(len(images), count, seed, f"builtin:{part}", log, role)
        return cls(images[idx], f"builtin:{part}", [names[int(i)] for i in idx])
