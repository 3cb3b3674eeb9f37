"""Every artifact against PyTorch fp32 on held-out images: the verdict and its reports.

Two kinds of check, never mixed (docs/reference-semantics.md):
- **fidelity**: the artifact under its reference semantics (Q/DQ as the ONNX spec defines it, TFLite's reference
  kernels; fp32 artifacts in their runtime), the same figures on any host. The tolerances gate here.
- **execution**: the artifact in the runtime the target uses, on some CPU, compared with its own reference
  semantics. On the target's instruction set (the board, or the board's ISA under emulation) it gates; on the
  export host's own kernels it is information, unless the target runs on this ISA.
  One more execution gates on the host: where the fidelity of a .tflite head was computed by the vectorised
  evaluator of TFLite's reference kernels (bottlefit.runtimes.tflite_reference), TFLite's reference interpreter
  runs the first ``CROSS_CHECK_IMAGES`` images too (runtime "litert BUILTIN_REF", where "host"), and anything but
  bit-identical outputs fails the verdict. Where the evaluator does not cover the graph, the interpreter computed
  the fidelity itself: that record is "not run" and says why.

report.json schema (format_version 2; version 1 had no "kind" and no "execution"):
  {"format": "bottlefit-report", "format_version": 2, "passed": bool, "target": str,
   "images": {"source", "count", "sha256"},
   "checks": [{"artifact", "metric", "value", "tolerance", "op", "passed", "kind": "fidelity", "semantics",
               "detail"}],  ("detail": only on logits.top1_agreement checks, what parity.top1's rule counted;
               a key added within version 2, which readers of version 2 may ignore)
   "execution": [{"artifact", "runtime", "where": "host"|"emulated"|"board", "isa", "gated", "status":
                  "agrees"|"deviates"|"failed"|"not run", "metrics": {...}, "note"}],
   "skipped": [{"artifact", "reason"}],
   "overrides": [{"artifact", "metric", "value", "source": "export"|"manifest"|"verify"}]  (tolerance overrides in
                force instead of the built-in gates, and who set them; [] = the built-in gates),
   "diagnosis": {artifact: {"first_diverging_layer": str | null, "summary": str, "layers": [...]}},
   "budget": {artifact: [{"grids", "module", "sqnr_db", "sqnr_db_mean", "cosine"}]}}  (only when asked for)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bottlefit.exporter.artifact import Artifact, Runtime
from bottlefit.exporter.manifest import write_json
from bottlefit.exporter.split import SplitModel
from bottlefit.parity import metrics, top1
from bottlefit.parity.tolerances import Override, OverrideSource, tolerances_for
from bottlefit.runtimes import RuntimeUnavailable
from bottlefit.runtimes.cpu import describe_host, has_vnni, isa_label
from bottlefit.runtimes.execution import Execution, Status
from bottlefit.runtimes.head import open_artifact, output_lsb, reference_semantics, run_head, run_runner, run_tail

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FORMAT_VERSION = 2
# An execution agrees with the reference when it stays within this many output steps everywhere and keeps
# this cosine: int8 kernels legitimately round differently by 1 LSB (fixed-point vs float requantization).
AGREE_MAX_LSB = 2.0
AGREE_COSINE = 0.999
# images of each export on which TFLite's reference interpreter checks the vectorised reference evaluator
CROSS_CHECK_IMAGES = 2
CROSS_CHECK_RUNTIME = "litert BUILTIN_REF"


class CheckKind(StrEnum):
    """The two kinds of check (the module's docstring): fidelity ``Check``s gate; executions are ``Execution``s."""

    FIDELITY = "fidelity"
    EXECUTION = "execution"


@dataclass
class Check:
    artifact: str
    metric: str
    value: float
    tolerance: float | None
    op: str | None
    passed: bool
    kind: CheckKind = CheckKind.FIDELITY
    semantics: str = ""
    detail: top1.Top1Agreement | None = None  # what the top-1 rule counted (logits.top1_agreement only)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["detail"]
        if self.detail is not None:  # checks without one keep the keys they always had
            d["detail"] = self.detail.to_dict()
        return d


def agreement(reference: np.ndarray, got: np.ndarray, lsb: float | None) -> dict[str, Any]:
    """How an execution's outputs compare with the reference outputs of the same artifact."""
    diff = np.abs(reference.astype(np.float64) - got.astype(np.float64))
    sq = metrics.sqnr_db(reference, got)
    out: dict[str, Any] = {
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "cosine_vs_reference": metrics.cosine(reference, got),
        "sqnr_db_vs_reference": None if math.isinf(sq) and sq > 0 else sq,
        "mismatch_fraction": float(np.mean(diff > 0)) if diff.size else 0.0,
    }
    if lsb:
        out["max_abs_lsb"] = float(diff.max() / lsb) if diff.size else 0.0
    return out


def agrees(m: dict[str, Any]) -> bool:
    if "max_abs_lsb" in m:
        return m["max_abs_lsb"] <= AGREE_MAX_LSB + 1e-6 and m["cosine_vs_reference"] >= AGREE_COSINE
    return m["cosine_vs_reference"] >= AGREE_COSINE


def _host_note(art: Artifact, status: str) -> str:
    host = describe_host()
    if status == Status.AGREES:
        return f"this host's {art.runtime} int8 kernels ({host['int8_dot']}) agree with the reference"
    if art.runtime == Runtime.ONNXRUNTIME and host["machine"] in ("x86_64", "AMD64") and not has_vnni():
        return ("ONNX Runtime fuses Q/DQ into QLinearConv; its x86 u8s8 kernels on a CPU without AVX-512 VNNI / "
                "AVX-VNNI sum pairs of products in int16 (VPMADDUBSW), which saturate. This is the build host, "
                "not the artifact: TensorRT and ARM kernels do not saturate. For an x86 deployment without VNNI, "
                "quantize with reduce_range (7-bit weights) or U8U8 activations and weights")
    return (f"this host's {art.runtime} int8 kernels ({host['int8_dot']}) round differently from the reference; "
            "judge the device by the target's own kernels (board or emulation)")


def host_execution(art: Artifact, target_dir: Path, images: np.ndarray, reference: np.ndarray) -> Execution:
    """The artifact on this host's own default kernels, against its reference outputs (information). A runtime
    that refuses to run it here (a delegate that will not prepare a damaged file) is recorded as "failed", never
    raised: this run decides nothing."""
    try:
        got = run_head(art, target_dir, images)
    except Exception as e:  # noqa: BLE001 — any runtime's refusal; the fidelity checks already judged the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return Execution(art.file, art.runtime, "host", isa_label(), False, "failed", {},
                         f"this host's {art.runtime} could not run it: {type(e).__name__}: {first}")
    m = agreement(reference, got, output_lsb(art))
    status = "agrees" if agrees(m) else "deviates"
    return Execution(art.file, art.runtime, "host", isa_label(), False, status, m, _host_note(art, status))


