"""Device targets. Each lives in its own folder behind the same small interface (``Target``).

Nothing outside a target's folder knows which target it is: the command asks this registry for the target by
name, lets it add its own options, and calls ``build``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact
from bottlefit.runtimes.execution import Execution

T = TypeVar("T")

# name -> "module:attribute" of a Target instance; imported lazily.
_TARGETS = {
    "onnx": "bottlefit.targets.onnx:TARGET",
    "jetson": "bottlefit.targets.jetson:TARGET",
    "rpi": "bottlefit.targets.rpi:TARGET",
}


@dataclass
class BuildContext:
    """What a target gets to build from. ``calibration`` is made on first use (it costs image decoding).

    ``options`` is the target's own typed options object (``Target.options_type``); ``observer``,
    ``weight_rounding``, ``bias_correction`` and ``tolerance_overrides`` are the export's calibration and parity
    choices the target's artifacts depend on. Int8 artifacts quantize ``int8_head``; fp32 artifacts and parity's
    reference use ``split.head``."""

    split: Any  # bottlefit.exporter.split.SplitModel
    out_dir: Path  # a fresh temporary directory; the pipeline renames it into place when all succeeded
    options: Any
    calibration_factory: Callable[[], Any] | None = None  # -> bottlefit.calibration.CalibrationSet
    heldout_factory: Callable[[], Any] | None = None  # -> the CalibrationSet parity judges on
    log: Callable[[str], None] = print
    observer: str = "minmax"
    tolerance_overrides: dict[tuple[str | None, str], float] = field(default_factory=dict)
    weight_rounding: str = "nearest"
    bias_correction: bool = False
    rounding: dict[str, Any] | None = None  # bottlefit.exporter.rounding.Rounding.to_dict(), once int8_head ran
    # what the targets of one export share (``bottlefit export --target a,b``): a weight-rounded int8 head is made
    # once for every target building from the same split with the same rounding
    shared: dict[Any, Any] = field(default_factory=dict)
    _calibration: Any = field(default=None, repr=False)
    _int8_head: Any = field(default=None, repr=False)
    _heldout: Any = field(default=None, repr=False)

    @property
    def calibration(self) -> Any:
        if self._calibration is None:
            if self.calibration_factory is None:
                raise UserError("this target needs calibration images: pass --calib PATH")
            self._calibration = self.calibration_factory()
        return self._calibration

    @property
    def calibration_used(self) -> Any | None:
        """The calibration set if the build asked for one (the manifest records it), else None."""
        return self._calibration

    @property
    def int8_head(self) -> Any:
        """The head every int8 artifact quantizes: ``split.head`` itself, or (``weight_rounding`` gptq, or
        ``bias_correction``) a copy whose conv weights are already on the int8 grid, rounded on the calibration
        images (``bottlefit.exporter.rounding``), so every converter writes the same integers."""
        if self._int8_head is None:
            if self.weight_rounding == "nearest" and not self.bias_correction:
                self._int8_head = self.split.head
            else:
                key = ("int8_head", id(self.split.head), self.weight_rounding, self.bias_correction)
                if key not in self.shared:
                    self.shared[key] = (self.split.head, *self._round())  # the head kept with it: its id stays
                _, self._int8_head, self.rounding, lines = self.shared[key]
                for line in lines:
                    self.log(line)
        return self._int8_head

    def _round(self) -> tuple[Any, dict[str, Any], list[str]]:
        """(the weight-rounded head, its record, the lines that say what it did)."""
        from bottlefit.exporter.rounding import round_head

        images = self.calibration.images
        head, rec = round_head(self.split.head, images, self.weight_rounding, bias_correction=self.bias_correction)
        lines = [f"weight rounding {self.weight_rounding}{' + bias correction' if self.bias_correction else ''}: "
                 f"{self.split.head_module_path(layer)}: output SQNR {row['sqnr_db_nearest']:.1f} dB nearest -> "
                 f"{row['sqnr_db']:.1f} dB ({len(images)} images)" for layer, row in rec.layers.items()]
        return head, rec.to_dict(), lines

    @contextlib.contextmanager
    def int8_onnx_source(self, fp32_onnx: Path, opset: int, input_name: str, output_name: str) -> Iterator[Path]:
        """The fp32 ONNX an int8 ONNX head is quantized from: ``fp32_onnx`` (the shipped fp32 head) itself, or
        ``int8_head`` exported with the same names into a temporary directory."""
        head = self.int8_head
        if head is self.split.head:
            yield Path(fp32_onnx)
            return
        import torch

        from bottlefit.exporter.onnx import export_onnx

        x = torch.randn(1, *self.split.card.input_shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="bottlefit-int8-source-") as tmp:
            yield export_onnx(head, x, Path(tmp) / Path(fp32_onnx).name, opset, input_name, output_name).path

    @property
    def heldout(self) -> Any:
        """The held-out images parity judges on (never calibration images); golden data comes from these."""
        if self._heldout is None:
            if self.heldout_factory is None:
                raise UserError("no held-out images: pass --images PATH")
            self._heldout = self.heldout_factory()
        return self._heldout


def options_from(cls: type[T], values: Mapping[str, Any]) -> T:
    """A target's options dataclass from parsed command-line values (a plain mapping): the fields it names, where
    given; the dataclass's defaults elsewhere. Called once, at the CLI edge."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


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
        from bottlefit.emulation.arm64 import get_core

        profiles = tuple(p.strip() for p in text.split(",") if p.strip())
        if not profiles:
            raise UserError(f"--emulate {text!r}: give auto, none, or board profiles such as pi4,pi5")
        for p in profiles:
            get_core(p)  # an unknown board is refused here, before any work
        return cls("on", profiles)


class Target(Protocol):
    name: str
    summary: str
    options_type: type  # the dataclass of this target's options; ``options_type()`` are the defaults

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this target's own flags to ``bottlefit export`` (their dests are ``options_type``'s fields)."""

    def validate(self, options: Any) -> None:
        """Refuse (UserError, or EnvironmentProblem for what this machine lacks) what this target cannot honour,
        before any work starts (the model is not loaded yet, so a bad flag costs nothing)."""

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
