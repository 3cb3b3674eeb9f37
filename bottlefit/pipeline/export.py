"""``bottlefit export``: load -> split -> calibrate -> round -> build each target -> verify -> manifest, written
atomically.

Each step is a call here, in that order, and hands its result to the next: a target says up front what its build
reads (``Target.needs``), the pipeline makes exactly that (the calibration set, the weight-rounded int8 head), and
the build returns what it made and from what (``BuildResult``) for the manifest. A target's execution checks (the
board's scripts under emulation) start as soon as its build is written and run beside parity."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bottlefit.errors import UserError
from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Role
from bottlefit.exporter.equalize import Equalization
from bottlefit.exporter.manifest import write_manifest
from bottlefit.exporter.rounding import Rounding, WeightRounding
from bottlefit.exporter.split import check_split, fold_head, split
from bottlefit.parity.tolerances import OverrideSource, override_records
from bottlefit.parity.verify import Verdict, verify
from bottlefit.pipeline import outdir, source
from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ParityOptions
from bottlefit.pipeline.recipe import Climb, Knobs, Recipe, Rung, climb
from bottlefit.runtimes.cpu import one_blas_thread
from bottlefit.targets import BuildContext, BuildResult, Started, get_target, names

Log = Callable[[str], None]


class Progress:
    """One line per step on stderr, with its wall time: CI logs stay readable, a person sees it move. ``quiet``
    hides the steps, never a warning or a note (lines starting ``warning:`` / ``NOTE:``).

    ``mark`` is told each stage boundary the pipeline passes (the stage that starts now); it prints nothing. A
    profiler subclasses it (bench/bench_export_profile.py records wall, CPU and peak RSS per stage)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet or msg.startswith(("warning:", "NOTE:")):
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def mark(self, stage: str) -> None:
        """A stage boundary: nothing to do here."""


def mark(log: Log, stage: str) -> None:
    """A stage boundary for a profiler listening on ``log`` (``Progress.mark``); nothing for any other log."""
    marker = getattr(log, "mark", None)
    if marker is not None:
        marker(stage)


@contextlib.contextmanager
def stage(log: Log, name: str) -> Iterator[None]:
    """``name`` as a stage nested in the current one (``mark``: ``+name`` at the start, ``/name`` at the end); a
    plain ``mark`` starts a stage of the export's own sequence."""
    mark(log, f"+{name}")
    try:
        yield
    finally:
        mark(log, f"/{name}")


@dataclass
class ExportResult:
    path: Path  # OUT/<target>, or OUT/<target>.failed when parity failed (bottlefit.pipeline.outdir)
    verdict: Verdict
    target: str = ""


def heldout_images(card: Any, options: ParityOptions, log: Log) -> Any:

    with stage(log, "held-out images"):
        return _heldout_images(card, options, log)


def _heldout_images(card: Any, options: ParityOptions, log: Log) -> Any:
    from bottlefit.calibration.dataset import CalibrationSet

    if options.images:
        return CalibrationSet.from_path(options.images, card, count=options.count, seed=0, log=log, role="held-out")
    return CalibrationSet.builtin(card, part="heldout", count=options.count, log=log)


def calibration_images(card: Any, options: CalibrationOptions, log: Log) -> Any:
    with stage(log, "calibration images"):
        return _calibration_images(card, options, log)


def _calibration_images(card: Any, options: CalibrationOptions, log: Log) -> Any:
    from bottlefit.calibration.dataset import CalibrationSet

    if options.source:
        cs = CalibrationSet.from_path(options.source, card, count=options.count, seed=options.seed, log=log)
    else:
        cs = CalibrationSet.builtin(card, part="calibration", count=options.count, seed=options.seed, log=log)
    log(f"calibration set: {len(cs)} images from {cs.source} (sha256 {cs.sha256[:12]}…)")
    return cs