def reference_cross_check(art: Artifact, target_dir: Path, images: np.ndarray, got: np.ndarray,
                          runner: Any) -> Execution:
    """TFLite's reference interpreter against the reference outputs ``got`` that ``runner`` computed for the
    fidelity checks, on the first CROSS_CHECK_IMAGES images: gated, and only bit-identical outputs agree (both
    claim the same integer arithmetic). Where ``runner`` is the interpreter itself (the evaluator fell back), there
    is nothing to check: "not run", with the reason."""
    from bottlefit.runtimes.litert import LiteRTRunner

    if isinstance(runner, LiteRTRunner):
        why = runner.fallback or "the reference interpreter was asked for"
        return Execution(art.file, CROSS_CHECK_RUNTIME, "host", isa_label(), False, "not run", {},
                         f"fidelity was computed by TFLite's reference interpreter itself ({why})")
    n = min(CROSS_CHECK_IMAGES, len(images))
    want = run_runner(LiteRTRunner(target_dir / art.file, reference=True), art, images[:n])
    m = agreement(want, got[:n], output_lsb(art))
    m["images"] = n
    same = want.shape == got[:n].shape and bool(np.array_equal(want, got[:n]))
    status = "agrees" if same else "deviates"
    note = (f"fidelity on all {len(images)} images was computed by {runner.evaluator}; TFLite's reference "
            f"interpreter on {n} of them " + ("gives bit-identical outputs" if same else
                                             "DIFFERS: the evaluator is wrong for this graph, so the fidelity "
                                             "figures are not TFLite's; report this as a bug"))
    return Execution(art.file, CROSS_CHECK_RUNTIME, "host", isa_label(), True, status, m, note)


