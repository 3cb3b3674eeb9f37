"""``--target jetson``: everything a Jetson board needs to build and check its own TensorRT engine.

The engine is tied to the board's GPU and TensorRT version, so it is built on the board (build_engine.sh);
this host makes the inputs and verifies all it can: the fp32 ``head.onnx``, the symmetric int8
``head.qdq.onnx`` (checked in ONNX Runtime by parity), TensorRT's native ``head.calib.cache`` made from the
same ranges, golden I/O and the board's verifier. Facts per board come from ``profiles.py``; see
docs/tensorrt.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact, Layout, Precision, Role, Runtime, TensorSpec
from bottlefit.exporter.onnx import DEFAULT_OPSET, check_opset, export_onnx
from bottlefit.files import executable_mode
from bottlefit.models.checkpoint import sha256_file
from bottlefit.runtimes.execution import Execution, Status, Where
from bottlefit.targets import BuildContext, BuildResult, Emulate, Finished, Needs
from bottlefit.targets.jetson.lint import lint_onnx
from bottlefit.targets.jetson.profiles import PRECISIONS, Profile, check_request, get_profile, names

HEAD_ONNX = "head.onnx"
QDQ_ONNX = "head.qdq.onnx"
CACHE = "head.calib.cache"
SCRIPT = "build_engine.sh"
VERIFY = "verify_on_board.py"
README = "README.md"
GOLDEN_DIR = "golden"
ENGINE = "head.engine"
INPUT_NAME, OUTPUT_NAME = "input", "bottleneck"
BOARD_VERIFY = Path(__file__).with_name("board") / VERIFY
# the Jetson's part of the one board client (client.py, bottlefit.serve.boardclient): the head in TensorRT
BOARD_HEAD_MODULE = Path(__file__).with_name("board") / "boardhead.py"
WORKSPACE_MIB = 1024


@dataclass(frozen=True)
class Request:
    """What the user asked for, resolved against the profile table."""

    profile: Profile
    precision: Precision
    opset: int
    force: bool
    int8_output: bool

    @property
    def routes(self) -> list[str]:
        """Engine routes build_engine.sh offers (and the bundle's README lists), the requested one first. An
        int8 bundle offers both int8 routes: its golden output is the Q/DQ graph's, which a float engine is not
        judged against. A float bundle's golden output is PyTorch fp32, so it offers fp16 and fp32 alike."""
        if self.precision == Precision.INT8:
            return ["qdq", "cache"]
        return [self.precision, Precision.FP32 if self.precision == Precision.FP16 else Precision.FP16]

    @property
    def default_routes(self) -> list[str]:
        """What ``./build_engine.sh`` builds without arguments: the requested precision's routes."""
        return self.routes if self.precision == Precision.INT8 else [self.precision]

    def describe(self) -> dict[str, Any]:
        """What ``bottlefit jetson build`` needs to find the profile row and routes again."""
        return {
            "profile": self.profile.name,
            "jetpack": self.profile.jetpack[0],
            "trt_version": self.profile.trt_version,
            "trt_code": self.profile.trt_code,
            "precision": self.precision,
            "routes": self.routes,
            "force": self.force,
            "int8_output": self.int8_output,
        }


def default_opset(profile: Profile) -> int:
    return min(DEFAULT_OPSET, profile.max_opset)


@dataclass(frozen=True)
class JetsonOptions:
    """``--target jetson``: the board and how its engine is built. Defaults come from the profile table."""

    profile: str | None = None  # nano | xavier-nx | orin (required)
    jetpack: str | None = None  # default: the profile's newest supported
    precision: str | None = None  # default: the profile's (fp16 on nano)
    force: bool = False  # build what the profile advises against (int8 on nano)
    build_engine: bool = False  # also build head.engine here (needs tensorrt and a GPU)
    int8_output: bool = False  # the head emits int8 codes (1 byte/element on the wire)
    opset: int | None = None  # default: exporter.onnx.DEFAULT_OPSET, or the profile's maximum if lower


def resolve(options: JetsonOptions) -> Request:
    """The request from the target's options, or UserError with the reason it cannot be built."""
    if not options.profile:
        raise UserError(f"--target jetson needs --profile {{{','.join(names())}}}")
    profile = get_profile(options.profile, options.jetpack)
    precision = options.precision or profile.default_precision
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of: {', '.join(PRECISIONS)}")
    force = options.force
    opset = options.opset or default_opset(profile)
    check_opset(opset)
    if opset > profile.max_opset:
        # Not forceable: the board's parser cannot read a newer opset at all.
        raise UserError(
            f"--opset {opset}: {profile.describe()} parses ONNX opsets up to {profile.max_opset}; "
            f"export with --opset {profile.max_opset} or lower"
        )
    reasons = check_request(profile, precision, opset, force=force)
    if reasons and not force:
        raise UserError("; ".join(reasons))
    int8_output = options.int8_output
    if int8_output:
        if precision != Precision.INT8:
            raise UserError(f"--int8-output needs an int8 engine; --precision is {precision}")
        if not profile.int8_export_numeric:
            raise UserError(
                f"--int8-output: on {profile.describe()} trtexec writes int8 outputs as raw bytes, so the board "
                "cannot verify them; keep float outputs on this board"
            )
    return Request(profile, Precision(precision), opset, force, int8_output)


def lint_or_fail(path: Path, profile: Profile, log: Callable[[str], object] = print) -> list[str]:
    """Lint one shipped ONNX for the profile: errors stop the export (UserError naming node, op and reason);
    warnings are logged and returned for the manifest."""
    issues = lint_onnx(onnx.load(str(path)), profile)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{path.name}: TensorRT {profile.trt_version} on {profile.name} cannot use it: "
                        f"{errors[0]}{more}")
    warnings = [str(i) for i in issues]
    for w in warnings:
        log(f"lint {path.name}: {w}")
    return warnings


