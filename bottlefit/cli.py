"""The ``bottlefit`` command. Thin: parse, call one function per subcommand, map errors to exit codes.

Exit codes: 0 success; 1 a parity/verification failure; 2 bad input or usage (one line, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bottlefit import __version__
from bottlefit.errors import UserError, VerificationError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture, when the checkpoint does not say (custom_resnet152, "
                   "custom_densenet169, custom_densenet201)")
    p.add_argument("--bottleneck-channel", type=int, help="bottleneck channels, when the checkpoint does not say")
    p.add_argument("--bottleneck-ver", choices=["1", "2", "3"], help="ResNet-152 bottleneck version")
    p.add_argument("--bq", action="store_true", help="add the authors' 8-bit per-image bottleneck quantizer")
    p.add_argument("--untrained", action="store_true", help="no checkpoint: the architecture with random weights")
    p.add_argument("--seed", type=int, default=0, help="seed for untrained weights and calibration choice")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from bottlefit.exporter.source import load_from_args
    from bottlefit.models.inspect import describe, render

    d = describe(load_from_args(args))
    print(json.dumps(d, indent=2) if args.json else render(d))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bottlefit.exporter.export import run_export

    final, verdict = run_export(args)
    print(verdict.summary())
    print(f"{'PASS' if verdict.passed else 'FAIL'}: {final}")
    return 0 if verdict.passed else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from bottlefit.parity.verify_dir import run_verify

    return run_verify(args)


def build_parser() -> argparse.ArgumentParser:
    from bottlefit import targets

    parser = argparse.ArgumentParser(prog="bottlefit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bottlefit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show a checkpoint's card, bottleneck and head/tail sizes")
    p.add_argument("checkpoint", nargs="?")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="split a checkpoint and build verified artifacts for a target")
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--target", required=True, choices=targets.names())
    p.add_argument("--out", required=True, help="output root; artifacts go to OUT/<target>/")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the target's; 13 for onnx)")
    p.add_argument("--calib", help="calibration images: a folder (recursive), an ImageFolder tree or a .npz "
                   "(default: the built-in photos)")
    p.add_argument("--calib-count", type=int, help="use N calibration images (seeded choice)")
    p.add_argument("--observer", default="minmax", help="range observer: minmax, percentile, entropy, mse")
    p.add_argument("--images", help="held-out images for parity (default: the built-in held-out photos)")
    p.add_argument("--parity-count", type=int, help="use N held-out images for parity")
    p.add_argument("--tolerance", action="append", metavar="[ARTIFACT:]METRIC=VALUE",
                   help="override a parity tolerance, e.g. bottleneck.cosine=0.99 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--emulate", default="auto", metavar="auto|none|PROFILE[,PROFILE]",
                   help="run the target's own runtime on its ISA under emulation (rpi: pi4, pi5, pi3, zero2); "
                        "auto: the default board where the emulator can run here")
    _model_args(p)
    for name in targets.names():
        try:
            targets.get_target(name).add_arguments(p)
        except UserError:
            continue  # reported when that target is asked for
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="re-run parity on an exported directory (exit 1 when a check fails)")
    p.add_argument("dir", help="OUT/<target> written by export, or OUT itself to verify every target in it")
    p.add_argument("--images", help="held-out images (default: those recorded in the manifest)")
    p.add_argument("--checkpoint", help="the checkpoint, if it moved since export")
    p.add_argument("--tolerance", action="append", metavar="[ARTIFACT:]METRIC=VALUE")
    p.add_argument("--json", action="store_true", help="print report.json instead of the table")
    p.add_argument("--emulate", default="auto", metavar="auto|none|PROFILE[,PROFILE]",
                   help="also run the board scripts on the board's ISA under emulation (rpi: pi4, pi5, pi3, zero2)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("train", help="train a BottleFit student with the authors' two-stage strategy")
    from bottlefit.training.cli import add_train_arguments, run_train

    add_train_arguments(p)
    p.set_defaults(func=run_train)

    # Subcommands that live with their stage: each module offers register(subparsers).
    for extra in ("bottlefit.demo", "bottlefit.targets.jetson.cli"):
        try:
            module = __import__(extra, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != extra:  # a missing optional subcommand is fine; a broken one is not
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"bottlefit: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"bottlefit: verification failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bottlefit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
