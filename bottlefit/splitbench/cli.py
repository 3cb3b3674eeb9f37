"""``bottlefit bench split``: flags into :class:`~bottlefit.splitbench.split.BenchOptions`, the run, the report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.flags import add_renamed


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from bottlefit.splitbench.device import DEVICES
    from bottlefit.splitbench.links import PROFILES

    p = sub.add_parser("bench", parents=[common], help="benchmarks: `bench split` (local vs. offload vs. split)")
    bsub = p.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("split", parents=[common],
                        help="local vs. offloading (JPEG) vs. split over emulated links, side by side in one run")
    s.add_argument("--out", required=True, help="report folder: split.{md,json}, split_*.png (and tradeoff.*)")
    s.add_argument("--quick", action="store_true", help="few images, one repeat (CI)")
    profiles = ", ".join(f"{k} ({v.rate_mbit:g} Mbit/s, RTT {v.rtt_ms:g} ms, loss {v.loss_pct:g}%%)"
                         for k, v in PROFILES.items())
    s.add_argument("--links", default="all", help=f"comma-separated link profiles or all: {profiles}")
    s.add_argument("--link-model", default="auto", choices=["auto", "netns", "analytic"],
                   help="netns: namespaces + veth + tc (root); analytic: loopback + RTT + bytes*8/rate; "
                        "auto: netns where permitted")
    add_renamed(s, "--image-count", "--images", type=int, metavar="N",
                help="images per link and mode (default 32; --quick 8; --paper 16)")
    s.add_argument("--repeats", type=int, help="passes over the images (default 3; --quick 1)")
    s.add_argument("--jpeg-quality", type=int, default=95, help="offloading's JPEG quality (default 95)")
    s.add_argument("--wire", default="auto",
                   help="split payload: int8, raw, zstd, entropy, context, fp32, or auto (least encode + decode + "
                        "transfer time at the headline link, measured here)")
    add_renamed(s, "--board", "--device", default="host", choices=sorted(DEVICES),
                help="the device side: host (this machine, measured); pi4, pi5, pi3, zero2: what the device runs "
                        "(head, whole model, JPEG encoding) counted under arm64 emulation on the board's core and "
                        "predicted by the device-time model fitted on published board timings; nano: assumed x" +
                        f"{DEVICES['nano'].factor:g} this host")
    s.add_argument("--device-factor", type=float,
                   help="your measured ratio of the board to this host: device compute = this host's ms x it "
                        "(labelled assumed; no emulation)")
    s.add_argument("--device-timings", metavar="FILE",
                   help="`bottlefit run-head --json` output from the real board: the head's ms, measured (the other "
                        "parts stay predicted); with --board pi4|pi5|pi3|zero2")
    s.add_argument("--headline-link", help="the link of the headline line (default lte, else the first of --links)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--export", help="an export root holding onnx/ (tail.onnx, head.onnx) and its heads")
    src.add_argument("--checkpoint", help="a checkpoint: exported for onnx (int8 head) into OUT/export first")
    add_renamed(s, "--demo-out", "--workdir", default="out/demo", metavar="DIR",
                help="the demo's --out folder: its export is the default model (trained and exported there when "
                     "missing); --paper keeps its exports there too")
    s.add_argument("--head", help="head artifact file for the device (default: as run-head picks it: the board "
                   "profile's default head of an rpi/ bundle, else the int8 head)")
    add_renamed(s, "--accuracy-image-count", "--accuracy-images", type=int, metavar="N",
                help="images for top-1 per mode (default 1000; --quick 200)")
    s.add_argument("--no-tradeoff", action="store_true", help="skip the compression-accuracy trade-off")
    s.add_argument("--server", default="serve", choices=["serve", "triton"],
                   help="triton: the split mode also through a real tritonserver (the `bottlefit triton` ensemble, "
                        "python backend; the nvidia-pytriton wheel, fetched once into the cache), in the same run, "
                        "as mode split_triton; the wire is then a coded one")
    s.add_argument("--paper", action="store_true",
                   help="the BottleFit paper's comparison on its model: ResNet-152 ver2 224x224, 12 and 3 channels, "
                        "each board's default head (ncnn int8), on pi4 and pi5 over the links; split vs local / "
                        "offload, latency and an energy model, beside the paper's figures (OUT/paper.{md,json,png})")
    s.add_argument("--paper-checkpoints", metavar="C=PATH[,C=PATH]",
                   help="--paper: the models' checkpoints by channel count (default: untrained, seed 0)")
    s.add_argument("--boards", default="pi4,pi5", help="--paper: boards")
    s.add_argument("--paper-share-count", action="store_true",
                   help="--paper: count the whole model of the first checkpoint only; the others (which differ "
                        "only in the bottleneck's two convs) use its count, labelled with their MAC difference")
    s.add_argument("--paper-count-timeout", type=float, default=900.0, metavar="S",
                   help="--paper: seconds the whole model's count may take under emulation (default 900; a cached "
                        "count is used whatever this says; 0: not counted, its ms assumed); the head and JPEG "
                        "encoding are always counted")
    s.add_argument("--paper-repredict", action="store_true",
                   help="--paper: re-make OUT/paper.* from OUT/paper.json with the device-time model as it is now "
                        "(recorded counts re-predicted; nothing measured or counted again)")
    s.add_argument("--no-count", action="store_true",
                   help="--paper: no counting under emulation (device ms = this host's x the device factor)")
    s.add_argument("--json", action="store_true",
                   help="print the report (what OUT/split.json or OUT/paper.json holds) instead of the table")
    s.set_defaults(func=run_split)


def options(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from bottlefit.serve.client import WIRES
    from bottlefit.splitbench.device import DEVICES
    from bottlefit.splitbench.links import parse_links
    from bottlefit.splitbench.split import BenchOptions

    if args.wire not in ("auto", *WIRES):
        raise UserError(f"--wire {args.wire!r}: choose auto or one of {', '.join(WIRES)}")
    for flag, v in (("--image-count", args.image_count), ("--repeats", args.repeats),
                    ("--accuracy-image-count", args.accuracy_image_count)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality {args.jpeg_quality}: must be 1..100")
    device = DEVICES[args.board]
    if args.device_factor is not None:
        if not args.device_factor > 0:
            raise UserError(f"--device-factor {args.device_factor}: must be > 0")
        device = replace(device, factor=args.device_factor,
                         basis=f"{device.name}: x{args.device_factor:g} this host's measured compute, the factor set "
                               "by --device-factor (assumed: the user's own measured ratio)")
    timings = None
    if args.device_timings is not None:
        from bottlefit.splitbench.device import read_timings

        if device.board is None or device.factor is not None:
            raise UserError("--device-timings needs --board pi4|pi5|pi3|zero2 without --device-factor")
        timings = Path(args.device_timings)
        read_timings(timings)  # one clear line now, not after the accuracy pass
    links = parse_links(args.links)
    names = [p.name for p in links]
    headline = (args.headline_link or ("lte" if "lte" in names else names[0])).lower()
    if headline not in names:
        raise UserError(f"--headline-link {args.headline_link!r} is not among --links ({', '.join(names)})")
    if args.server == "triton" and args.wire not in ("auto", "raw", "zstd", "entropy", "context"):
        raise UserError(f"--wire {args.wire} with --server triton: Triton's ensemble takes the coded wires (raw, zstd, "
                        "entropy, context)")
    if args.export is not None and not Path(args.export).is_dir():
        raise UserError(f"--export {args.export}: no such directory")
    return BenchOptions(
        out=Path(args.out), links=links, quick=args.quick, link_model=args.link_model,
        images=args.image_count or (8 if args.quick else 32), repeats=args.repeats or (1 if args.quick else 3),
        jpeg_quality=args.jpeg_quality, wire=args.wire, device=device, headline_link=headline,
        export=Path(args.export) if args.export else None,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, workdir=Path(args.demo_out), head=args.head,
        accuracy_images=args.accuracy_image_count or (200 if args.quick else 1000), triton=args.server == "triton",
        device_timings=timings)


def _require_extras() -> None:
    """The server side runs on the serve extra, the plots on matplotlib: say what to install (exit 3)."""
    import importlib.util

    from bottlefit.errors import EnvironmentProblem

    missing = [m for m in ("starlette", "uvicorn", "grpc", "tritonclient", "zstandard", "constriction", "matplotlib")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(f"{', '.join(missing)} not installed: pip install 'bottlefit[serve,demo]'")


def run_paper_mode(args: argparse.Namespace) -> int:
    """``--paper``: the composed comparison of bottlefit.splitbench.paper (no peers; see its docstring)."""
    boards = tuple(b.strip() for b in args.boards.split(",") if b.strip())
    for b in boards:
        if b not in ("pi4", "pi5"):
            raise UserError(f"--boards {b!r}: the energy model has power figures for pi4 and pi5 only")
    if args.image_count is not None and args.image_count < 1:
        raise UserError(f"--image-count {args.image_count}: must be at least 1")
    if args.paper_count_timeout < 0:
        raise UserError(f"--paper-count-timeout {args.paper_count_timeout:g}: must be >= 0 (0: not counted)")
    from bottlefit.serve.client import WIRES
    from bottlefit.splitbench.links import parse_links
    from bottlefit.splitbench.paper import PaperOptions, parse_sources, repredict, run_paper, write_report

    if args.paper_repredict:
        src = Path(args.out) / "paper.json"
        try:
            earlier = json.loads(src.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--paper-repredict: cannot read {src} ({e}); run --paper into --out first") from None
        result = repredict(earlier)
        paths = write_report(Path(args.out), result)
        if args.json:
            print((Path(args.out) / "paper.json").read_text().rstrip("\n"))
            return 0
        print(f"wrote {', '.join(str(p) for p in paths)} (re-predicted from {src})")
        print(result["headline"])
        return 0

    if args.wire not in ("auto", *WIRES):
        raise UserError(f"--wire {args.wire!r}: choose auto or one of {', '.join(WIRES)}")
    links = parse_links(args.links)
    opts = PaperOptions(out=Path(args.out), sources=parse_sources(args.paper_checkpoints), boards=boards,
                        links=links, images=args.image_count or 16, jpeg_quality=args.jpeg_quality, wire=args.wire,
                        workdir=Path(args.demo_out), headline_link=(args.headline_link or "lte").lower(),
                        count=not args.no_count, share_count=args.paper_share_count,
                        count_timeout=args.paper_count_timeout)
    result = run_paper(opts, _log)
    paths = write_report(opts.out, result)
    if args.json:
        print((opts.out / "paper.json").read_text().rstrip("\n"))
        return 0
    print(f"wrote {', '.join(str(p) for p in paths)} in {result['wall_s']:.0f} s")
    print(result["headline"])
    return 0


def run_split(args: argparse.Namespace) -> int:
    if args.paper:
        return run_paper_mode(args)
    opts = options(args)
    _require_extras()
    from bottlefit.splitbench.report import table, write_report
    from bottlefit.splitbench.split import run_bench

    t0 = time.perf_counter()
    result = run_bench(opts, _log)
    result["tradeoff"] = run_tradeoff_step(opts.out, quick=opts.quick, skip=args.no_tradeoff)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    paths = write_report(opts.out, result)
    failed = sum(r["failed"] for r in result["rows"])
    if args.json:
        print((opts.out / "split.json").read_text().rstrip("\n"))
        return 1 if failed else 0
    print(table(result))
    print(f"links: {result['link_setup_text']}")
    dev = result["device"]
    print(f"device: {dev['name']}, {dev['label']} ({dev['basis']})")
    for mode, m in dev["modes"].items():
        print(f"  {mode}: {m['basis']}: {m['why']}")
    print(f"wrote {', '.join(str(p) for p in paths)} in {result['wall_s']:.0f} s")
    print(result["headline"])
    if failed:
        print(f"bottlefit bench split: {failed} request(s) failed (see the table)", file=sys.stderr)
    return 1 if failed else 0


def run_tradeoff_step(out: Path, *, quick: bool, skip: bool) -> dict[str, Any]:
    """The compression-accuracy trade-off (bottlefit.splitbench.tradeoff), or why it did not run."""
    if skip:
        return {"skipped": "--no-tradeoff"}
    import importlib
    import importlib.util

    if importlib.util.find_spec("bottlefit.splitbench.tradeoff") is None:
        msg = "bottlefit.splitbench.tradeoff is not in this install; the trade-off plot is skipped"
        _log(msg)
        return {"skipped": msg}
    tradeoff = importlib.import_module("bottlefit.splitbench.tradeoff")
    _log("compression-accuracy trade-off (bottlefit.splitbench.tradeoff)")
    return dict(tradeoff.run_tradeoff(out, quick=quick, log=_log))
