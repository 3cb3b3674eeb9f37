"""What an export or a verification is asked to do, as typed objects: the CLI parses its flags into these once,
and a library user builds them directly (README: "From Python")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bottlefit.errors import UserError
from bottlefit.targets import Emulate

if TYPE_CHECKING:
    from bottlefit.calibration.observers import ObserverKind
    from bottlefit.exporter.rounding import WeightRounding
    from bottlefit.pipeline.recipe import Recipe, Rung

DEFAULT_UNTRAINED = "custom_resnet152"


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a checkpoint, or an architecture with random weights (``untrained``).

    ``arch`` and the bottleneck fields name the architecture of checkpoints that do not (bare state_dicts)."""

    checkpoint: Path | None = None
    arch: str | None = None
    bottleneck_channel: int | None = None
    bottleneck_ver: str | None = None
    bq: bool = False
    untrained: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint is None and not self.untrained:
            raise UserError("no checkpoint given: pass CHECKPOINT, or --untrained to export the architecture "
                            "with random weights")
        if self.checkpoint is not None and self.untrained:
            raise UserError(f"{self.checkpoint} and --untrained: a checkpoint has trained weights, --untrained "
                            "random ones; pass one of them")

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.bottleneck_channel is not None:
            out["bottleneck_channel"] = self.bottleneck_channel
        if self.bottleneck_ver is not None:
            out["bottleneck_ver"] = str(self.bottleneck_ver)
        if self.bq:
            out["bq"] = True
        return out


@dataclass(frozen=True)
class CalibrationOptions:
    """The images int8 ranges come from (``source``: a folder, ImageFolder tree or .npz; None = the built-in
    photos), how many (a seeded choice), the range observer (``search``: per-tensor range search, the same
    recipe for every scheme), ``equalize``: bottleneck channel equalization across the split
    (``bottlefit.exporter.equalize``; head, tail and wire change together), and ``fold_pool_bn``: the head's
    stand-alone BatchNorm folded through the max-pool into the stem conv where that is exact
    (``bottlefit.exporter.split.fold_head``; one int8 layer fewer), ``weight_rounding`` (nearest | gptq) and
    ``bias_correction`` for the int8 heads' weights (``bottlefit.exporter.rounding``).

    ``recipe`` (auto | fast | best; None: auto, or the knobs given) and the four knobs ``observer``,
    ``weight_rounding``, ``bias_correction``, ``equalize`` (None: the recipe's) choose the int8 recipe
    (``bottlefit.pipeline.recipe``: auto tries fast, then best while int8 fidelity gates fail; a knob given fixes
    one recipe, the others from ``recipe`` or fast)."""

    source: str | None = None
    count: int | None = None
    observer: ObserverKind | None = None
    seed: int = 0
    equalize: bool | None = None
    fold_pool_bn: bool = True
    weight_rounding: WeightRounding | None = None
    bias_correction: bool | None = None
    recipe: str | None = None

    def __post_init__(self) -> None:
        from bottlefit.calibration.observers import ObserverKind, make_observer
        from bottlefit.exporter.rounding import WeightRounding, check_method

        if self.observer is not None:
            make_observer(self.observer)  # UserError naming the choices
            object.__setattr__(self, "observer", ObserverKind(self.observer))
        if self.weight_rounding is not None:
            check_method(self.weight_rounding)
            object.__setattr__(self, "weight_rounding", WeightRounding(self.weight_rounding))
        self.plan()  # a recipe that contradicts the knobs given is refused before any work
        if self.count is not None and self.count < 1:
            raise UserError(f"--calib-count {self.count}: give a positive number of calibration images")
        if self.source:
            from bottlefit.calibration.dataset import CALIBRATION, check_source

            check_source(self.source, CALIBRATION, self.count, self.seed)  # before any model is loaded

    def plan(self) -> tuple[Recipe, list[Rung]]:
        """(the recipe asked for, the recipes to build with in order; ``bottlefit.pipeline.recipe.plan``)."""
        from bottlefit.pipeline.recipe import KNOBS, plan

        return plan(self.recipe, {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None})


@dataclass(frozen=True)
class ParityOptions:
    """The held-out images parity judges on (None = the built-in held-out photos), tolerance overrides
    (``[ARTIFACT:]METRIC=VALUE``) and emulation of the target's device."""

    images: str | None = None
    count: int | None = None
    tolerance: tuple[str, ...] = ()
    emulate: Emulate = field(default_factory=Emulate)

    def __post_init__(self) -> None:
        self.overrides()  # a malformed --tolerance is refused before any work
        if self.count is not None and self.count < 1:
            raise UserError(f"--parity-count {self.count}: give a positive number of held-out images")
        if self.images:
            from bottlefit.calibration.dataset import HELDOUT, check_source

            check_source(self.images, HELDOUT, self.count, 0)  # the seed export's held-out choice uses

    def overrides(self) -> dict[tuple[str | None, str], float]:
        from bottlefit.parity.tolerances import parse_overrides

        return parse_overrides(list(self.tolerance))


@dataclass(frozen=True)
class ExportRequest:
    """One ``bottlefit export``: a model, a target with its own options (``Target.options_type``; None = its
    defaults), where to write, and the calibration and parity choices. ``replace_failed``: an attempt that fails
    parity replaces OUT/<target> too (by default the last passing export stays, the attempt goes to
    OUT/<target>.failed; ``bottlefit.pipeline.outdir``)."""

    model: ModelSource
    target: str
    out: Path
    target_options: Any = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    parity: ParityOptions = field(default_factory=ParityOptions)
    replace_failed: bool = False


@dataclass(frozen=True)
class VerifyRequest:
    """One ``bottlefit verify``: OUT/<target> or OUT; other held-out images, a moved checkpoint, new tolerances
    (None = those recorded at export), and emulation. ``strict``: the built-in gates only, whatever overrides the
    (unsigned) manifest records; what CI should run."""

    path: Path
    images: str | None = None
    checkpoint: Path | None = None
    tolerance: tuple[str, ...] | None = None
    emulate: Emulate = field(default_factory=Emulate)
    budget: bool = False  # also the error budget of every int8 Q/DQ ONNX head (bottlefit.parity.budget)
    strict: bool = False

    def __post_init__(self) -> None:
        if self.strict and self.tolerance is not None:
            raise UserError("--strict judges by the built-in gates only; drop --tolerance, or drop --strict")
        if self.images:
            from bottlefit.calibration.dataset import HELDOUT, check_source

            check_source(self.images, HELDOUT)  # before any artifact is run
