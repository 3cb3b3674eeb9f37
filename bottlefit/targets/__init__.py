"""Device targets. Each lives in its own folder behind the same small interface (``Target``).

Nothing outside a target's folder knows which target it is: the command asks this registry for the target by
name, lets it add its own options, and calls ``build``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact

# name -> "module:attribute" of a Target instance; imported lazily.
_TARGETS = {
    "onnx": "bottlefit.targets.onnx:TARGET",
    "jetson": "bottlefit.targets.jetson:TARGET",
    "rpi": "bottlefit.targets.rpi:TARGET",
}


@dataclass
class BuildContext:
    """What a target gets to build from. ``calibration`` is made on first use (it costs image decoding)."""

    split: Any  # bottlefit.exporter.split.SplitModel
    out_dir: Path  # a fresh temporary directory; the exporter renames it into place when all succeeded
    options: argparse.Namespace
    calibration_factory: Callable[[], Any] | None = None  # -> bottlefit.calibration.CalibrationSet
    heldout_factory: Callable[[], Any] | None = None  # -> the CalibrationSet parity judges on
    log: Callable[[str], None] = print
    _calibration: Any = field(default=None, repr=False)
    _heldout: Any = field(default=None, repr=False)

    @property
    def calibration(self) -> Any:
        if self._calibration is None:
            if self.calibration_factory is None:
                raise UserError("this target needs calibration images: pass --calib PATH")
            self._calibration = self.calibration_factory()
        return self._calibration

    @property
    def heldout(self) -> Any:
        """The held-out images parity judges on (never calibration images); golden data comes from these."""
        if self._heldout is None:
            if self.heldout_factory is None:
                raise UserError("no held-out images: pass --images PATH")
            self._heldout = self.heldout_factory()
        return self._heldout


class Target(Protocol):
    name: str
    summary: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this target's own options to ``bottlefit export``."""

    def validate(self, options: argparse.Namespace) -> None:
        """Refuse (UserError) what this target cannot honour, before any work starts (the model is not loaded
        yet, so a bad flag costs nothing)."""

    def build(self, ctx: BuildContext) -> list[Artifact]:
        """Write the artifacts into ``ctx.out_dir`` and describe them."""


def names() -> list[str]:
    return list(_TARGETS)


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(_TARGETS)}")
    mod_name, attr = _TARGETS[name].split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("bottlefit"):
            raise UserError(f"target {name!r} is not available in this build of bottlefit") from e
        raise
    target = getattr(module, attr, None)
    if target is None:
        raise UserError(f"target {name!r} is not available in this build of bottlefit")
    return target
