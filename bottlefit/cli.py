"""The ``bottlefit`` command. Thin: parse flags into typed options once, call the pipeline, map errors to exit codes.

Exit codes (bottlefit.errors): 0 success; 1 a verification failed; 2 bad input or usage (one line naming the file
or flag and the fix); 3 this machine's environment (a runtime, emulator or GPU missing) or an internal error.
Third-party chatter (converter and runtime logs, deprecation warnings) is hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bottlefit import __version__
from bottlefit.errors import (
    EXIT_ENVIRONMENT,
    EnvironmentProblem,
    UserError,
    VerificationError,
)

DESCRIPTION = """BottleFit: take a trained split-computing image classifier (a BottleFit checkpoint) to verified
int8 head and fp32 tail artifacts for ONNX Runtime, NVIDIA Jetson (TensorRT) and Raspberry Pi (LiteRT, ONNX Runtime,
ncnn); serve the tail, run the head on a device, and measure whether splitting pays."""
EPILOG = """start here:
  bottlefit demo                       train a small model on built-in digits, export and verify every target
                                       (writes out/demo/export/ and sample images in out/demo/images/)
  bottlefit serve out/demo/export      serve the tail (KServe v2 REST on :8000, gRPC on :8001)
  bottlefit run-head out/demo/export/onnx out/demo/images/*.png
                                       run the head here and send each bottleneck to that server
  bottlefit bench split --quick --out out/bench
                                       local vs. offload vs. split over emulated 3G/LTE/Wi-Fi/5G links
  bottlefit export CKPT --target rpi --out out
                                       your own checkpoint: out/rpi/ with the board bundle
  bottlefit profiles                   the boards, emulated cores and network links these commands know

`bottlefit COMMAND --help` shows a command's options and their defaults. Exit codes: 0 success, 1 a verification
failed, 2 bad input or usage, 3 this machine lacks something (the message says what). Documentation: README.md
and docs/ in the source tree."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless its text already names it or it has none (an unset
    value, a switch that is off); descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or "default" in text or default is None or default is False
                or default == argparse.SUPPRESS or default == []):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The command's parsers (subcommands' included: argparse makes them of the parent's class): defaults in help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _model_args(p: argparse.ArgumentParser) -> None:
    from bottlefit.models.registry import names as arch_names

    p.add_argument("--arch", help=f"architecture, when the checkpoint does not say ({', '.join(arch_names())})")
    p.add_argument("--bottleneck-channel", type=int, help="bottleneck channels, when the checkpoint does not say")
    p.add_argument("--bottleneck-ver", choices=["1", "2", "3"], help="ResNet-152 bottleneck version")
    p.add_argument("--bq", action="store_true", help="add the authors' 8-bit per-image bottleneck quantizer")
    p.add_argument("--untrained", action="store_true", help="no checkpoint: the architecture with random weights")
    p.add_argument("--seed", type=int, default=0, help="seed for untrained weights and calibration choice")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint of ``export`` and ``inspect``: positional, or ``--checkpoint`` as in ``verify`` and ``bench
    split`` (one name in every command; either spelling here)."""
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="the checkpoint (or --checkpoint CKPT)")
    p.add_argument("--checkpoint", dest="checkpoint_option", metavar="CKPT", help="the checkpoint, as a flag")


def checkpoint_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint given either way; both ways naming different files is a usage error."""
    from bottlefit.errors import UserError

    given = {c for c in (args.checkpoint, getattr(args, "checkpoint_option", None)) if c}
    if len(given) > 1:
        raise UserError(f"{args.checkpoint} and --checkpoint {args.checkpoint_option}: name one checkpoint")
    return Path(given.pop()) if given else None


def model_source(args: argparse.Namespace) -> Any:
    from bottlefit.pipeline.options import ModelSource

    return ModelSource(checkpoint=checkpoint_path(args), arch=args.arch,
                       bottleneck_channel=args.bottleneck_channel, bottleneck_ver=args.bottleneck_ver, bq=args.bq,
                       untrained=args.untrained, seed=args.seed)


def target_names(text: str) -> list[str]:
    """``--target``: one target or a comma list of them (``jetson,rpi``), each known and named once."""
    from bottlefit.errors import UserError
    from bottlefit.targets import get_target, names

    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen:
        raise UserError(f"--target {text!r}: name a target, or several separated by commas: {', '.join(names())}")
    for t in chosen:
        get_target(t)  # an unknown name is refused here, naming the choices
    twice = next((t for t in chosen if chosen.count(t) > 1), None)
    if twice:
        raise UserError(f"--target {text}: {twice} is named twice; name each target once")
    return chosen


def export_requests(args: argparse.Namespace) -> list[Any]:
    """``bottlefit export``'s flags as the pipeline's typed requests, one per target of ``--target`` (every value
    checked here, once). A target's flag applies to each chosen target that takes it (README: "Several targets in
    one run")."""
    from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ParityOptions
    from bottlefit.targets import Emulate, get_target, options_from

    targets = [get_target(t) for t in target_names(args.target)]
    check_target_flags(args, targets)
    boards = board_options(args, targets)
    model = model_source(args)
    calibration = CalibrationOptions(source=args.calib, count=args.calib_count, observer=args.observer,
                                     seed=args.seed, equalize=args.equalize, fold_pool_bn=not args.keep_pool_bn,
                                     weight_rounding=args.weight_rounding, bias_correction=args.bias_correction,
                                     recipe=args.recipe)
    parity = ParityOptions(images=args.images, count=args.parity_count, tolerance=tuple(args.tolerance or ()),
                           emulate=Emulate.parse(args.emulate))
    return [ExportRequest(model=model, target=t.name, out=Path(args.out),
                          target_options=options_from(t.options_type, vars(args) | boards.get(t.name, {})),
                          calibration=calibration, parity=parity, replace_failed=args.replace_failed)
            for t in targets]


def board_options(args: argparse.Namespace, targets: list[Any]) -> dict[str, dict[str, Any]]:
    """``--profile`` names a board, and each target has its own boards: with several targets that take it, it is a
    comma list (``--profile orin,pi5``) and each target gets the board of its own table (none named: its
    default). A board no chosen target has, or two boards for one target, is refused. One target: the value as
    given (that target's own check names its boards)."""
    from dataclasses import fields

    from bottlefit.errors import UserError

    value = getattr(args, "profile", None)
    takers = [t for t in targets if "profile" in {f.name for f in fields(t.options_type)}]
    if value is None or (len(takers) <= 1 and "," not in value):
        return {}
    given: dict[str, list[str]] = {t.name: [] for t in takers}
    label = ",".join(t.name for t in targets)
    for board in (b.strip() for b in value.split(",") if b.strip()):
        owners = [t for t in takers if _has_board(t, board)]
        if not owners:
            raise UserError(f"--profile {board}: no board of that name for --target {label}; see "
                            "`bottlefit export --help` for each target's boards")
        for t in owners:
            given[t.name].append(board)
    for name, named in given.items():
        if len(named) > 1:
            raise UserError(f"--profile {value}: {' and '.join(named)} are both boards of --target {name}; name one "
                            "board per target")
    return {name: {"profile": named[0] if named else None} for name, named in given.items()}


def _has_board(target: Any, board: str) -> bool:
    """Whether ``target`` knows ``board``: its own check of its default options with that board."""
    from bottlefit.errors import UserError

    try:
        target.validate(target.options_type(profile=board))
    except UserError:
        return False
    return True


class _FlagRecorder:
    """Stands in for the export parser while a target adds its flags: keeps each flag's argparse action."""

    def __init__(self, parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> None:
        self.parser, self.actions = parser, actions

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        action = self.parser.add_argument(*names, **kwargs)
        self.actions.append(action)
        return action


def check_target_flags(args: argparse.Namespace, targets: list[Any]) -> None:
    """Every target's flags share one parser, and ``options_from`` keeps only each chosen target's fields: a flag
    the user set that no chosen target takes is refused here (exit 2) instead of being dropped silently. With
    several targets, a flag taken by some of them applies to those only."""
    from dataclasses import fields

    from bottlefit.errors import UserError
    from bottlefit.targets import get_target, names

    own = {f.name for t in targets for f in fields(t.options_type)}
    label = ",".join(t.name for t in targets)
    for action in args.target_flag_actions:
        if action.dest in own or getattr(args, action.dest) == action.default:
            continue
        takers = [n for n in names() if action.dest in {f.name for f in fields(get_target(n).options_type)}]
        raise UserError(f"{action.option_strings[0]} is not an option of --target {label} (it is for --target "
                        f"{' and '.join(takers)}); drop it")
    emulate = getattr(args, "emulate", "auto")
    if emulate not in ("auto", "none", None) and not any(getattr(t, "emulates", False) for t in targets):
        has = "has" if len(targets) == 1 else "have"
        raise UserError(f"--emulate {emulate}: --target {label} {has} no board to emulate (only --target rpi "
                        "does); drop it or pass --emulate none")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from bottlefit.pipeline.inspect import describe, render
    from bottlefit.pipeline.source import load

    d = describe(load(model_source(args)))
    print(json.dumps(d, indent=2) if args.json else render(d))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bottlefit.pipeline.export import Progress, export_targets

    results = export_targets(export_requests(args), Progress(args.quiet))
    if args.json:
        reports = [r.verdict.to_dict() for r in results]
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0 if all(r.verdict.passed for r in results) else 1
    for result in results:
        if len(results) > 1:
            print(f"{result.target}:")
        print(result.verdict.summary())
        print(f"{'PASS' if result.verdict.passed else 'FAIL'}: {result.path}")
    return 0 if all(r.verdict.passed for r in results) else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from bottlefit.pipeline.options import VerifyRequest
    from bottlefit.pipeline.verify import verify_all
    from bottlefit.targets import Emulate

    request = VerifyRequest(Path(args.dir), images=args.images,
                            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                            tolerance=tuple(args.tolerance) if args.tolerance is not None else None,
                            emulate=Emulate.parse(args.emulate), budget=args.budget, strict=args.strict)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    results = verify_all(request, log)
    if args.json:
        reports = [v.to_dict() for _, v in results]
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        for d, v in results:
            print(f"{d}:")
            print(v.summary())
            print(f"{'PASS' if v.passed else 'FAIL'}: {d}")
    return 0 if all(v.passed for _, v in results) else 1


def profiles_catalog() -> dict[str, Any]:
    """What ``bottlefit profiles`` lists, read from the tables the commands use: boards (``export --target jetson
    --profile``, ``--target rpi --profile``), emulated cores (``--emulate``) and network links (``bench split
    --links``)."""
    from bottlefit.emulation.arm64 import CORES
    from bottlefit.splitbench.links import PROFILES as LINKS
    from bottlefit.targets.jetson import profiles as jetson
    from bottlefit.targets.rpi import profiles as rpi

    defaults = {p.name: p for p in reversed(jetson.PROFILES)}  # the first row of a name is its default
    return {
        "boards": {
            "jetson": [{"name": p.name, "jetpack": list(p.jetpack), "tensorrt": p.trt_version, "gpu": p.gpu,
                        "sm": p.sm, "int8": p.fast_int8, "dla_cores": p.dla_cores, "max_opset": p.max_opset,
                        "default_precision": p.default_precision, "board_python": p.board_python,
                        "default_for_name": defaults[p.name] is p} for p in jetson.PROFILES],
            "rpi": [{"name": p.name, "board": p.board, "core": p.core, "threads": p.threads, "head": p.model,
                     "runtime": p.runtime, "delegate": p.delegate,
                     "head_minstr_per_inference": p.costs.get(p.default_key),
                     "ratio_vs_fp32_tflite": None if p.ratio() is None else round(p.ratio(), 3),
                     "default": p.name == rpi.DEFAULT} for p in rpi.PROFILES.values()],
        },
        "cores": [{"name": c.profile, "cpu": c.cpu, "board": c.board, "cpuinfo_part": c.cpuinfo_part,
                   "features": c.features.split()} for c in CORES.values()],
        "links": [{"name": p.name, "label": p.label, "rate_mbit": p.rate_mbit, "rtt_ms": p.rtt_ms,
                   "loss_pct": p.loss_pct} for p in LINKS.values()],
    }


def render_profiles(c: dict[str, Any]) -> str:
    lines = ["Jetson boards (export --target jetson --profile NAME [--jetpack X]; the first row of a name is its "
             "default):"]
    for b in c["boards"]["jetson"]:
        lines.append(f"  {b['name']:10s} JetPack {'/'.join(b['jetpack']):8s} TensorRT {b['tensorrt']:7s} "
                     f"{b['gpu']} SM {b['sm']}, int8 {'yes' if b['int8'] else 'no'}, {b['dla_cores']} DLA, "
                     f"opset <= {b['max_opset']}, default {b['default_precision']}, python {b['board_python']}"
                     f"{'' if b['default_for_name'] else ' (--jetpack ' + b['jetpack'][0] + ')'}")
    lines.append("Raspberry Pi boards (export --target rpi --profile NAME; the head its bundle runs by default, "
                 "by measured cost):")
    for b in c["boards"]["rpi"]:
        cost = (f", {b['head_minstr_per_inference']:.1f} M instructions ({b['ratio_vs_fp32_tflite']:.2f}x fp32 "
                f"TFLite)" if b["ratio_vs_fp32_tflite"] is not None else "")
        lines.append(f"  {b['name']:10s} {b['board']}, {b['core']}, {b['threads']} threads: {b['head']} in "
                     f"{b['runtime']}{cost}{' (default)' if b['default'] else ''}")
    lines.append("Emulated cores (export/verify --emulate NAME[,NAME]; qemu-user):")
    for k in c["cores"]:
        lines.append(f"  {k['name']:10s} {k['cpu']} ({k['board']}), features: {' '.join(k['features'])}")
    lines.append("Network links (bench split --links NAME[,NAME]):")
    for link in c["links"]:
        lines.append(f"  {link['name']:10s} {link['label']}: {link['rate_mbit']:g} Mbit/s each way, RTT "
                     f"{link['rtt_ms']:g} ms, loss {link['loss_pct']:g}%")
    return "\n".join(lines)


def _cmd_profiles(args: argparse.Namespace) -> int:
    catalog = profiles_catalog()
    print(json.dumps(catalog, indent=2) if args.json else render_profiles(catalog))
    return 0


def _register_profiles(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("profiles", parents=[common],
                       help="list the boards, emulated cores and network links the other commands take")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_profiles)


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the top-level options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; for ``command`` one of the serving commands, a parser holding those alone: building the
    others imports torch (the export and training flags), which a tail server must not load."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show third-party logs and warnings, and tracebacks")
    parser = Parser(prog="bottlefit", description=DESCRIPTION, epilog=EPILOG, parents=[common])
    parser.add_argument("--version", action="version", version=f"bottlefit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from bottlefit.serve import cli as serve_cli

    if command in serve_cli.COMMANDS:
        serve_cli.register(sub, common)
        return parser
    if command == "profiles":
        _register_profiles(sub, common)
        return parser
    from bottlefit import targets

    p = sub.add_parser("inspect", parents=[common], help="show a checkpoint's card, bottleneck and head/tail sizes")
    _checkpoint_args(p)
    _model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", parents=[common], help="split a checkpoint and build verified artifacts for a target")
    _checkpoint_args(p)
    p.add_argument("--target", required=True, metavar="{" + ",".join(targets.names()) + "}[,...]",
                   help="the target, or several separated by commas (jetson,rpi): the model is loaded, split and "
                        "calibrated once, and each OUT/<target>/ is what an export of that target alone writes; "
                        "a target's flag applies to the chosen targets that take it")
    p.add_argument("--out", required=True, help="output root; artifacts go to OUT/<target>/")
    target_flag_actions = [p.add_argument("--opset", type=int,
                                          help="ONNX opset (default: the target's; 13 for onnx)")]
    p.add_argument("--calib", help="calibration images: a folder (recursive), an ImageFolder tree or a .npz "
                   "(default: the built-in photos)")
    p.add_argument("--calib-count", type=int, help="use N calibration images (seeded choice)")
    p.add_argument("--recipe", choices=["auto", "fast", "best"],
                   help="int8 calibration recipe: fast (minmax, nearest rounding), best (search, gptq, bias "
                        "correction, equalize), or auto (default: fast, then best when an int8 fidelity gate "
                        "fails; the manifest records each try). Any of the four flags below fixes one recipe: "
                        "those given, the rest from --recipe fast|best (fast when not given)")
    p.add_argument("--observer",
                   help="range observer: minmax, percentile, entropy, mse, or search (per tensor, the candidate "
                        "range with the least error of the layer reading it)")
    p.add_argument("--equalize", action=argparse.BooleanOptionalAction,
                   help="equalize the bottleneck's channels across the split (scales folded into the encoder's "
                        "last and the decoder's first layer) so one int8 grid serves every channel")
    p.add_argument("--weight-rounding", metavar="nearest|gptq",
                   help="how int8 heads round their conv weights: nearest, or gptq (Hessian-aware rounding on the "
                        "calibration images; every converter then writes the same integers)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction,
                   help="correct each int8 conv's bias for the mean error its weight rounding adds")
    p.add_argument("--keep-pool-bn", action="store_true",
                   help="keep the head's BatchNorm after the max-pool as a layer of its own (by default it is folded "
                        "into the stem conv where that is exact: one int8 layer and one requantization fewer)")
    p.add_argument("--images", help="held-out images for parity (default: the built-in held-out photos)")
    p.add_argument("--parity-count", type=int, help="use N held-out images for parity")
    p.add_argument("--tolerance", action="append", metavar="[ARTIFACT:]METRIC=VALUE",
                   help="override a parity tolerance, e.g. bottleneck.cosine=0.99 (repeatable)")
    p.add_argument("--emulate", default="auto", metavar="auto|none|PROFILE[,PROFILE]",
                   help="run the target's own runtime on its ISA under emulation (rpi: pi4, pi5, pi3, zero2); "
                        "auto: the default board where the emulator can run here")
    p.add_argument("--replace-failed", action="store_true",
                   help="let an export that fails parity replace OUT/<target> (by default the last passing export "
                        "stays and the failed attempt is written beside it, to OUT/<target>.failed/)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (warnings still show)")
    p.add_argument("--json", action="store_true",
                   help="print each target's verdict as report.json holds it (a list for several targets), as "
                        "`verify --json` does, instead of the table")
    _model_args(p)
    for name in targets.names():
        # help lists each target's own flags under its name (a flag two targets take sits with the first)
        group = p.add_argument_group(f"--target {name}")
        targets.get_target(name).add_arguments(_FlagRecorder(group, target_flag_actions))  # type: ignore[arg-type]
    p.set_defaults(func=_cmd_export, target_flag_actions=target_flag_actions)

    p = sub.add_parser("verify", parents=[common],
                       help="re-run the verdict on an exported directory (exit 1 when a check fails)")
    p.add_argument("dir", help="OUT/<target> written by export, or OUT itself to verify every target in it")
    p.add_argument("--images", help="held-out images (default: those recorded in the manifest)")
    p.add_argument("--checkpoint", help="the checkpoint, if it moved since export")
    p.add_argument("--tolerance", action="append", metavar="[ARTIFACT:]METRIC=VALUE")
    p.add_argument("--strict", action="store_true",
                   help="judge by the built-in gates only, ignoring tolerance overrides the manifest records (it is "
                        "not signed: anyone who can edit it can loosen them); for CI")
    p.add_argument("--json", action="store_true", help="print report.json instead of the table")
    p.add_argument("--emulate", default="auto", metavar="auto|none|PROFILE[,PROFILE]",
                   help="also run the board scripts on the board's ISA under emulation (rpi: pi4, pi5, pi3, zero2)")
    p.add_argument("--budget", action="store_true",
                   help="also the error budget of every int8 Q/DQ ONNX head: the bottleneck's SQNR with one "
                        "activation grid at a time (which quantizer costs the most)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("train", parents=[common],
                       help="train a BottleFit student with the authors' two-stage strategy")
    from bottlefit.training.cli import add_train_arguments, run_train

    add_train_arguments(p)
    p.set_defaults(func=run_train)

    from bottlefit import demo
    from bottlefit.splitbench import cli as bench_cli
    from bottlefit.targets.jetson import cli as jetson_cli

    demo.register(sub, common)
    jetson_cli.register(sub, common)
    serve_cli.register(sub, common)
    bench_cli.register(sub, common)
    _register_profiles(sub, common)
    return parser


def _quiet_third_party() -> None:
    """Hide the chatter of the libraries below us (their own loggers and warnings), not our lines or errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore")
    for name in ("torch", "absl", "tensorflow", "jax", "litert_torch", "ai_edge_torch", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _command_word(argv) is None and "--version" in argv and "-h" not in argv and "--help" not in argv:
        print(f"bottlefit {__version__}")  # without building every subcommand's parser (that imports torch)
        return 0
    parser = build_parser(_command_word(argv))
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_third_party()
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"bottlefit: error: {e}", file=sys.stderr)
        return e.exit_code
    except VerificationError as e:
        print(f"bottlefit: verification failed: {e}", file=sys.stderr)
        return e.exit_code
    except EnvironmentProblem as e:
        print(f"bottlefit: cannot run here: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP during an export (errors.Terminated)
        print(f"bottlefit: {e or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # a bug of ours or a library failure we did not anticipate: never exit 1 ("parity")
        if args.verbose:
            traceback.print_exc()
        where = "" if args.verbose else " (run again with --verbose for the traceback)"
        print(f"bottlefit: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}",
              file=sys.stderr)
        return EXIT_ENVIRONMENT


def console() -> None:
    """The ``bottlefit`` console script: without --verbose, what native libraries print straight to file
    descriptor 2 (TFLite's delegate notices, absl's pre-init lines, flatbuffer op counts) goes to a scratch file
    instead of the terminal; our own lines and errors still reach it."""
    argv = sys.argv[1:]
    if "--verbose" not in argv:
        _hide_native_stderr()
    sys.exit(main(argv))


def _hide_native_stderr() -> None:
    import tempfile

    sys.stderr.flush()
    terminal = os.dup(2)
    scratch = tempfile.TemporaryFile(prefix="bottlefit-native-", suffix=".log")
    os.dup2(scratch.fileno(), 2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="replace")
    _hide_native_stderr.scratch = scratch  # type: ignore[attr-defined]  # kept open for the process' life


if __name__ == "__main__":
    console()