def cache_scales(onnx_path: Path, scales: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Cache entries for the tensors TensorRT will name in ``onnx_path``: the graph input(s), then every node
    output in graph order (the bottleneck included). Returns (scales, names without a calibrated scale)."""
    model = onnx.load(str(onnx_path))
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    names += [o for n in model.graph.node for o in n.output if o]
    out = {n: float(scales[n]) for n in names if n in scales}
    return out, [n for n in names if n not in scales]


def golden_tolerances(overrides: Mapping[tuple[str | None, str], float]) -> dict[str, dict[str, float]]:
    """parity's bottleneck tolerances per precision (with the user's --tolerance overrides), in the
    golden format's key names: the board judges an engine by the same numbers parity uses here."""
    from bottlefit.parity.tolerances import tolerances_for

    out: dict[str, dict[str, float]] = {}
    for precision in PRECISIONS:
        tols = tolerances_for(ENGINE, precision, dict(overrides))
        out[precision] = {m.split(".", 1)[1]: t.value for m, t in tols.items() if m.startswith("bottleneck.")}
    return out


def _route_docs(req: Request) -> str:
    """One line per route build_engine.sh offers (the README lists exactly those)."""
    p = req.profile
    docs = {
        "qdq": f"explicit int8 from `{QDQ_ONNX}` (scales inside the ONNX; the format TensorRT 10+ keeps)",
        "cache": f"implicit int8 from `{HEAD_ONNX}` + `{CACHE}` (header TRT-{p.trt_code}: TensorRT ignores a cache "
                 "whose header does not match its version exactly)",
        "fp16": f"`{HEAD_ONNX}` in fp16 (trtexec --fp16), no quantization",
        "fp32": f"`{HEAD_ONNX}` in fp32, the reference engine" + (" (--noTF32)" if p.tf32 else ""),
    }
    return "\n".join(f"- `{r}`: {docs[r]}" for r in req.routes)


