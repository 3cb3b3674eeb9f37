"""Int8 calibration recipes and the ``--recipe auto`` ladder.

A recipe fixes the four calibration knobs every int8 artifact depends on: the range observer, the weights'
rounding, bias correction and bottleneck equalization. ``fast`` is min/max ranges with round-to-nearest weights;
``best`` is what the measurements say helps most (bench/results/fidelity: R152 v2 symmetric 29.6 -> 34.7 dB,
asymmetric 31.3 -> 36.3 dB pooled SQNR) for about 15-20 s more calibration on a ResNet-152 head. No rung in
between: ``search+eq`` saves about 4 s of those and passes the trained cosine gate on R152 v2 by 0.0001, so a
miss there would cost a whole further rung.

``auto`` (the default) builds with ``fast`` and, when the verdict fails only on int8 fidelity gates (what a recipe
can change), builds again with the next recipe, until one passes or none is left. Other failures stop the ladder:
an fp32 artifact off PyTorch is a bug, a gated execution (the device's kernels against the artifact's reference
semantics) is not about the recipe. Naming any knob (``--observer``, ``--weight-rounding``, ``--bias-correction``,
``--equalize``) fixes the recipe to the user's choice: one build, no ladder; the knobs not named come from
``--recipe fast|best`` (``fast`` when it is not given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Generic, TypeVar

from bottlefit.calibration.observers import ObserverKind
from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact, Precision
from bottlefit.exporter.rounding import WeightRounding
from bottlefit.parity.verify import Check, CheckKind, Verdict

T = TypeVar("T")


class Recipe(StrEnum):
    AUTO = "auto"  # the ladder: FAST, then BEST while int8 fidelity gates fail
    FAST = "fast"
    BEST = "best"
    CUSTOM = "custom"  # the user's own knobs (never asked for by name)


CHOICES = (Recipe.AUTO, Recipe.FAST, Recipe.BEST)  # what ``--recipe`` accepts


@dataclass(frozen=True)
class Knobs:
    """The calibration choices an int8 artifact depends on (``CalibrationOptions``' fields of the same names)."""

    observer: ObserverKind
    weight_rounding: WeightRounding
    bias_correction: bool
    equalize: bool

    def describe(self) -> str:
        return (f"observer {self.observer}, {self.weight_rounding} weight rounding"
                f"{', bias correction' if self.bias_correction else ''}{', equalize' if self.equalize else ''}")


KNOBS = tuple(f.name for f in fields(Knobs))
RECIPES: dict[Recipe, Knobs] = {
    Recipe.FAST: Knobs(observer=ObserverKind.MINMAX, weight_rounding=WeightRounding.NEAREST, bias_correction=False,
                       equalize=False),
    Recipe.BEST: Knobs(observer=ObserverKind.SEARCH, weight_rounding=WeightRounding.GPTQ, bias_correction=True,
                       equalize=True),
}
LADDER = (Recipe.FAST, Recipe.BEST)
_FLAG = {"observer": "--observer", "weight_rounding": "--weight-rounding", "bias_correction": "--bias-correction",
         "equalize": "--equalize"}


@dataclass(frozen=True)
class Rung:
    recipe: Recipe  # FAST, BEST or CUSTOM
    knobs: Knobs


def plan(requested: str | None, given: dict[str, Any]) -> tuple[Recipe, list[Rung]]:
    """(the recipe asked for, the rungs to try in order). ``requested``: ``--recipe`` (None: not given);
    ``given``: the knobs the user named (name -> value; the others left out)."""
    unknown = set(given) - set(KNOBS)
    if unknown:
        raise ValueError(f"not calibration knobs: {sorted(unknown)}")
    if requested is not None and requested not in CHOICES:
        raise UserError(f"--recipe {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == Recipe.AUTO and given:
        flags = ", ".join(_FLAG[k] for k in KNOBS if k in given)
        raise UserError(f"--recipe auto chooses {flags} itself; drop {flags}, or pass --recipe fast or best as "
                        "the recipe they adjust")
    if not given:
        asked = Recipe(requested or Recipe.AUTO)
        return asked, [Rung(r, RECIPES[r]) for r in (LADDER if asked == Recipe.AUTO else (asked,))]
    knobs = replace(RECIPES[Recipe(requested or Recipe.FAST)], **given)
    named = next((r for r, k in RECIPES.items() if k == knobs), Recipe.CUSTOM)
    return Recipe(requested or Recipe.CUSTOM), [Rung(named, knobs)]


def recipe_failures(verdict: Verdict, artifacts: Sequence[Artifact]) -> list[Check] | None:
    """The int8 fidelity checks ``verdict`` failed, when they are all it failed (another recipe may pass them);
    None when something else failed too (an fp32 or fp16 artifact's check, a gated execution): no recipe helps."""
    precision = {a.file: a.precision for a in artifacts}
    failed = verdict.failures()
    if any(precision.get(c.artifact) != Precision.INT8 or c.kind != CheckKind.FIDELITY for c in failed):
        return None
    if any(not e.passed for e in verdict.execution):
        return None
    return failed


@dataclass
class Attempt:
    rung: Rung
    passed: bool
    failures: list[Check]
    outcome: str

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": str(self.rung.recipe), "knobs": asdict(self.rung.knobs), "passed": self.passed,
                "failures": [{"artifact": c.artifact, "metric": c.metric, "value": c.value, "op": c.op,
                              "tolerance": c.tolerance} for c in self.failures],
                "outcome": self.outcome}


@dataclass
class Climb(Generic[T]):
    """What the ladder ended with: the last rung's build (``T``) and verdict, and every attempt."""

    requested: Recipe
    build: T
    verdict: Verdict
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def rung(self) -> Rung:
        return self.attempts[-1].rung

    def record(self) -> dict[str, Any]:
        """The manifest's ``recipe`` section: what was asked, what built the artifacts and why, every rung."""
        last = self.attempts[-1]
        why = "; ".join(a.outcome for a in self.attempts)
        if self.requested == Recipe.CUSTOM:
            why = f"fixed by the calibration knobs given: {why}"
        elif self.requested != Recipe.AUTO:
            why = f"fixed by --recipe {self.requested}: {why}"
        return {"requested": str(self.requested), "taken": str(last.rung.recipe), "knobs": asdict(last.rung.knobs),
                "reason": why, "attempts": [a.to_dict() for a in self.attempts]}


def _gates(checks: list[Check]) -> str:
    return ", ".join(f"{c.artifact} {c.metric} {c.value:.4g} (needs {c.op} {c.tolerance:g})" for c in checks)


def climb(requested: Recipe, rungs: list[Rung], attempt: Callable[[Rung], tuple[T, Verdict, list[Artifact]]],
          finish: Callable[[T, Verdict], None], log: Callable[[str], None]) -> Climb[T]:
    """Try ``rungs`` in order. ``attempt`` builds one rung's artifacts and judges their fidelity (it starts from
    a clean directory each time); ``finish`` completes the verdict of the rung kept (its executions). A rung moves
    on only when its fidelity fails on int8 gates alone and a rung is left; the last rung's verdict stands.

    ``attempt`` may return a staged verdict (``parity.verify.verify(staged=True)``): every check that can stop the
    ladder made, the int8 artifacts' logits checks, host executions and diagnoses pending. A rung whose int8 gates
    already failed moves on without them (its attempt says what was not run); any other verdict is completed
    first, so the ladder decides exactly as on a complete verdict."""
    attempts: list[Attempt] = []
    for i, rung in enumerate(rungs):
        if len(rungs) > 1:
            log(f"recipe {rung.recipe} ({rung.knobs.describe()}): rung {i + 1} of {len(rungs)} of --recipe "
                f"{requested}")
        built, verdict, artifacts = attempt(rung)
        nxt = rungs[i + 1] if i + 1 < len(rungs) else None
        # a staged verdict (parity.verify's ``staged``) already holds every check that can stop the ladder;
        # when its int8 gates have failed, what it left pending cannot keep the rung: it is never made
        failures = recipe_failures(verdict, artifacts)
        if not (nxt is not None and failures):
            failures = recipe_failures(verdict.complete(), artifacts)
        if nxt is not None and failures:
            outcome = f"{rung.recipe} failed int8 fidelity gates ({_gates(failures)}): moved on to {nxt.recipe}"
            if verdict.pending:
                outcome += f" (not run, as they cannot keep the rung: {verdict.pending})"
            log(f"recipe {outcome}")
            attempts.append(Attempt(rung, False, failures, outcome))
            continue
        finish(built, verdict)
        failed = verdict.failures()
        what = _gates(failed) or "a gated execution"
        if verdict.passed:
            outcome = f"{rung.recipe} passed"
        elif nxt is not None:  # failures is None: not a recipe's gate
            outcome = f"{rung.recipe} failed checks no recipe changes ({what}): stopped"
        else:
            outcome = f"{rung.recipe} failed ({what}): no recipe left"
        if len(rungs) > 1:
            log(f"recipe {outcome}")
        attempts.append(Attempt(rung, verdict.passed, failed, outcome))
        return Climb(requested, built, verdict, attempts)
    raise ValueError("no rungs to climb")