def parity_section(verdict: Verdict, tolerance: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """The manifest's record of the verdict: fidelity checks and every execution, each saying where it ran."""
    report = verdict.to_dict()
    return {"passed": verdict.passed, "images": verdict.images, "checks": report["checks"],
            "execution": report["execution"], "overrides": report["overrides"],
            "tolerance_overrides": list(tolerance) if tolerance else None}


def export(request: ExportRequest, log: Log | None = None) -> ExportResult:
    """Build, verify and record one target's artifacts under ``request.out/<target>``; nothing half-written is
    left behind when any step fails, and an attempt that fails parity goes beside the last passing one
    (``bottlefit.pipeline.outdir``)."""
    return export_targets([request], log)[0]


@dataclass(frozen=True)
class _Plan:
    """One target of an export, checked before any work: its target, options, ``--out`` and tolerances."""

    request: ExportRequest
    target: Any
    options: Any
    out_root: outdir.OutRoot
    overrides: dict[tuple[str | None, str], float]


def _plan(request: ExportRequest) -> _Plan:
    target = get_target(request.target)
    options = request.target_options if request.target_options is not None else target.options_type()
    if not isinstance(options, target.options_type):
        raise UserError(f"target {target.name!r} takes {target.options_type.__name__}, "
                        f"not {type(options).__name__}")
    out_root = outdir.prepare_out_dir(Path(request.out), target.name)
    overrides = request.parity.overrides()
    target.validate(options)
    return _Plan(request, target, options, out_root, overrides)


def export_targets(requests: Sequence[ExportRequest], log: Log | None = None) -> list[ExportResult]:
    """``export`` for several targets in one run (``bottlefit export --target jetson,rpi``): the model is loaded
    and split once, and the calibration and held-out images are decoded once, for all of them; each target's
    ``OUT/<target>`` is then exactly what ``export`` of that target alone writes (the same bytes), built and
    published on its own (``bottlefit.pipeline.outdir``), one target after the other in the order given.

    The requests differ in ``target`` and ``target_options`` only. Every target is checked (its options, its
    output directory) before the model is loaded. A target whose parity fails does not stop the others (its
    result says so); an error (bad input, a converter's failure) stops the run, and the targets published before
    it stay."""
    log = log or Progress()
    if not requests:
        raise ValueError("export_targets: no targets")
    first = requests[0]
    shared = ("model", "out", "calibration", "parity", "replace_failed")
    for r in requests[1:]:
        differ = [f for f in shared if getattr(r, f) != getattr(first, f)]
        if differ:
            raise ValueError(f"export_targets: requests differ in {', '.join(differ)}; only target and "
                             "target_options may")
    seen = [r.target for r in requests]
    if len(set(seen)) != len(seen):
        dup = next(t for t in seen if seen.count(t) > 1)
        raise UserError(f"--target {','.join(seen)}: {dup} is named twice; name each target once")
    plans = [_plan(r) for r in requests]  # every target refuses what it cannot honour before any work
    with one_blas_thread():  # numpy's products here are small: idle BLAS threads only spin (runtimes.cpu)
        return _export_planned(plans, log)


def _export_planned(plans: list[_Plan], log: Log) -> list[ExportResult]:
    first = plans[0].request
    ckpt = first.model.checkpoint
    log(f"loading {f'checkpoint {ckpt}' if ckpt else 'untrained architecture'}")
    mark(log, "load")
    lm = source.load(first.model)
    source.remember(lm)
    card = lm.card
    if card.weights == "untrained":
        log(f"NOTE: {card.arch} has UNTRAINED (random) weights: the figures below check the toolchain, "
            "not accuracy")
    mark(log, "split")
    sm0 = split(lm.model, card)
    # one calibration set and one held-out set for every target and rung: image decoding is paid once
    shared = _Shared(_once(lambda: calibration_images(card, first.calibration, log)),
                     _once(lambda: heldout_images(card, first.parity, log)))
    results = []
    for plan in plans:
        if len(plans) > 1:
            log(f"target {plan.target.name} ({len(results) + 1} of {len(plans)})")
        mark(log, f"target {plan.target.name}")
        results.append(_export_target(plan, lm, sm0, shared, log))
        gc.collect()  # the target's build (its int8 copies of the head, converter state) before the next one
    return results


def _export_target(plan: _Plan, lm: Any, sm0: Any, shared: _Shared, log: Log) -> ExportResult:
    """One target's attempt: its recipe ladder from the loaded split ``sm0`` (left as it is), the manifest, and
    the swap into ``OUT/<target>``."""
    request, target = plan.request, plan.target
    requested, rungs = request.calibration.plan()
    attempt = outdir.open_attempt(plan.out_root, target.name, log, sweep=names())
    tmp = attempt.path
    running: list[_Rung] = []  # the rung whose executions are under way (at most one)
    try:
        def build_rung(rung: Rung) -> tuple[_Rung, Verdict, list[Any]]:
            _stop(running)  # a rung that moved on: its executions are not wanted
            _empty(tmp)  # a rung that moved on leaves nothing behind
            b = _build_rung(sm0, rung, plan, tmp, shared, log)
            running.append(b)
            return b, b.verdict, b.result.artifacts

        def finish(b: _Rung, verdict: Verdict) -> None:
            with stage(log, "emulation"):
                verdict.execution += b.executions.collect()
            running.remove(b)

        climbed = climb(requested, rungs, build_rung, finish, log)
        mark(log, "manifest")
        _write_manifest(tmp, plan, lm, climbed, requested)
        final = attempt.publish(climbed.verdict.passed, replace_failed=request.replace_failed)
    finally:
        _stop(running)  # an error or an interrupt: the guests go with the attempt
        attempt.close()  # an unfinished attempt (an error, Ctrl-C, SIGTERM) is removed, with the OUT it made
    mark(log, "done")
    log(f"wrote {final}/ ({', '.join(a.file for a in climbed.build.result.artifacts)})")
    return ExportResult(final, climbed.verdict, target.name)


def _stop(running: list[_Rung]) -> None:
    while running:
        running.pop().executions.cancel()


def _write_manifest(tmp: Path, plan: _Plan, lm: Any, climbed: Climb[_Rung], requested: Recipe) -> None:
    """The verdict's reports and manifest.json of the rung kept, from its build's records."""
    request, b, verdict = plan.request, climbed.build, climbed.verdict
    result, card = b.result, lm.card
    verdict.overrides = override_records(request.parity.tolerance, OverrideSource.EXPORT)
    verdict.write(tmp)
    knobs = asdict(climbed.rung.knobs)
    sections: dict[str, Any] = {
        "split_check": {"max_abs_error": b.split.error},
        "parity": parity_section(verdict, request.parity.tolerance),
        "options": {"target": _plain(asdict(plan.options)),
                    "calibration": _plain(asdict(request.calibration) | knobs | {"recipe": str(requested)}),
                    "model": _plain(asdict(request.model) | {"checkpoint": None})},
        "recipe": climbed.record(),
    }
    if result.calibration is not None:
        sections["calibration"] = result.calibration.describe()
    if b.split.equalization is not None:
        sections["equalization"] = b.split.equalization.to_dict()
    if b.split.folds:
        sections["head_folds"] = b.split.folds
    if result.rounding is not None:
        sections["weight_rounding"] = result.rounding.to_dict()
    sections["wire"] = {a.file: wire.contract(card.bottleneck, a.outputs[0]) for a in result.artifacts
                        if a.role == Role.HEAD and a.outputs}
    write_manifest(tmp, plan.target.name, card, source.describe(lm), result.artifacts, **sections)


@dataclass
class _Rung:
    """One rung's build: what the target made (in the temporary directory), its executions under way, and the
    fidelity verdict."""

    split: _RungSplit
    result: BuildResult
    executions: Started
    verdict: Verdict


def _build_rung(sm: Any, rung: Rung, plan: _Plan, tmp: Path, shared: _Shared, log: Log) -> _Rung:
    """Build ``plan``'s target into ``tmp`` with ``rung``'s recipe from the loaded split ``sm`` (left as it is:
    every rung starts from the model itself), start its executions and judge the artifacts' fidelity meanwhile:
    split -> calibrate -> round -> build -> start executions -> verify."""
    request, target, knobs = plan.request, plan.target, rung.knobs
    mark(log, "rung setup")
    rs = _split_step(sm, knobs.equalize, request.calibration.fold_pool_bn, shared, log)
    held = shared.held_out()
    needs = target.needs(plan.options)
    calibration = shared.calibration() if needs.calibration else None
    int8_head, rounding = None, None
    if needs.int8_head:
        mark(log, "round")
        int8_head, rounding = _round_step(rs.split, calibration, knobs, shared, log)
    ctx = BuildContext(rs.split, tmp, plan.options, held, knobs.observer, calibration, int8_head, rounding, log,
                       tolerance_overrides=plan.overrides)
    mark(log, "build")
    result = target.build(ctx)
    executions = target.start_execution(tmp, result.artifacts, request.parity.emulate, log)
    try:
        log("parity: every artifact against PyTorch fp32 (fidelity under reference semantics; execution where it "
            "can run)")
        mark(log, "parity")
        # the fp32 model's logits on the held-out images: the same for every target of this rung, computed once
        judged = replace(rs.split, model=_Remembered(rs.split.model, shared.references))
        # staged: the ladder (pipeline.recipe.climb) completes it, unless its int8 gates already lost the rung
        verdict = verify(judged, result.artifacts, tmp, target.name, held.images, held.describe(), plan.overrides,
                         staged=True)
    except BaseException:
        executions.cancel()
        raise
    return _Rung(rs, result, executions, verdict)


def _split_step(sm: Any, equalize: bool, fold_pool_bn: bool, shared: _Shared, log: Log) -> _RungSplit:
    """The split a rung builds from, made once per recipe for every target; its lines said again for each."""
    key = (equalize, fold_pool_bn)
    if key not in shared.splits:
        shared.splits[key] = _rung_split(sm, equalize, fold_pool_bn, shared.calibration, log)
    rs = shared.splits[key]
    for line in rs.lines:
        log(line)
    return rs


def _round_step(sm: Any, calibration: Any, knobs: Knobs, shared: _Shared, log: Log) -> tuple[Any, Rounding | None]:
    """The head every int8 artifact quantizes and its rounding record: ``sm.head`` itself (round-to-nearest, no
    bias correction: each converter rounds), else a copy whose conv weights are already on the int8 grid, rounded
    on the calibration images (``bottlefit.exporter.rounding``) so every converter writes the same integers. Made
    once for every target of the export building from the same split with the same rounding."""
    if knobs.weight_rounding == WeightRounding.NEAREST and not knobs.bias_correction:
        return sm.head, None
    key = (id(sm.head), knobs.weight_rounding, knobs.bias_correction)
    if key not in shared.rounded:
        from bottlefit.exporter.rounding import round_head

        images = calibration.images
        head, rec = round_head(sm.head, images, knobs.weight_rounding, bias_correction=knobs.bias_correction)
        lines = [f"weight rounding {knobs.weight_rounding}{' + bias correction' if knobs.bias_correction else ''}: "
                 f"{sm.head_module_path(layer)}: output SQNR {row['sqnr_db_nearest']:.1f} dB nearest -> "
                 f"{row['sqnr_db']:.1f} dB ({len(images)} images)" for layer, row in rec.layers.items()]
        shared.rounded[key] = _Rounded(sm.head, head, rec, lines)
    rounded = shared.rounded[key]
    for line in rounded.lines:
        log(line)
    return rounded.head, rounded.rounding


@dataclass(frozen=True)
class _Rounded:
    """The round step's result for one split head and rounding, shared by every target of the export."""

    source: Any  # the split head it was rounded from, kept so that its id (the key) stays its own
    head: Any
    rounding: Rounding
    lines: list[str]


@dataclass
class _Shared:
    """What every target of one export shares: the images (made on first use), each rung's split, parity's fp32
    reference outputs, and the weight-rounded int8 heads (the round step's)."""

    calibration: Callable[[], Any]
    held_out: Callable[[], Any]
    splits: dict[tuple[bool, bool], _RungSplit] = field(default_factory=dict)
    references: dict[Any, Any] = field(default_factory=dict)
    rounded: dict[tuple[int, WeightRounding, bool], _Rounded] = field(default_factory=dict)


@dataclass(frozen=True)
class _RungSplit:
    """The split a rung builds from (equalized and folded as its recipe says), proved against the model."""

    split: Any
    error: float
    equalization: Equalization | None
    folds: list[str]
    lines: list[str]  # what making it logged after the rung's first line


def _rung_split(sm: Any, equalize: bool, fold_pool_bn: bool, calibration: Callable[[], Any],
                log: Log) -> _RungSplit:
    lines: list[str] = []
    eq: Equalization | None = None
    if equalize:
        from bottlefit.exporter.equalize import equalize_split

        sm, eq = equalize_split(sm, calibration().images)
        lines.append(f"equalized the bottleneck's {len(eq.scales)} channels ({eq.encoder_layer} x s, "
                     f"{eq.decoder_layer} / s)")
    folds: list[str] = []
    if fold_pool_bn:
        sm, folds = fold_head(sm)
        lines += folds
    # against the ORIGINAL model: proves an equalization's fold and the head's folds too
    mark(log, "split check")
    err = check_split(sm, torch.randn(2, *sm.card.input_shape, generator=torch.Generator().manual_seed(0)))
    lines.append(f"split at {sm.card.bottleneck.module}: bottleneck {sm.card.bottleneck.shape}; "
                 f"max |tail(head(x)) - model(x)| = {err:.3g}")
    return _RungSplit(sm, err, eq, folds, lines)


class _Remembered(torch.nn.Module):
    """``model``, whose outputs on an input it saw before (same bytes) are remembered in ``memo`` (shared by every
    target of an export): parity's fp32 reference logits are computed once, not once per target."""

    def __init__(self, model: torch.nn.Module, memo: dict[Any, Any]) -> None:
        super().__init__()
        self.inner = model
        self.memo = memo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = x.detach().contiguous()
        key = (id(self.inner), tuple(data.shape), str(data.dtype),
               hashlib.sha256(data.numpy().tobytes()).hexdigest())
        if key not in self.memo:
            self.memo[key] = (self.inner, self.inner(x))  # the model kept with it: its id stays its own
        return self.memo[key][1].clone()


def _once(make: Callable[[], Any]) -> Callable[[], Any]:
    """``make()`` on the first call, the same object after."""
    made: list[Any] = []

    def get() -> Any:
        if not made:
            made.append(make())
        return made[0]

    return get


def _empty(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe option values for the manifest (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(d.items())}