@dataclass
class Verdict:
    target: str
    images: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    execution: list[Execution] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    diagnosis: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, list[Any]] = field(default_factory=dict)  # artifact -> parity.budget.BudgetRow list
    overrides: list[Override] = field(default_factory=list)  # tolerance overrides the checks used
    # what a staged verify (``verify(staged=True)``) left to do, and its description; None once complete
    _rest: Callable[[], None] | None = field(default=None, init=False, repr=False, compare=False)
    pending: str | None = field(default=None, init=False, compare=False)

    def defer(self, rest: Callable[[], None], what: str) -> None:
        """``rest`` completes this verdict in place (``complete``); ``what`` says what it will add."""
        self._rest, self.pending = rest, what

    def complete(self) -> Verdict:
        """This verdict with the checks a staged verify left pending made (nothing to do when there are none)."""
        rest, self._rest, self.pending = self._rest, None, None
        if rest is not None:
            rest()
        return self

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(e.passed for e in self.execution)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:  # JSON has no inf/nan
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return {
            "format": "bottlefit-report",
            "format_version": FORMAT_VERSION,
            "passed": self.passed,
            "target": self.target,
            "images": self.images,
            "checks": [{k: clean(v) for k, v in c.to_dict().items()} for c in self.checks],
            "execution": [clean(e.to_dict()) for e in self.execution],
            "skipped": self.skipped,
            "overrides": [o.to_dict() for o in self.overrides],
            "diagnosis": self.diagnosis,
            **({"budget": {a: [r.to_dict() for r in rows] for a, rows in self.budget.items()}}
               if self.budget else {}),
        }

    def markdown(self) -> str:
        lines = [f"# Parity report: {self.target}", "",
                 f"Verdict: **{'PASS' if self.passed else 'FAIL'}** on {self.images.get('count')} held-out images "
                 f"({self.images.get('source')}).", "",
                 *([f"{self.overrides_note()}.", ""] if self.overrides else []),
                 "## Fidelity (reference semantics, the same on any host; gated)", "",
                 "| artifact | semantics | metric | value | tolerance | result |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            tol = "—" if c.tolerance is None else f"{c.op} {c.tolerance:g}"
            res = "—" if c.tolerance is None else ("pass" if c.passed else "**FAIL**")
            lines.append(f"| {c.artifact} | {c.semantics} | {c.metric} | {c.value:.6g} | {tol} | {res} |")
        top1_lines = [f"- {c.artifact}: {c.detail.line()}" for c in self.checks if c.detail is not None]
        if top1_lines:
            lines += ["", "Top-1 agreement (a flip within the near-tie margin is not counted; fails when the upper "
                      "bound on the agreement falls below the tolerance):", "", *top1_lines]
        if self.execution:
            lines += ["", "## Execution (the target runtime's kernels on a CPU, vs the reference semantics)", "",
                      "| artifact | runtime | where | ISA | status | gated | figures | note |",
                      "|---|---|---|---|---|---|---|---|"]
            for e in self.execution:
                figs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in e.metrics.items())
                lines.append(f"| {e.artifact} | {e.runtime} | {e.where} | {e.isa} | {e.status} | "
                             f"{'yes' if e.gated else 'no'} | {figs} | {e.note} |")
        for s in self.skipped:
            lines.append(f"\nSkipped {s['artifact']}: {s['reason']}")
        for art, d in self.diagnosis.items():
            lines.append(f"\n{art}: {d['summary']}")
        if self.budget:
            from bottlefit.parity.budget import render

            lines += ["", "## Error budget (reference semantics; one activation grid kept at a time, int8 weights in "
                      "every row)"]
            for art, rows in self.budget.items():
                lines += ["", f"{art}:", "", *render(rows)]
        return "\n".join(lines) + "\n"

    def write(self, target_dir: Path) -> None:
        write_json(target_dir / REPORT_JSON, self.to_dict())
        (target_dir / REPORT_MD).write_text(self.markdown())

    def overrides_note(self) -> str:
        """One line naming every override in force and who set it."""
        where = {OverrideSource.EXPORT: "set by `export --tolerance`",
                 OverrideSource.MANIFEST: "read from manifest.json, set at export; `verify --strict` ignores them",
                 OverrideSource.VERIFY: "set by `verify --tolerance`"}
        parts = [f"{', '.join(o.text() for o in self.overrides if o.source == src)} ({text})"
                 for src, text in where.items() if any(o.source == src for o in self.overrides)]
        return "tolerance overrides in force instead of the built-in gates: " + "; ".join(parts)

    def summary(self) -> str:
        rows = [f"  note: {self.overrides_note()}"] if self.overrides else []
        for c in self.checks:
            if c.tolerance is None and c.metric not in ("bottleneck.max_abs_error", "logits.max_abs_error"):
                continue
            mark = "ok " if c.passed else "FAIL"
            tol = "" if c.tolerance is None else f" ({c.op} {c.tolerance:g})"
            why = f": {c.detail.line()}" if c.detail is not None and c.detail.flips else ""
            rows.append(f"  {mark} {c.artifact:22s} {c.metric:28s} {c.value:.4g}{tol}{why}")
        for e in self.execution:
            mark = ("ok " if e.status == Status.AGREES else "FAIL") if e.gated else "info"
            rows.append(f"  {mark} {e.line()}")
        for art, d in self.diagnosis.items():
            rows.append(f"  {art}: {d['summary']}")
        for art, budget in self.budget.items():
            figs = ", ".join(f"{b.module or b.grids} {b.sqnr_db:.1f}" for b in budget)
            rows.append(f"  budget {art} (SQNR dB with only this grid): {figs}")
        return "\n".join(rows)


