"""The rpi bundle's ``board/README.md`` text and the example image it names, made per export (the one bundle writer,
``bottlefit.serve.export.write_board_bundle``, writes the README): the README names this
bundle's heads, its board profile's default head, an image that is in the bundle, and the exact versions of the
wheels the bundle is checked with (one source: ``bottlefit.emulation.arm64.WHEELS``, what the emulated Pi runs;
the optional and image-only packages from the package's own requirements, i.e. pyproject.toml)."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

import numpy as np

TEMPLATE = Path(__file__).with_name("board") / "README.template.md"
README = "README.md"
EXAMPLE = "example.png"
OPTIONAL_EXTRA = "board"  # pyproject's extra of the board's optional compiled encoder (numba, llvmlite)


def runtime_pins() -> tuple[str, ...]:
    """``name==version`` of every wheel the emulated Pi runs the bundle with: what the README tells a Pi to
    install."""
    from bottlefit.emulation.arm64 import WHEELS

    return tuple(WHEELS)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return list(requires("bottlefit") or ())
    except PackageNotFoundError:  # a source tree that is not installed: nothing to read the pins from
        return []


def extra_pins(extra: str = OPTIONAL_EXTRA) -> tuple[str, ...]:
    """The requirements of one of the package's extras (pyproject.toml's ``[project.optional-dependencies]``)."""
    marker = f'extra == "{extra}"'
    return tuple(r.split(";", 1)[0].strip() for r in _requirements() if marker in r.split(";", 1)[-1])


def requirement(name: str) -> str:
    """The package's own requirement on ``name`` (e.g. ``pillow>=10``), or the bare name."""
    for r in _requirements():
        spec = r.split(";", 1)[0].strip()
        if ";" not in r and spec.lower().startswith(name.lower()) and spec[len(name):][:1] in ("", "=", ">", "<", "~",
                                                                                           "!", "["):
            return spec
    return name


def write_example(board: Path, x: np.ndarray, card: Any) -> Path:
    """``board/example.png``: one held-out input (normalized float, (1,)3,H,W) back as the 8-bit RGB picture the
    board's preprocessing reads (PNG, no timestamps: the same bytes every export)."""
    from PIL import Image

    chw = np.asarray(x, dtype=np.float32).reshape(3, *np.shape(x)[-2:])
    mean = np.asarray(card.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(card.std, dtype=np.float32).reshape(3, 1, 1)
    rgb = np.round(np.clip(chw * std + mean, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    path = board / EXAMPLE
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def render(golden: dict[str, Any], heads: list[str], example_what: str) -> str:
    """The README text for a bundle whose ``golden.json`` is ``golden`` and whose head files are ``heads``."""
    profile = golden.get("profile") or {}
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        heads=", ".join(f"`{h}`" for h in heads), profile=profile.get("name", "?"),
        board=profile.get("board", "?"), core=profile.get("core", "?"),
        default_head=profile.get("model", "?"), runtime=profile.get("runtime", "?"),
        threads=profile.get("threads", 1), runtime_pins=" ".join(runtime_pins()),
        pillow=requirement("pillow"), numba_pins=" ".join(extra_pins()) or "numba llvmlite",
        example=EXAMPLE, example_what=example_what)


def example_what(name: str, card: Any) -> str:
    """What the README says ``example.png`` is: the first golden input, held-out image ``name``."""
    return (f"the first golden input (held-out image `{name}`), at the model's input size "
            f"{card.input_shape[1]}x{card.input_shape[2]}")
