"""``bottlefit export``: checkpoint -> split -> target artifacts -> manifest -> parity, written atomically."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bottlefit.errors import UserError
from bottlefit.exporter import source, wire
from bottlefit.exporter.manifest import write_manifest
from bottlefit.exporter.split import check_split, split
from bottlefit.parity.tolerances import parse_overrides
from bottlefit.parity.verify import Verdict, verify
from bottlefit.targets import BuildContext, Emulate, get_target


class Progress:
    """One line per step on stderr, with its wall time: CI logs stay readable, a person sees it move."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def prepare_out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; pass --out a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output directory ({e.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{out}: output directory is not writable; choose another --out")
    return out


def heldout_images(card: Any, images: str | None, count: int | None, log: Callable[[str], None]) -> Any:
    from bottlefit.calibration.dataset import CalibrationSet

    if images:
        return CalibrationSet.from_path(images, card, count=count, seed=0, log=log)
    return CalibrationSet.builtin(card, part="heldout", count=count, log=log)


def calibration_factory(args: argparse.Namespace, card: Any, log: Callable[[str], None]) -> Callable[[], Any]:
    def make() -> Any:
        from bottlefit.calibration.dataset import CalibrationSet

        if getattr(args, "calib", None):
            cs = CalibrationSet.from_path(args.calib, card, count=args.calib_count, seed=args.seed, log=log)
        else:
            cs = CalibrationSet.builtin(card, part="calibration", count=args.calib_count, seed=args.seed, log=log)
        log(f"calibration set: {len(cs)} images from {cs.source} (sha256 {cs.sha256[:12]}…)")
        return cs

    return make


def parity_section(verdict: Verdict, tolerance: list[str] | None) -> dict[str, Any]:
    """The manifest's record of the verdict: fidelity checks and every execution, each saying where it ran."""
    report = verdict.to_dict()
    return {"passed": verdict.passed, "images": verdict.images, "checks": report["checks"],
            "execution": report["execution"], "tolerance_overrides": tolerance}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older export there is replaced only after success."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_export(args: argparse.Namespace) -> tuple[Path, Verdict]:
    log = Progress(getattr(args, "quiet", False))
    target = get_target(args.target)
    out_root = prepare_out_dir(Path(args.out))
    overrides = parse_overrides(getattr(args, "tolerance", None))
    emulate = Emulate.parse(getattr(args, "emulate", None))

    target.validate(args)
    log(f"loading {'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'untrained architecture'}")
    lm = source.load_from_args(args)
    card = lm.card
    if card.weights == "untrained":
        log(f"NOTE: {card.arch} has UNTRAINED (random) weights: the figures below check the toolchain, "
            "not accuracy")

    sm = split(lm.model, card)
    gen = torch.Generator().manual_seed(0)
    err = check_split(sm, torch.randn(2, *card.input_shape, generator=gen))
    log(f"split at {card.bottleneck.module}: bottleneck {card.bottleneck.shape}; "
        f"max |tail(head(x)) - model(x)| = {err:.3g}")

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=out_root))
    try:
        ctx = BuildContext(sm, tmp, args, calibration_factory(args, card, log),
                           lambda: heldout_images(card, getattr(args, "images", None),
                                                  getattr(args, "parity_count", None), log), log)
        artifacts = target.build(ctx)
        log("parity: running every artifact in its own runtime against PyTorch fp32")
        held = ctx.heldout
        verdict = verify(sm, artifacts, tmp, target.name, held.images, held.describe(), overrides)
        verdict.execution += target.execute(tmp, artifacts, emulate, log)
        verdict.write(tmp)
        sections: dict[str, Any] = {
            "split_check": {"max_abs_error": err},
            "parity": parity_section(verdict, getattr(args, "tolerance", None)),
            "options": {k: v for k, v in sorted(vars(args).items())
                        if k not in ("func", "checkpoint", "out", "quiet")
                        and isinstance(v, str | int | float | bool | None)},
        }
        if ctx._calibration is not None:
            sections["calibration"] = ctx._calibration.describe()
        sections["wire"] = {a.file: wire.contract(card.bottleneck, a.outputs[0]) for a in artifacts
                            if a.role == "head" and a.outputs}
        write_manifest(tmp, target.name, card.to_dict(), source.describe(lm), artifacts, **sections)
        final = out_root / target.name
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {final}/ ({', '.join(a.file for a in artifacts)})")
    return final, verdict