def verify(split: SplitModel, artifacts: list[Artifact], target_dir: Path, target: str, images: np.ndarray,
           images_info: dict[str, Any], overrides: dict | None = None, budget: bool = False,
           staged: bool = False) -> Verdict:
    """Fidelity of every head and tail artifact (gated), and the host-kernel execution of every int8 head
    (information: no target here runs on the export host's ISA). ``budget``: also the error budget of every
    int8 Q/DQ ONNX head (bottlefit.parity.budget; information); a failing one gets it anyway.

    ``staged``: return once what can decide a recipe ladder is known (``Verdict.pending`` then names the rest):
    every fp32/fp16 artifact's checks, every int8 head's bottleneck checks under its reference semantics, and the
    gated reference cross-checks. ``Verdict.complete()`` adds the int8 artifacts' logits checks (a PyTorch tail
    forward each), their host executions, diagnoses and budgets, giving exactly the verdict an unstaged call
    returns. A ladder drops a staged verdict unfinished when its int8 gates have already failed."""
    overrides = overrides or {}
    verdict = Verdict(target, images_info)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    with torch.no_grad():
        ref_z = split.head(x.clone())
        ref_logits = split.model(x.clone()).numpy()
    tails = _TailMemo(split)
    slots: list[_Slot] = []
    later: list[tuple[_Slot, _Judged]] = []
    for art in artifacts:
        if not art.parity or art.role not in ("head", "tail"):
            continue
        q = art.quantization or {}
        # TFLite's int8 activations are affine (asymmetric) like ONNX Runtime's; only TensorRT's Q/DQ is symmetric
        tols = tolerances_for(art.file, art.precision, overrides, trained=split.card.weights != "untrained",
                              scheme="symmetric" if q.get("symmetric") else "asymmetric")
        if split.card.weights == "untrained" and not any(m == "logits.top1_agreement" for _, m in overrides):
            # Random weights leave near-ties between classes (margins ~1e-2 on logits ~1e2): any quantization
            # noise flips top-1, so agreement says nothing about the artifact. Reported, not gated.
            tols.pop("logits.top1_agreement", None)
        int8 = art.precision == "int8"
        # int8 results depend on the kernels: fidelity is judged under the artifact's reference semantics.
        # fp32 results differ across CPUs only by summation order, far inside the fp32 tolerances.
        semantics = reference_semantics(art.runtime) if int8 else f"{art.runtime} fp32 kernels"
        slot = _Slot(art.file)
        try:
            if art.role == "head":
                runner = open_artifact(art, target_dir, reference=int8)
                got_z = run_runner(runner, art, images)
                if int8 and art.runtime == "litert":
                    semantics += f"; computed by {runner.evaluator}"
                values = {f"bottleneck.{m}": fn(ref_z.numpy(), got_z) for m, fn in metrics.BOTTLENECK_METRICS.items()}
                if int8 and art.runtime == "litert":
                    slot.execution.append(reference_cross_check(art, target_dir, images, got_z, runner))
                del runner  # its session or interpreter: one artifact's at a time
                judged = _Judged(art, tols, semantics, int8, values, got_z=got_z)
            else:
                judged = _Judged(art, tols, semantics, int8, {},
                                 logits=run_tail(art, target_dir, split.transmit(ref_z).numpy()))
        except RuntimeUnavailable as e:
            verdict.skipped.append({"artifact": art.file, "reason": str(e)})
            continue
        slots.append(slot)
        slot.checks += _checks(judged, judged.values)
        if int8:  # its logits, host execution, diagnosis and budget cannot save a rung its int8 gates lost
            later.append((slot, judged))
        else:
            _finish(slot, judged, split, target_dir, images, ref_z, ref_logits, tails, budget)
    _assemble(verdict, slots)

    def rest() -> None:
        for slot, judged in later:
            _finish(slot, judged, split, target_dir, images, ref_z, ref_logits, tails, budget)
        _assemble(verdict, slots)

    if later:
        verdict.defer(rest, f"the logits checks, host executions and any diagnosis of "
                            f"{', '.join(j.art.file for _, j in later)}")
    return verdict if staged else verdict.complete()


