"""CalibrationSet: preprocessing numbers, bad inputs, determinism, the built-in split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bottlefit.calibration import CalibrationSet, load_image, preprocess
from bottlefit.calibration.builtin import PARTS, VIEWS
from bottlefit.errors import UserError
from bottlefit.models.card import ModelCard

# Small input keeps folder tests fast; the built-in tests use the real 224 card.
SMALL = ModelCard(arch="test", params={}, input_shape=(3, 32, 32), resize=36)
CARD = ModelCard(arch="test", params={})
MEAN = np.array(CARD.mean, dtype=np.float64)
STD = np.array(CARD.std, dtype=np.float64)


def expected_constant(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.array(rgb, dtype=np.float64) / 255.0 - MEAN) / STD


def write_image(
    path: Path, rgb: tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (50, 40)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, ...] = rgb[0] if mode == "L" else rgb
    Image.new(mode, size, color).save(path)
    return path


def write_noise(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def collect() -> tuple[list[str], object]:
    msgs: list[str] = []
    return msgs, msgs.append


def test_constant_colour_image_preprocesses_to_hand_computed_value(tmp_path: Path) -> None:
    f = write_image(tmp_path / "c.png", (10, 128, 250))
    x = load_image(f, CARD)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    want = expected_constant((10, 128, 250))
    for c in range(3):
        np.testing.assert_allclose(x[c], want[c], atol=1e-6)
    # e.g. red: (10/255 - 0.485) / 0.229
    assert x[0, 0, 0] == pytest.approx((10 / 255 - 0.485) / 0.229, abs=1e-6)


def test_resize_shorter_side_then_center_crop() -> None:
    # 40 rows x 80 cols: left half 0, right half 255. Shorter side 40 -> 36 gives 36 x 72; the 32-wide
    # centre crop spans columns 20..51 of 72, so its left half comes from black and its right half white.
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 40:] = 255
    x = preprocess(img, SMALL)
    assert x.shape == (3, 32, 32)
    black, white = expected_constant((0, 0, 0)), expected_constant((255, 255, 255))
    np.testing.assert_allclose(x[:, :, 0], np.broadcast_to(black[:, None], (3, 32)), atol=1e-6)
    np.testing.assert_allclose(x[:, :, -1], np.broadcast_to(white[:, None], (3, 32)), atol=1e-6)


def test_grey_rgba_and_palette_pngs_convert_to_rgb(tmp_path: Path) -> None:
    grey = load_image(write_image(tmp_path / "g.png", (77,), mode="L"), SMALL)
    np.testing.assert_allclose(grey[:, 0, 0], expected_constant((77, 77, 77)), atol=1e-6)
    # Alpha is dropped, not composited: a fully transparent pixel keeps its colour.
    rgba = load_image(write_image(tmp_path / "a.png", (200, 100, 50, 0), mode="RGBA"), SMALL)
    np.testing.assert_allclose(rgba[:, 5, 5], expected_constant((200, 100, 50)), atol=1e-6)
    pal = Image.new("RGB", (20, 20), (30, 60, 90)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    x = load_image(tmp_path / "p.png", SMALL)
    np.testing.assert_allclose(x[:, 3, 3], expected_constant((30, 60, 90)), atol=1e-6)


def test_folder_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    write_noise(tmp_path / "b" / "2.PNG", 0)
    write_noise(tmp_path / "a" / "1.jpg", 1)
    write_noise(tmp_path / "a" / "0.JPEG", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._x.jpg").write_bytes(b"AppleDouble")
    cs = CalibrationSet.from_path(tmp_path, SMALL)
    assert cs.names == ["a/0.JPEG", "a/1.jpg", "b/2.PNG"]
    assert cs.images.shape == (3, 3, 32, 32) and cs.images.dtype == np.float32
    np.testing.assert_array_equal(cs.images[2], load_image(tmp_path / "b" / "2.PNG", SMALL))
    d = cs.describe()
    assert d == {"source": str(tmp_path), "count": 3, "sha256": cs.sha256, "names": cs.names}


def test_missing_path_empty_folder_and_non_images_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        CalibrationSet.from_path(tmp_path / "nope", SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"{empty}.*no .jpg"):
        CalibrationSet.from_path(empty, SMALL)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no .jpg"):
        CalibrationSet.from_path(empty, SMALL)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(UserError, match="data.csv"):
        CalibrationSet.from_path(tmp_path / "data.csv", SMALL)


def test_one_corrupt_file_is_warned_and_skipped(tmp_path: Path) -> None:
    write_noise(tmp_path / "good1.png", 0)
    write_noise(tmp_path / "good2.jpg", 1)
    (tmp_path / "bad.jpg").write_bytes(b"definitely not a jpeg")
    msgs, log = collect()
    cs = CalibrationSet.from_path(tmp_path, SMALL, log=log)
    assert cs.names == ["good1.png", "good2.jpg"]
    assert len(msgs) == 1 and "warning" in msgs[0] and "bad.jpg" in msgs[0]


def test_truncated_jpeg_is_skipped(tmp_path: Path) -> None:
    write_noise(tmp_path / "ok.png", 0)
    full = write_noise(tmp_path / "cut.jpg", 1, size=(200, 200))
    full.write_bytes(full.read_bytes()[:300])
    msgs, log = collect()
    cs = CalibrationSet.from_path(tmp_path, SMALL, log=log)
    assert cs.names == ["ok.png"]
    assert any("cut.jpg" in m for m in msgs)


def test_all_corrupt_is_user_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"nope")
    (tmp_path / "y.png").write_bytes(b"")
    msgs, log = collect()
    with pytest.raises(UserError, match="none of the 2 image files"):
        CalibrationSet.from_path(tmp_path, SMALL, log=log)
    with pytest.raises(UserError, match="x.jpg"):
        load_image(tmp_path / "x.jpg", SMALL)


def test_fewer_images_than_count_warns_and_uses_all(tmp_path: Path) -> None:
    for i in range(3):
        write_noise(tmp_path / f"{i}.png", i)
    msgs, log = collect()
    cs = CalibrationSet.from_path(tmp_path, SMALL, count=10, log=log)
    assert len(cs) == 3
    assert len(msgs) == 1 and "10" in msgs[0] and "3" in msgs[0]
    with pytest.raises(UserError, match="positive"):
        CalibrationSet.from_path(tmp_path, SMALL, count=0)


def test_seeded_choice_is_reproducible(tmp_path: Path) -> None:
    for i in range(6):
        write_noise(tmp_path / f"{i}.png", i)
    a = CalibrationSet.from_path(tmp_path, SMALL, count=3, seed=0)
    b = CalibrationSet.from_path(tmp_path, SMALL, count=3, seed=0)
    c = CalibrationSet.from_path(tmp_path, SMALL, count=3, seed=1)
    assert a.sha256 == b.sha256 and a.names == b.names
    # numpy default_rng(0).choice(6, 3) -> {3, 4, 5}; default_rng(1) -> {1, 2, 4}; both sorted.
    assert a.names == ["3.png", "4.png", "5.png"]
    assert c.names == ["1.png", "2.png", "4.png"]
    assert a.sha256 != c.sha256


def test_sha256_covers_shape_and_content() -> None:
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    a = CalibrationSet(x, "t", ["a", "b"])
    same = CalibrationSet(x.copy(), "other source", ["c", "d"])
    reshaped = CalibrationSet(x.reshape(1, 6, 2, 2), "t", ["a"])
    y = x.copy()
    y[1, 2, 1, 1] += 1.0
    changed = CalibrationSet(y, "t", ["a", "b"])
    assert a.sha256 == same.sha256
    assert len({a.sha256, reshaped.sha256, changed.sha256}) == 3
    assert len(a.sha256) == 64


def test_batches_cover_the_set_in_order() -> None:
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32)
    cs = CalibrationSet(x, "t", [str(i) for i in range(5)])
    bs = list(cs.batches(2))
    assert [len(b) for b in bs] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(bs), x)
    with pytest.raises(ValueError):
        next(cs.batches(0))


def test_npz_key_choice_and_count(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "one.npz", whatever=x)
    cs = CalibrationSet.from_path(tmp_path / "one.npz", SMALL)
    np.testing.assert_array_equal(cs.images, x)
    assert cs.names == ["one.npz[0]", "one.npz[1]", "one.npz[2]", "one.npz[3]"]
    np.savez(tmp_path / "two.npz", images=x, labels=np.arange(4))
    sub = CalibrationSet.from_path(tmp_path / "two.npz", SMALL, count=2, seed=0)
    idx = np.sort(np.random.default_rng(0).choice(4, 2, replace=False))
    np.testing.assert_array_equal(sub.images, x[idx])
    np.savez(tmp_path / "ambiguous.npz", a=x, b=x)
    with pytest.raises(UserError, match="ambiguous.npz.*'images'"):
        CalibrationSet.from_path(tmp_path / "ambiguous.npz", SMALL)


@pytest.mark.parametrize(
    ("arr", "found"),
    [
        (np.zeros((2, 3, 16, 16), np.float32), r"float32 with shape \(2, 3, 16, 16\)"),
        (np.zeros((2, 3, 32, 32), np.float64), r"float64 with shape \(2, 3, 32, 32\)"),
        (np.zeros((3, 32, 32), np.float32), r"float32 with shape \(3, 32, 32\)"),
        (np.zeros((2, 32, 32, 3), np.float32), r"float32 with shape \(2, 32, 32, 3\)"),
    ],
)
def test_npz_wrong_shape_or_dtype_is_user_error(tmp_path: Path, arr: np.ndarray, found: str) -> None:
    f = tmp_path / "calib.npz"
    np.savez(f, images=arr)
    want = rf"calib\.npz.*{found}.*expected float32 with shape \(N, 3, 32, 32\)"
    with pytest.raises(UserError, match=want):
        CalibrationSet.from_path(f, SMALL)


def test_npz_not_a_zip_is_user_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.npz"
    f.write_bytes(b"garbage")
    with pytest.raises(UserError, match="broken.npz"):
        CalibrationSet.from_path(f, SMALL)


def test_builtin_parts_are_disjoint_by_photo_and_sized() -> None:
    cal = CalibrationSet.builtin(CARD, "calibration")
    held = CalibrationSet.builtin(CARD, "heldout")
    # every view of every photo of the part, each once
    assert cal.images.shape == (len(PARTS["calibration"]) * len(VIEWS), 3, 224, 224)
    assert cal.images.dtype == np.float32 and len(held) == len(PARTS["heldout"]) * len(VIEWS)
    assert len(set(cal.names)) == len(cal) and len(set(held.names)) == len(held)
    cal_photos = {n.split("/")[0] for n in cal.names}
    held_photos = {n.split("/")[0] for n in held.names}
    assert cal_photos == set(PARTS["calibration"]) and held_photos == set(PARTS["heldout"])
    assert not cal_photos & held_photos
    assert np.isfinite(cal.images).all()
    # Real photos: normalized values span roughly the ImageNet range, not a constant.
    assert cal.images.min() < -1.5 and cal.images.max() > 2.0
    # The flipped view is the mirror of the full view (resize and centre crop commute with a flip,
    # up to the crop's one-pixel rounding, so compare the interior).
    full, flip = held.images[held.names.index("skimage.chelsea/full")], held.images[1]
    assert held.names[1] == "skimage.chelsea/flip"
    np.testing.assert_allclose(flip[:, :, 8:-8], full[:, :, ::-1][:, :, 8:-8], atol=0.05)


def test_builtin_is_cached_deterministic_and_subsettable() -> None:
    a = CalibrationSet.builtin(CARD, "calibration", count=10, seed=3)
    b = CalibrationSet.builtin(CARD, "calibration", count=10, seed=3)
    full = CalibrationSet.builtin(CARD, "calibration")
    assert a.sha256 == b.sha256 and len(a) == 10
    idx = [full.names.index(n) for n in a.names]
    assert idx == sorted(np.random.default_rng(3).choice(len(full), 10, replace=False).tolist())
    np.testing.assert_array_equal(a.images, full.images[idx])
    a.images[0] += 1.0  # callers get their own copy, the cache stays intact
    assert CalibrationSet.builtin(CARD, "calibration").sha256 == full.sha256
    with pytest.raises(UserError, match="heldout"):
        CalibrationSet.builtin(CARD, "test")
