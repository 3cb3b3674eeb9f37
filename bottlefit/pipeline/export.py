"""``bottlefit export``: load -> split -> build the target's artifacts -> verify -> manifest, written atomically."""

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
from bottlefit.exporter.manifest import write_manifest
from bottlefit.exporter.split import check_split, fold_head, split
from bottlefit.parity.tolerances import OverrideSource, override_records
from bottlefit.parity.verify import Verdict, verify
from bottlefit.pipeline import outdir, source
from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ParityOptions
from bottlefit.pipeline.recipe import Rung, climb
from bottlefit.runtimes.cpu import one_blas_thread
from bottlefit.targets import BuildContext, get_target, names

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
    request, target, options, overrides = plan.request, plan.target, plan.options, plan.overrides
    card = lm.card
    requested, rungs = request.calibration.plan()
    attempt = outdir.open_attempt(plan.out_root, target.name, log, sweep=names())
    tmp = attempt.path
    try:
        def build_rung(rung: Rung) -> tuple[_Rung, Verdict, list[Any]]:
            _empty(tmp)  # a rung that moved on leaves nothing behind
            b = _build_rung(sm0, rung, target, options, tmp, request, shared, overrides, log)
            return b, b.verdict, b.artifacts

        def finish(b: _Rung, verdict: Verdict) -> None:
            with stage(log, "emulation"):
                verdict.execution += target.execute(tmp, b.artifacts, request.parity.emulate, log)

        climbed = climb(requested, rungs, build_rung, finish, log)
        mark(log, "manifest")
        b, verdict, artifacts, ctx = climbed.build, climbed.verdict, climbed.build.artifacts, climbed.build.ctx
        verdict.overrides = override_records(request.parity.tolerance, OverrideSource.EXPORT)
        verdict.write(tmp)
        knobs = asdict(climbed.rung.knobs)
        sections: dict[str, Any] = {
            "split_check": {"max_abs_error": b.split_error},
            "parity": parity_section(verdict, request.parity.tolerance),
            "options": {"target": _plain(asdict(options)),
                        "calibration": _plain(asdict(request.calibration) | knobs | {"recipe": str(requested)}),
                        "model": _plain(asdict(request.model) | {"checkpoint": None})},
            "recipe": climbed.record(),
        }
        if ctx.calibration_used is not None:
            sections["calibration"] = ctx.calibration_used.describe()
        if b.equalization is not None:
            sections["equalization"] = b.equalization
        if b.folds:
            sections["head_folds"] = b.folds
        if ctx.rounding is not None:
            sections["weight_rounding"] = ctx.rounding
        sections["wire"] = {a.file: wire.contract(card.bottleneck, a.outputs[0]) for a in artifacts
                            if a.role == "head" and a.outputs}
        write_manifest(tmp, target.name, card.to_dict(), source.describe(lm), artifacts, **sections)
        final = attempt.publish(verdict.passed, replace_failed=request.replace_failed)
    finally:
        attempt.close()  # an unfinished attempt (an error, Ctrl-C, SIGTERM) is removed, with the OUT it made
    mark(log, "done")
    log(f"wrote {final}/ ({', '.join(a.file for a in artifacts)})")
    return ExportResult(final, verdict, target.name)


@dataclass
class _Rung:
    """One rung's build: the artifacts in the temporary directory and their fidelity verdict."""

    ctx: BuildContext
    artifacts: list[Any]
    verdict: Verdict
    split_error: float
    equalization: dict[str, Any] | None
    folds: list[str]


def _build_rung(sm: Any, rung: Rung, target: Any, options: Any, tmp: Path, request: ExportRequest,
                shared: _Shared, overrides: dict[tuple[str | None, str], float], log: Log) -> _Rung:
    """Build ``target``'s artifacts into ``tmp`` with ``rung``'s recipe from the loaded split ``sm`` (left as it
    is: every rung starts from the model itself) and judge their fidelity."""
    knobs = rung.knobs
    mark(log, "rung setup")
    key = (knobs.equalize, request.calibration.fold_pool_bn)
    if key not in shared.splits:  # the same for every target: made once, its lines said again for each
        shared.splits[key] = _rung_split(sm, knobs.equalize, request.calibration.fold_pool_bn, shared.calibration,
                                         log)
    rs = shared.splits[key]
    for line in rs.lines:
        log(line)
    sm, err = rs.split, rs.error
    ctx = BuildContext(sm, tmp, options, shared.calibration, shared.held_out, log, observer=knobs.observer,
                       tolerance_overrides=overrides, weight_rounding=knobs.weight_rounding,
                       bias_correction=knobs.bias_correction, shared=shared.contexts)
    mark(log, "build")
    artifacts = target.build(ctx)
    log("parity: every artifact against PyTorch fp32 (fidelity under reference semantics; execution where it "
        "can run)")
    held = ctx.heldout
    mark(log, "parity")
    # the fp32 model's logits on the held-out images: the same for every target of this rung, computed once
    sm = replace(sm, model=_Remembered(sm.model, shared.references))
    # staged: the ladder (pipeline.recipe.climb) completes it, unless its int8 gates already lost the rung
    verdict = verify(sm, artifacts, tmp, target.name, held.images, held.describe(), overrides, staged=True)
    return _Rung(ctx, artifacts, verdict, err, rs.equalization, rs.folds)


@dataclass
class _Shared:
    """What every target of one export shares: the images (made on first use), each rung's split, parity's fp32
    reference outputs, and what the targets' build contexts share (``BuildContext.shared``)."""

    calibration: Callable[[], Any]
    held_out: Callable[[], Any]
    splits: dict[tuple[bool, bool], _RungSplit] = field(default_factory=dict)
    references: dict[Any, Any] = field(default_factory=dict)
    contexts: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _RungSplit:
    """The split a rung builds from (equalized and folded as its recipe says), proved against the model."""

    split: Any
    error: float
    equalization: dict[str, Any] | None
    folds: list[str]
    lines: list[str]  # what making it logged after the rung's first line


def _rung_split(sm: Any, equalize: bool, fold_pool_bn: bool, calibration: Callable[[], Any],
                log: Log) -> _RungSplit:
    lines: list[str] = []
    equalization: dict[str, Any] | None = None
    if equalize:
        from bottlefit.exporter.equalize import equalize_split

        sm, eq = equalize_split(sm, calibration().images)
        equalization = eq.to_dict()
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
    return _RungSplit(sm, err, equalization, folds, lines)


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
