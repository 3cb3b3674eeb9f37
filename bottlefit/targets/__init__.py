"""Device targets. Each lives in its own folder behind the same small interface (``Target``).

Nothing outside a target's folder knows which target it is: the command asks this registry for the target by
name, lets it add its own options, asks what a build needs (``needs``), makes that, calls ``build`` and starts its
executions (``start_execution``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact
from bottlefit.runtimes.execution import Execution

if TYPE_CHECKING:  # both import torch: a context is made where it is loaded anyway
    from bottlefit.calibration.observers import ObserverKind
    from bottlefit.exporter.rounding import Rounding

T = TypeVar("T")

# name -> "module:attribute" of a Target instance; imported lazily.
_TARGETS = {
    "onnx": "bottlefit.targets.onnx:TARGET",
    "jetson": "bottlefit.targets.jetson:TARGET",
    "rpi": "bottlefit.targets.rpi:TARGET",
}


@dataclass(frozen=True)
class Needs:
    """What a target's build reads besides the split and the held-out images, decided from its options before
    anything is built: the pipeline makes exactly this, so what a build records never depends on what the target
    happened to touch."""

    calibration: bool  # the calibration set (int8 ranges, codec tables); the manifest records it
    int8_head: bool  # the head int8 artifacts quantize (weight-rounded by the pipeline's "round" step when asked)

    def __post_init__(self) -> None:
        if self.int8_head and not self.calibration:
            raise ValueError("an int8 head is calibrated: Needs(int8_head=True) needs calibration=True")


@dataclass(frozen=True)
class BuildContext:
    """What a target builds from, all made before its build starts (``Target.needs`` says what): a build reads
    it and changes nothing in it.

    ``options`` is the target's own typed options object (``Target.options_type``); ``observer`` and
    ``tolerance_overrides`` are the export's calibration and parity choices the target's artifacts depend on.
    Int8 artifacts quantize ``int8_head`` (``split.head`` itself, or its copy with conv weights already on the int8
    grid, then ``rounding`` says how); fp32 artifacts and parity's reference use ``split.head``."""

    split: Any  # bottlefit.exporter.split.SplitModel
    out_dir: Path  # a fresh temporary directory; the pipeline renames it into place when all succeeded
    options: Any
    heldout: Any  # bottlefit.calibration.CalibrationSet parity judges on (never calibration images)
    observer: ObserverKind  # the int8 artifacts' range observer
    calibration: Any = None  # bottlefit.calibration.CalibrationSet, where ``Needs.calibration``
    int8_head: Any = None  # where ``Needs.int8_head``
    rounding: Rounding | None = None  # how ``int8_head``'s weights were rounded (None: it is ``split.head``)
    log: Callable[[str], None] = print
    tolerance_overrides: Mapping[tuple[str | None, str], float] = field(default_factory=dict)

    @contextlib.contextmanager
    def int8_onnx_source(self, fp32_onnx: Path, opset: int, input_name: str, output_name: str) -> Iterator[Path]:
        """The fp32 ONNX an int8 ONNX head is quantized from: ``fp32_onnx`` (the shipped fp32 head) itself, or
        ``int8_head`` exported with the same names into a temporary directory."""
        if self.int8_head is self.split.head:
            yield Path(fp32_onnx)
            return
        import torch

        from bottlefit.exporter.onnx import export_onnx

        x = torch.randn(1, *self.split.card.input_shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="bottlefit-int8-source-") as tmp:
            yield export_onnx(self.int8_head, x, Path(tmp) / Path(fp32_onnx).name, opset, input_name,
                              output_name).path

    def result(self, artifacts: list[Artifact]) -> BuildResult:
        """The build's result: ``artifacts`` with the calibration set and weight rounding they were made with."""
        return BuildResult(artifacts, self.calibration, self.rounding)


@dataclass(frozen=True)
class BuildResult:
    """What ``Target.build`` made: its artifacts (in ``BuildContext.out_dir``) and the records of what they were
    made from, for the manifest."""

    artifacts: list[Artifact]
    calibration: Any = None  # the CalibrationSet the int8 artifacts were calibrated on (None: none was used)
    rounding: Rounding | None = None  # the int8 heads' weight rounding (None: to nearest, in each converter)


class Started(Protocol):
    """A target's executions under way (``Target.start_execution``): the caller's own work runs beside them."""

    def collect(self) -> list[Execution]:
        """Wait for them and give their records."""

    def cancel(self) -> None:
        """Stop them: their results are no longer wanted (the bundle changed, or the export gave up)."""


@dataclass
class Finished:
    """Executions with nothing to wait for: a target without emulation knows its records at once."""

    records: list[Execution] = field(default_factory=list)

    def collect(self) -> list[Execution]:
        return list(self.records)

    def cancel(self) -> None:
        """Nothing runs."""


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
    emulates: bool  # whether ``--emulate`` runs anything of this target (its board scripts on the board's ISA)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this target's own flags to ``bottlefit export`` (their dests are ``options_type``'s fields)."""

    def validate(self, options: Any) -> None:
        """Refuse (UserError, or EnvironmentProblem for what this machine lacks) what this target cannot honour,
        before any work starts (the model is not loaded yet, so a bad flag costs nothing)."""

    def needs(self, options: Any) -> Needs:
        """What a build with ``options`` reads besides the split (the pipeline makes that, and only that)."""

    def build(self, ctx: BuildContext) -> BuildResult:
        """Write the artifacts into ``ctx.out_dir``; describe them and what they were made from."""

    def start_execution(self, target_dir: Path, artifacts: list[Artifact], emulate: Emulate,
                        log: Callable[[str], object]) -> Started:
        """Start running the artifacts in the target's runtime on the target's ISA where this host can (emulation),
        and say where that must happen instead (the board): the execution half of the verdict. Returns at once; a
        target without emulation returns ``Finished``."""


def execute(target: Target, target_dir: Path, artifacts: list[Artifact], emulate: Emulate,
            log: Callable[[str], object]) -> list[Execution]:
    """``target``'s executions, waited for (``start_execution`` then ``collect``)."""
    return target.start_execution(target_dir, artifacts, emulate, log).collect()


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