def _readme(req: Request, files: list[str]) -> str:
    from bottlefit.targets.jetson.trtexec import engine_path

    p = req.profile
    routes = " ".join(req.routes)
    default = " ".join(req.default_routes)
    forced = " (forced: the GPU has no int8 kernels)" if req.precision == Precision.INT8 and not p.fast_int8 else ""
    return f"""# BottleFit head for Jetson {p.name}

Made for {p.describe()}; engine precision {req.precision}{forced}; ONNX opset {req.opset}.
Build the engine on the board itself: an engine only runs on the TensorRT version and GPU that built it.

## On the board

Copy this `jetson/` folder (`OUT/jetson/`, where `OUT` is the export's `--out`; the demo's is
`out/demo/export/jetson/`) to a board flashed with JetPack {p.jetpack[0]}, whose own `python3` ({p.board_python})
runs the scripts: no venv and nothing from pip (they need Python 3.6 or newer; `{VERIFY}` the standard library
only, `client.py` numpy too, from JetPack's apt):

```
scp -r OUT/jetson user@board:bottlefit-head     # on the host: the whole jetson/ folder
ssh user@board
cd ~/bottlefit-head
./{SCRIPT}            # routes: {routes} (default: {default}); or ./{SCRIPT} {req.routes[-1]}
sudo apt install -y python3-numpy                # only for client.py
python3 client.py --server http://EDGE:8000 --engine {engine_path(req.routes[0])} --golden   # run split
```

Each route builds `engines/head.<route>.engine` with trtexec ({p.build_only_flag}), runs it once on
`{GOLDEN_DIR}/input.*.bin` and checks the output against the host's golden output with `{VERIFY}`
(python3 {p.board_python}). Exit 0 = PASS, 1 = a route failed, 2 = usage/missing files.
trtexec is looked up at `/usr/src/tensorrt/bin/trtexec`; set `TRTEXEC=/path/to/trtexec` otherwise.
`client.py` sends the engine's bottleneck to `bottlefit serve OUT` on `EDGE` (or Triton) and prints the top-k
classes with their softmax probabilities; its flags are the host's `bottlefit run-head`'s (`--wire
int8|context|fp32`, `--model-name`; the old `--codec`, `--fp32` and `--model` still work for one release).
`--bottleneck FILE` sends a head output you already have: float32 (`.bin`, `.npy`, trtexec JSON) or the int8
codes themselves (a `.bin` of one byte per element, an int8 `.npy`). `client.py` is the same on every board;
`boardhead.py` is this board's part (TensorRT through trtexec), `client.json` the head's wire contract.

Routes (each checked against `{GOLDEN_DIR}/` with that precision's tolerances):

{_route_docs(req)}

## Files

{chr(10).join(f"- `{f}`" for f in files)}

`manifest.json` records every file's sha256, the wire contract of the head's output and the parity results;
`report.json` / `report.md` hold the host-side parity verdict.
"""


