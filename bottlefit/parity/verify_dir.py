"""``bottlefit verify DIR``: re-run parity on an export from its manifest alone."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bottlefit.errors import UserError
from bottlefit.exporter import source
from bottlefit.exporter.manifest import MANIFEST, check_hashes, read_manifest, write_json
from bottlefit.exporter.split import split
from bottlefit.models.card import ModelCard
from bottlefit.parity.tolerances import parse_overrides
from bottlefit.parity.verify import Verdict, verify


def target_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; pass OUT/<target> written by `bottlefit export`")
    if (path / MANIFEST).is_file():
        return [path]
    found = sorted(p.parent for p in path.glob(f"*/{MANIFEST}") if not p.parent.name.startswith("."))
    if not found:
        raise UserError(f"{path}: no {MANIFEST} here or in its subdirectories; pass a directory written by export")
    return found


def verify_target(target_dir: Path, images: str | None, checkpoint: str | None,
                  tolerance: list[str] | None, emulate: str | None = None,
                  log: Callable[[str], object] = lambda m: None) -> Verdict:
    """Fidelity again from the manifest alone, plus the target's executions (emulation); the report and the
    manifest's parity section are rewritten with the new verdict."""
    from bottlefit.calibration.dataset import CalibrationSet
    from bottlefit.exporter.export import parity_section
    from bottlefit.targets import Emulate, get_target

    manifest = read_manifest(target_dir)
    artifacts = check_hashes(target_dir, manifest)
    card = ModelCard.from_dict(manifest["model_card"])
    lm = source.reload(manifest["source"], checkpoint)
    sm = split(lm.model, lm.card)
    recorded = manifest.get("parity", {}).get("images", {})
    if images:
        held = CalibrationSet.from_path(images, card)
    else:
        src = str(recorded.get("source", "builtin:heldout"))
        count = recorded.get("count")
        if src.startswith("builtin:"):
            held = CalibrationSet.builtin(card, part=src.split(":", 1)[1], count=count)
        else:
            held = CalibrationSet.from_path(src, card, count=count)
        if recorded.get("sha256") and held.sha256 != recorded["sha256"]:
            raise UserError(f"{src}: the held-out images changed since export; pass --images PATH")
    tolerance = tolerance if tolerance is not None else manifest["parity"].get("tolerance_overrides")
    overrides = parse_overrides(tolerance)
    target = get_target(manifest["target"])
    verdict = verify(sm, artifacts, target_dir, manifest["target"], held.images, held.describe(), overrides)
    verdict.execution += target.execute(target_dir, artifacts, Emulate.parse(emulate), log)
    verdict.write(target_dir)
    manifest["parity"] = parity_section(verdict, tolerance)
    write_json(target_dir / MANIFEST, manifest)
    return verdict


def run_verify(args: argparse.Namespace) -> int:
    passed = True
    reports = []
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    for d in target_dirs(Path(args.dir)):
        v = verify_target(d, args.images, args.checkpoint, args.tolerance, args.emulate, log)
        passed &= v.passed
        reports.append(v.to_dict())
        if not args.json:
            print(f"{d}:")
            print(v.summary())
            print(f"{'PASS' if v.passed else 'FAIL'}: {d}")
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0 if passed else 1
