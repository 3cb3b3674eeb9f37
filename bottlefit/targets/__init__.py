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
from bottlefit.runtimes.execution import Execution

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


@dataclass(frozen=True)
class Emulate:
    """``--emulate``: run the target's own runtime on the target's ISA under emulation.

    ``auto`` (default): the target's default boards where the emulator can run here, else each run is recorded
    as not run with the reason; ``none``: no emulation; ``pi4,pi5``: those boards, and an emulator that cannot
    run is an error."""

    mode: str = "auto"  # auto | on | off
    profiles: tuple[str, ...] = ()  # empty: the target's default boards

    @classmethod
    def parse(cls, text: str | None) -> Emulate:
        text = (text or "auto").strip()
        if text == "auto":
            return cls()
        if text == "none":
            return cls("off")
        profiles = tuple(p.strip() for p in text.split(",") if p.strip())
        if not profiles:
            raise UserError(f"--emulate {text!r}: give auto, none, or board profiles such as pi4,pi5")
        return cls("on", profiles)


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

    def execute(self, target_dir: Path, artifacts: list[Artifact], emulate: Emulate,
                log: Callable[[str], None]) -> list[Execution]:
        """Run the artifacts in the target's runtime on the target's ISA where this host can (emulation), and
        say where that must happen instead (the board): the execution half of the verdict."""


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
