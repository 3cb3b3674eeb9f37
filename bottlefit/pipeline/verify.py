"""``bottlefit verify``: re-run the verdict on an export from its manifest alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bottlefit.errors import UserError
from bottlefit.exporter.manifest import MANIFEST, check_hashes, read_manifest, write_json
from bottlefit.exporter.manifest import target_dirs as manifest_target_dirs
from bottlefit.exporter.split import fold_head, split
from bottlefit.models.card import ModelCard
from bottlefit.parity.tolerances import OverrideSource, override_records, parse_overrides
from bottlefit.parity.verify import Verdict, verify
from bottlefit.pipeline import source
from bottlefit.pipeline.export import parity_section
from bottlefit.pipeline.options import VerifyRequest
from bottlefit.targets import get_target


def target_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; pass OUT/<target> written by `bottlefit export`")
    found = manifest_target_dirs(path)
    if not found:
        raise UserError(f"{path}: no {MANIFEST} here or in its subdirectories; pass a directory written by export")
    return found


def heldout_for(manifest: dict, card: ModelCard, images: str | None):  # noqa: ANN201 - a CalibrationSet
    """The held-out images the export judged on (refused if they changed), or the user's."""
    from bottlefit.calibration.dataset import CalibrationSet

    if images:
        return CalibrationSet.from_path(images, card, role="held-out")
    recorded = manifest.get("parity", {}).get("images", {})
    src = str(recorded.get("source", "builtin:heldout"))
    count = recorded.get("count")
    if src.startswith("builtin:"):
        held = CalibrationSet.builtin(card, part=src.split(":", 1)[1], count=count)
    else:
        held = CalibrationSet.from_path(src, card, count=count, role="held-out")
    if recorded.get("sha256") and held.sha256 != recorded["sha256"]:
        raise UserError(f"{src}: the held-out images changed since export; pass --images PATH")
    return held


def verify_target(target_dir: Path, request: VerifyRequest, log: Callable[[str], object] = lambda m: None) -> Verdict:
    """Fidelity again from the manifest alone, plus the target's executions (emulation); the report and the
    manifest's parity section are rewritten with the new verdict."""
    manifest = read_manifest(target_dir)
    artifacts = check_hashes(target_dir, manifest)
    card = ModelCard.from_dict(manifest["model_card"])
    lm = source.reload(manifest["source"], request.checkpoint)
    held = heldout_for(manifest, card, request.images)
    recorded = manifest.get("parity", {}).get("tolerance_overrides")
    if request.tolerance is not None:
        tolerance, given_by = request.tolerance, OverrideSource.VERIFY
    elif request.strict:
        tolerance, given_by = None, OverrideSource.VERIFY
        if recorded:
            log(f"{target_dir}: --strict: the built-in gates, not the manifest's overrides ({', '.join(recorded)})")
    else:
        tolerance, given_by = recorded, OverrideSource.MANIFEST
    overrides = parse_overrides(list(tolerance or []))
    target = get_target(manifest["target"])
    sm = split(lm.model, lm.card)
    if manifest.get("equalization"):
        # the artifacts were made from the equalized split: re-apply the recorded scales (no data needed)
        from bottlefit.exporter.equalize import apply_equalization

        sm = apply_equalization(sm, manifest["equalization"])
    if manifest.get("head_folds"):
        sm, _ = fold_head(sm)  # the artifacts' head: its module paths are what a diagnosis names
    # the target's executions (the board's scripts under emulation) run beside the fidelity checks
    executions = target.start_execution(target_dir, artifacts, request.emulate, log)
    try:
        verdict = verify(sm, artifacts, target_dir, manifest["target"], held.images, held.describe(), overrides,
                         budget=request.budget)
        verdict.execution += executions.collect()
    finally:
        executions.cancel()  # nothing left after collect(); an error's guests are stopped
    verdict.overrides = override_records(tolerance, given_by)
    verdict.write(target_dir)
    # the new verdict; the overrides the export was given stay recorded as such
    manifest["parity"] = parity_section(verdict, recorded)
    write_json(target_dir / MANIFEST, manifest)
    return verdict


def verify_all(request: VerifyRequest, log: Callable[[str], object] = lambda m: None) -> list[tuple[Path, Verdict]]:
    """Every target under ``request.path`` (OUT/<target>, or OUT holding several)."""
    return [(d, verify_target(d, request, log)) for d in target_dirs(Path(request.path))]