@dataclass
class _Slot:
    """One artifact's part of the verdict, in the order an unstaged run makes it."""

    artifact: str
    checks: list[Check] = field(default_factory=list)
    execution: list[Execution] = field(default_factory=list)
    diagnosis: dict[str, Any] | None = None
    budget: list[Any] | None = None


@dataclass
class _Judged:
    """An artifact's outputs so far: its head's bottleneck (``got_z``) or its tail's ``logits``."""

    art: Artifact
    tols: dict
    semantics: str
    int8: bool
    values: dict[str, float]
    got_z: np.ndarray | None = None
    logits: np.ndarray | None = None


class _TailMemo:
    """The fp32 tail's logits for a bottleneck it was given before (the same bytes): heads whose outputs agree
    bit for bit (int8 heads of different runtimes emitting the same integers on the same grid) share one tail
    forward. Keyed by the exact bytes, so the figures are those of a forward of their own."""

    def __init__(self, split: SplitModel) -> None:
        self.split = split
        self.memo: dict[tuple[tuple[int, ...], str, str], np.ndarray] = {}

    def __call__(self, got_z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = self.split.transmit(torch.from_numpy(got_z))
            data = z.contiguous()
            key = (tuple(data.shape), str(data.dtype), hashlib.sha256(data.numpy().tobytes()).hexdigest())
            if key not in self.memo:
                self.memo[key] = self.split.tail(z).numpy()
        return self.memo[key].copy()


def _checks(j: _Judged, values: dict[str, float]) -> list[Check]:
    out = []
    for metric, value in values.items():
        tol = j.tols.get(metric)
        out.append(Check(j.art.file, metric, float(value), tol.value if tol else None, tol.op if tol else None,
                         tol.ok(value) if tol else True, CheckKind.FIDELITY, j.semantics))
    return out


def _finish(slot: _Slot, j: _Judged, split: SplitModel, target_dir: Path, images: np.ndarray, ref_z: torch.Tensor,
            ref_logits: np.ndarray, tails: _TailMemo, budget: bool) -> None:
    """``slot``'s logits checks (the tail forward of a head's bottleneck), its host execution (int8 heads), and
    a failing head's diagnosis and budget."""
    art, tols = j.art, j.tols
    got_logits = j.logits if j.got_z is None else tails(j.got_z)
    values = {"logits.max_abs_error": metrics.max_abs_error(ref_logits, got_logits)}
    slot.checks += _checks(j, values)
    # top-1 agreement is judged by its rule (parity.top1: near-ties excused, a binomial bound on the rest)
    tol = tols.get("logits.top1_agreement")
    t1 = top1.judge(ref_logits, got_logits, tol.value if tol else None, scale=top1.gate_scale(j.values | values, tols))
    slot.checks.append(Check(art.file, "logits.top1_agreement", t1.agreement, tol.value if tol else None,
                             tol.op if tol else None, t1.passed, CheckKind.FIDELITY, j.semantics, t1))
    if j.int8 and art.role == "head" and j.got_z is not None:
        slot.execution.append(host_execution(art, target_dir, images, j.got_z))
    failed = any(not c.passed for c in slot.checks) and art.role == "head"
    if failed:
        slot.diagnosis = diagnose(split, art, target_dir, images, tols)
    # a failing Q/DQ head always gets its budget: which grid to work on is what its user needs next
    if (budget or failed) and art.role == "head" and j.int8 and art.runtime == "onnxruntime" \
            and art.inputs[0].dtype == "float32":
        slot.budget = error_budget_of(split, art, target_dir, images, ref_z.numpy())


def _assemble(verdict: Verdict, slots: list[_Slot]) -> None:
    verdict.checks = [c for s in slots for c in s.checks]
    verdict.execution = [e for s in slots for e in s.execution]
    verdict.diagnosis = {s.artifact: s.diagnosis for s in slots if s.diagnosis is not None}
    verdict.budget = {s.artifact: s.budget for s in slots if s.budget is not None}


def error_budget_of(split: SplitModel, art: Artifact, target_dir: Path, images: np.ndarray,
                    reference: np.ndarray) -> list[Any]:
    """``art``'s error budget (bottlefit.parity.budget), each grid named by the head module it quantizes."""
    import onnx

    from bottlefit.exporter.qdq import tensor_modules
    from bottlefit.parity.budget import error_budget

    model = onnx.load(str(target_dir / art.file))
    modules = {t: split.head_module_path(m) for t, m in tensor_modules(model, split.head).items()}
    return error_budget(model, images, reference, modules)


def diagnose(split: SplitModel, art: Artifact, target_dir: Path, images: np.ndarray, tols: dict) -> dict[str, Any]:
    """Which head layer broke a bottleneck tolerance first, under the artifact's reference semantics."""
    min_cos = tols["bottleneck.cosine"].value if "bottleneck.cosine" in tols else 0.9999
    # A layer diverges when it breaks a bottleneck tolerance itself: cosine, or SQNR (which sees a coarse
    # scale long before cosine does).
    min_sqnr = tols["bottleneck.sqnr_db"].value if "bottleneck.sqnr_db" in tols else None
    if art.runtime == Runtime.LITERT:
        from bottlefit.parity.diagnose import first_divergence_tflite

        # module paths are the model's own already; the origin map is the one the export recorded
        origin = art.extra.get("rewrite", {}).get("origin")
        rows = first_divergence_tflite(target_dir / art.file, split, images, art.inputs[0], origin)
    elif art.runtime == Runtime.ONNXRUNTIME and art.inputs[0].dtype == "float32":
        from bottlefit.parity.diagnose import first_divergence_onnx

        rows = first_divergence_onnx(target_dir / art.file, split.head, images, art.inputs[0], min_cos)
        for r in rows:
            r["module"] = split.head_module_path(r["module"])
            r["through"] = split.head_module_path(r["through"])
    else:
        return {"first_diverging_layer": None, "layers": [],
                "summary": f"no per-layer diagnosis: it needs an ONNX artifact with float input or a TFLite "
                           f"artifact, and {art.file} is {art.runtime} with {art.inputs[0].dtype} input"}
    first = next((r for r in rows if r["cosine"] < min_cos
                  or (min_sqnr is not None and r["sqnr_db"] is not None and r["sqnr_db"] < min_sqnr)), None)
    return {"first_diverging_layer": first["module"] if first else None, "min_cosine": min_cos,
            "min_sqnr_db": min_sqnr, "layers": rows, "summary": diagnosis_summary(art, rows, first, min_cos,
                                                                                   min_sqnr)}


def diagnosis_summary(art: Artifact, rows: list[dict], first: dict | None, min_cos: float,
                       min_sqnr: float | None) -> str:
    gate = f"cosine >= {min_cos:g}" + (f" and SQNR >= {min_sqnr:g} dB" if min_sqnr is not None else "")
    if first is not None:
        sq = "" if first["sqnr_db"] is None else f", SQNR {first['sqnr_db']:.1f} dB"
        return (f"first diverging head layer: {first['module']} (cosine {first['cosine']:.4f}{sq}; every layer "
                f"before it keeps {gate})")
    if not rows:
        return (f"no layer of {art.file} could be matched to a PyTorch module (no named intermediate tensors of "
                "the same shape), so no layer is blamed")
    worst = min(rows, key=lambda r: (r["sqnr_db"] if r["sqnr_db"] is not None else math.inf, r["cosine"]))
    sq = "" if worst["sqnr_db"] is None else f", SQNR {worst['sqnr_db']:.1f} dB"
    return (f"no single head layer breaks {gate}: compared {len(rows)} layers of {art.file} with PyTorch's module "
            f"outputs under {reference_semantics(art.runtime)}; the error builds up across layers (worst: "
            f"{worst['module']}, cosine {worst['cosine']:.4f}{sq})")