class JetsonTarget:
    name = "jetson"
    summary = "NVIDIA Jetson (TensorRT): head.onnx, symmetric int8 head.qdq.onnx, TensorRT calibration cache, " \
              "build recipe and golden I/O for the board"
    options_type = JetsonOptions
    emulates = False  # TensorRT runs on the board's GPU only

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # No argparse choices: an unknown profile is refused by validate() as one line and exit 2.
        # One flag for every target's board (the rpi target reads it too): each target checks its own names.
        parser.add_argument("--profile", metavar="BOARD",
                            help="the board: jetson " + "|".join(names()) + " (required for --target jetson); "
                                 "rpi pi4|pi5|pi3|zero2 (default pi4)")
        parser.add_argument("--jetpack", metavar="VERSION",
                            help="jetson target: the board's JetPack (default: the profile's newest supported)")
        parser.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}",
                            help="jetson target: engine precision (default: the profile's; fp16 on nano)")
        parser.add_argument("--force", action="store_true",
                            help="jetson target: build what the profile advises against (int8 on nano)")
        parser.add_argument("--build-engine", action="store_true",
                            help="jetson target: also build head.engine here (needs tensorrt and a GPU)")
        parser.add_argument("--int8-output", action="store_true",
                            help="jetson target: the head emits int8 codes (1 byte/element on the wire)")

    def validate(self, options: JetsonOptions) -> None:
        resolve(options)
        if options.build_engine:
            # Refused before the export work starts (exit 3): this machine cannot run TensorRT.
            from bottlefit.runtimes import RuntimeUnavailable
            from bottlefit.runtimes.tensorrt import import_tensorrt

            import_tensorrt()
            if not torch.cuda.is_available():
                raise RuntimeUnavailable("--build-engine: TensorRT is installed but no CUDA GPU is visible")

    def needs(self, options: JetsonOptions) -> Needs:
        """head.qdq.onnx and the TensorRT cache are in every bundle (whatever the engine's precision)."""
        return Needs(calibration=True, int8_head=True)

    def build(self, ctx: BuildContext) -> BuildResult:
        req = resolve(ctx.options)
        ctx.log(f"jetson: {req.profile.describe()}, precision {req.precision}, opset {req.opset}, "
                f"routes {req.routes}")
        head, in_spec, head_warnings = self._fp32_head(ctx, req)
        qdq, q, out_spec = self._qdq_head(ctx, req, in_spec, head.output_shape)
        arts = [qdq, self._head_artifact(req, head, in_spec, head_warnings), self._cache(ctx, req, q)]
        arts += self._golden(ctx, req, in_spec, out_spec, q.output_scale)
        arts += self._board_scripts(Path(ctx.out_dir), req)
        if ctx.options.build_engine:
            arts.append(self._engine(ctx, req, in_spec, out_spec, Path(ctx.out_dir)))
        arts += self._board_client(ctx, req, arts)
        return ctx.result(arts)

    def _fp32_head(self, ctx: BuildContext, req: Request) -> tuple[Any, TensorSpec, list[str]]:
        """head.onnx (fp32) only: parity runs the PyTorch tail, and the board never sees tail.onnx."""
        x = torch.randn(1, *ctx.split.card.input_shape, generator=torch.Generator().manual_seed(0))
        ctx.log(f"exporting {HEAD_ONNX} (opset {req.opset})")
        h = export_onnx(ctx.split.head, x, Path(ctx.out_dir) / HEAD_ONNX, req.opset, INPUT_NAME, OUTPUT_NAME)
        warnings = lint_or_fail(Path(ctx.out_dir) / HEAD_ONNX, req.profile, ctx.log)
        return h, TensorSpec(INPUT_NAME, h.input_shape, "float32", Layout.NCHW), warnings

    def _head_artifact(self, req: Request, h: Any, in_spec: TensorSpec, warnings: list[str]) -> Artifact:
        return Artifact(HEAD_ONNX, Role.HEAD, Runtime.ONNXRUNTIME, Precision.FP32, [in_spec],
                        [TensorSpec(OUTPUT_NAME, h.output_shape, "float32", Layout.NCHW)],
                        extra={"opset": req.opset, "jetson": req.describe(), "lint_warnings": warnings,
                               "export_max_abs_error": h.max_abs_error})

    def _qdq_head(self, ctx: BuildContext, req: Request, in_spec: TensorSpec,
                  shape: tuple[int, ...]) -> tuple[Artifact, Any, TensorSpec]:
        """head.qdq.onnx: symmetric int8 Q/DQ from our calibration ranges (every zero point 0)."""
        from bottlefit.exporter.qdq import quantize_head

        out = Path(ctx.out_dir)
        images = np.ascontiguousarray(ctx.calibration.images, dtype=np.float32)
        ctx.log(f"quantizing {QDQ_ONNX}: symmetric int8, per-channel weights, {ctx.observer} over {len(images)} "
                "images")
        # the TensorRT cache names the tensors of the shipped head.onnx: the int8 source keeps every name
        with ctx.int8_onnx_source(out / HEAD_ONNX, req.opset, INPUT_NAME, OUTPUT_NAME) as source:
            q = quantize_head(source, out / QDQ_ONNX, images, ctx.int8_head, ctx.observer,
                              symmetric=True, per_channel=True, output_int8=req.int8_output)
        warnings = lint_or_fail(out / QDQ_ONNX, req.profile, ctx.log)
        if req.int8_output:
            out_spec = TensorSpec(OUTPUT_NAME, shape, "int8", Layout.NCHW, q.output_scale, 0)
        else:
            out_spec = TensorSpec(OUTPUT_NAME, shape, "float32", Layout.NCHW)
        art = Artifact(QDQ_ONNX, Role.HEAD, Runtime.ONNXRUNTIME, Precision.INT8, [in_spec], [out_spec],
                       quantization=q.quantization_record(ctx.split.head_module_path, ctx.calibration.describe()),
                       extra={"opset": req.opset, "jetson": req.describe(), "lint_warnings": warnings,
                              "route": "qdq", "output_scale": q.output_scale})
        return art, q, out_spec

    def _cache(self, ctx: BuildContext, req: Request, q: Any) -> Artifact:
        """TensorRT's native cache from the same scales, keyed by the tensor names of the shipped head.onnx."""
        from bottlefit.calibration.trt_cache import write_cache

        out, p = Path(ctx.out_dir), req.profile
        scales, uncovered = cache_scales(out / HEAD_ONNX, q.activation_scales)
        if uncovered:
            # Not an error for TensorRT: layers touching these tensors fall back to fp16/fp32.
            ctx.log(f"warning: no int8 scale for {len(uncovered)} tensor(s) of {HEAD_ONNX}: {', '.join(uncovered)}")
        write_cache(out / CACHE, p.trt_code, scales)
        onnx_sha = sha256_file(out / HEAD_ONNX)
        ctx.log(f"wrote {CACHE}: TRT-{p.trt_code}, {len(scales)} tensors, bound to {HEAD_ONNX} {onnx_sha[:12]}…")
        return Artifact(CACHE, Role.AUX, Runtime.NONE, Precision.INT8,
                        quantization={"format": "tensorrt-calibration-cache", "observer": ctx.observer,
                                      "scales": scales, "uncovered": uncovered},
                        extra={"binds": {"onnx": HEAD_ONNX, "onnx_sha256": onnx_sha}, "trt_code": p.trt_code,
                               "jetson": req.describe()},
                        parity=False)

    def _golden(self, ctx: BuildContext, req: Request, in_spec: TensorSpec, out_spec: TensorSpec,
                output_scale: float) -> list[Artifact]:
        """Golden I/O: one held-out image (trtexec loads exactly one static batch). The int8 engine is compared
        with what the Q/DQ graph means (ONNX spec semantics), never with this host's fused int8 kernels: on x86
        without VNNI those saturate, and TensorRT does not."""
        from bottlefit.runtimes.head import run_head
        from bottlefit.targets.jetson.trtexec import write_golden

        out, held = Path(ctx.out_dir), ctx.heldout
        gx = np.ascontiguousarray(held.images[:1], dtype=np.float32)
        if req.precision == Precision.INT8:
            qdq_art = Artifact(QDQ_ONNX, Role.HEAD, Runtime.ONNXRUNTIME, Precision.INT8, [in_spec], [out_spec])
            gz = run_head(qdq_art, out, gx, reference=True)
            golden_ref = f"{QDQ_ONNX} under ONNX spec semantics (ONNX Runtime, graph optimizations off)"
        else:
            with torch.no_grad():
                gz = ctx.split.head(torch.from_numpy(gx.copy())).numpy()
            golden_ref = "PyTorch fp32 head"
        write_golden(out / GOLDEN_DIR, {INPUT_NAME: gx}, {OUTPUT_NAME: gz}, golden_tolerances(ctx.tolerance_overrides),
                     output_scales={OUTPUT_NAME: output_scale}, made_with=golden_ref)
        ctx.log(f"golden I/O: 1 held-out image ({held.names[0]}), reference = {golden_ref}")
        files = sorted(f"{GOLDEN_DIR}/{f.name}" for f in (out / GOLDEN_DIR).iterdir())
        return [Artifact(f, Role.AUX, Runtime.NONE, req.precision,
                         extra={"reference": golden_ref, "image": held.names[0]}, parity=False) for f in files]

    def _board_client(self, ctx: BuildContext, req: Request, arts: list[Artifact]) -> list[Artifact]:
        """The int8 head's codec tables, then the one bundle writer (bottlefit.serve.export): client.py (Python
        3.6, stdlib + numpy: the bottleneck to `bottlefit serve` or Triton) with this board's boardhead.py
        (TensorRT through trtexec), its transport and coder, client.json and README.md."""
        from bottlefit.serve.export import BoardBundle, write_board_bundle, write_codec_tables

        out, card = Path(ctx.out_dir), ctx.split.card
        heads = [a for a in arts if a.file == QDQ_ONNX]
        tables = write_codec_tables(out, self.name, card, heads, ctx.calibration.images, ctx.log)
        golden = next((a.file for a in arts if a.file.startswith(f"{GOLDEN_DIR}/") and INPUT_NAME in a.file), None)
        bundle = BoardBundle("", BOARD_HEAD_MODULE, config={"golden_input": golden}, precision=req.precision)
        shipped = write_board_bundle(out, self.name, card, bundle, heads, tables,
                                     lambda files: _readme(req, [a.file for a in [*arts, *tables]] + files))
        return tables + shipped

    def _board_scripts(self, out: Path, req: Request) -> list[Artifact]:
        """build_engine.sh (trtexec lines for the profile) and the board's stdlib-only verifier."""
        from bottlefit.targets.jetson.trtexec import DEFAULT_FILES, render_build_script

        p = req.profile
        files = dict(DEFAULT_FILES, inputs=[INPUT_NAME], golden_dir=GOLDEN_DIR)
        script = render_build_script(p, req.routes, files, workspace_mib=WORKSPACE_MIB,
                                     int8_output=req.int8_output, force=req.force, default_routes=req.default_routes)
        (out / SCRIPT).write_text(script, encoding="utf-8")
        os.chmod(out / SCRIPT, executable_mode())  # the umask's say, like every file of the export
        shutil.copyfile(BOARD_VERIFY, out / VERIFY)
        os.chmod(out / VERIFY, executable_mode())
        board = {"profile": p.name, "jetpack": p.jetpack[0], "trt_version": p.trt_version}
        return [Artifact(SCRIPT, Role.AUX, Runtime.NONE, req.precision, extra={**board, "routes": req.routes},
                         parity=False),
                Artifact(VERIFY, Role.AUX, Runtime.NONE, req.precision, extra={"python": p.board_python},
                         parity=False)]

    def _engine(self, ctx: BuildContext, req: Request, in_spec: TensorSpec, out_spec: TensorSpec,
                out: Path) -> Artifact:
        """head.engine through the TensorRT Python API (qdq route for int8): runs only on this GPU."""
        from bottlefit.targets.jetson.engine import build_engine

        route = req.routes[0]
        onnx_file = QDQ_ONNX if route == "qdq" else HEAD_ONNX
        ctx.log(f"building {ENGINE} with TensorRT ({route} route, {req.precision})")
        build_engine(out / onnx_file, out / ENGINE, req.profile, req.precision, workspace_mib=WORKSPACE_MIB,
                     force=req.force)
        # The Q/DQ graph ends in QuantizeLinear under --int8-output: the engine then emits the int8 codes.
        spec = out_spec if route == "qdq" else TensorSpec(OUTPUT_NAME, out_spec.shape, "float32", Layout.NCHW)
        return Artifact(ENGINE, Role.HEAD, Runtime.TENSORRT, req.precision, [in_spec], [spec],
                        extra={"route": route, "onnx": onnx_file, "jetson": req.describe(),
                               "note": "built on this host's GPU and TensorRT; build on the board for the board"})

    def start_execution(self, target_dir: Path, artifacts: list[Artifact], emulate: Emulate,
                        log: Callable[[str], object]) -> Finished:
        """TensorRT runs on the board's GPU only (there is no emulator for it): say so, and how it is checked."""
        jetson = next((a.extra["jetson"] for a in artifacts if a.file == QDQ_ONNX), None)
        if jetson is None:
            return Finished()
        note = (f"TensorRT {jetson['trt_version']} on the board: ./{SCRIPT} builds each route and checks it against "
                f"{GOLDEN_DIR}/ (made under ONNX spec semantics) with {VERIFY}")
        isa = f"Jetson {jetson['profile']} GPU (TensorRT {jetson['trt_version']})"
        return Finished([Execution(QDQ_ONNX, Runtime.TENSORRT, Where.BOARD, isa, False, Status.NOT_RUN, {}, note)])


TARGET = JetsonTarget()
