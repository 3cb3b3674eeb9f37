"""Raspberry Pi target (64-bit Raspberry Pi OS, CPU only).

Writes ``head.int8.tflite`` (full-integer, for ai-edge-litert + XNNPACK), ``head.fp32.tflite``,
``head.int8.onnx`` (ONNX Runtime), ``head.int8.ncnn.param`` + ``.bin`` (ncnn's int8 scheme,
bottlefit.exporter.ncnn) and ``board/`` (runner, verifier, golden I/O made on this host). The board profile
(profiles.py) names which head the board runs by default, by measured cost.

head.int8.onnx is written by the shared Q/DQ writer (bottlefit.exporter.qdq) from a temporary fp32 ONNX export
of the head (not shipped): QDQ of all ops, per-channel int8 weights, asymmetric INT8 activations (ORT's QDQ
guidance names S8S8 first for ARM; u8 and s8 were within ~7% of each other on x86, bench/bench_rpi_heads.py),
float in and out; on cores without the dot product (Pi 4/3) the board profile runs it with ONNX Runtime's uint8
kernels (session.qdqisint8allowed=0, profiles.ORT_CONFIG: 13% fewer instructions, same outputs).
qdq.py rewrites the BatchNorm after the max-pool as a depthwise conv in the ONNX graph itself;
the torch-level head_rewrite is for the TFLite heads only.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from bottlefit.errors import UserError, VerificationError
from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Artifact, Layout, Precision, Role, Runtime, TensorSpec
from bottlefit.exporter.head_rewrite import rewrite_head
from bottlefit.exporter.onnx import DEFAULT_OPSET
from bottlefit.exporter.qdq import QdqResult
from bottlefit.exporter.split import SplitModel
from bottlefit.targets import BuildContext, BuildResult, Emulate, Needs, Started
from bottlefit.targets.rpi.profiles import DEFAULT as DEFAULT_BOARD
from bottlefit.targets.rpi.profiles import RpiProfile, get_profile

BOARD_DIR = Path(__file__).parent / "board"
ONNX_INT8_FILE = "head.int8.onnx"
NCNN_INT8_FILE = "head.int8.ncnn.param"  # + head.int8.ncnn.bin beside it
ONNX_INPUT, ONNX_OUTPUT = "input", "bottleneck"
# quantize_head options of head.int8.onnx (bench/bench_rpi_heads.py compares the alternatives)
ONNX_INT8_OPTIONS: dict[str, Any] = {"symmetric": False, "activation_dtype": "int8", "per_channel": True}
# the Pi's own board scripts; client.py, boardhttp.py, boardcodec.py, client.json and README.md come from the one
# bundle writer (bottlefit.serve.export.write_board_bundle), boardhead.py (the Pi's part of client.py) from here
BOARD_FILES = ("run_head.py", "verify_on_board.py")
BOARD_HEAD_MODULE = BOARD_DIR / "boardhead.py"
GOLDEN_COUNT = 4
# the heads the board bundle checks -> the stem of their golden files
BOARD_HEADS = {"head.int8.tflite": "golden", ONNX_INT8_FILE: "golden_onnx", NCNN_INT8_FILE: "golden_ncnn"}
REWRITE_TOL = 1e-4  # relative to the head output's magnitude; the rewrite is exact up to float32 rounding
# reference kernels (golden) vs the board's own kernels on the same int8 file: requantization rounds differently
# by 1 LSB (fixed point vs float), measured 0.2% of elements on an R152 head
GOLDEN_TOLERANCES = {"max_abs_lsb": 2.0, "cosine_min": 0.999}


def write_int8_onnx(head: torch.nn.Module, images: np.ndarray, path: Path, observer: str = "minmax") -> QdqResult:
    """``path``: the head as Q/DQ int8 ONNX (``ONNX_INT8_OPTIONS``), calibrated on ``images`` (float32 NCHW)
    with our ``observer``. The fp32 ONNX it is made from lives in a temporary directory."""
    from bottlefit.exporter.onnx import export_onnx
    from bottlefit.exporter.qdq import quantize_head

    with tempfile.TemporaryDirectory(prefix="bottlefit-rpi-onnx-") as tmp:
        example = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32)).clone()
        fp32 = export_onnx(head, example, Path(tmp) / "head.onnx", DEFAULT_OPSET, ONNX_INPUT, ONNX_OUTPUT)
        return quantize_head(fp32.path, path, images, head, observer, **ONNX_INT8_OPTIONS)


def onnx_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    """(inputs, outputs, op types in graph order) of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        dims = tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        return TensorSpec(name=vi.name, shape=dims, dtype=dtype, layout="NCHW" if len(dims) == 4 else "")

    inits = {i.name for i in model.graph.initializer}
    return ([spec(i) for i in model.graph.input if i.name not in inits], [spec(o) for o in model.graph.output],
            [n.op_type for n in model.graph.node])


@dataclass(frozen=True)
class RpiOptions:
    """``--target rpi``: the layout of the .tflite heads' I/O, and whether a float island is acceptable."""

    layout: str = "nhwc"  # nhwc: no transposes in the graph; nchw: the PyTorch layout
    allow_float_ops: bool = False  # accept an int8 head that keeps float ops instead of failing
    # the board (bottlefit.targets.rpi.profiles), by name: the manifest's options record the board the bundle is for.
    # ``--profile`` is one flag shared with the jetson target
    profile: str = DEFAULT_BOARD


def _wire_codes(art: Artifact) -> dict[str, Any] | None:
    """golden.json's "wire": the int8 codes a float-output head puts on the wire (runtimes.head.wire_codes); None
    when the head emits the codes itself (the .tflite)."""
    from bottlefit.runtimes.head import wire_codes

    spec = wire_codes(art)
    return None if spec is None else {"dtype": spec.dtype, "scale": spec.scale, "zero_point": spec.zero_point}


class RpiTarget:
    name = "rpi"
    summary = ("Raspberry Pi (64-bit OS): full-int8 TFLite for ai-edge-litert/XNNPACK, int8 ONNX for ONNX Runtime, "
               "int8 ncnn")
    options_type = RpiOptions
    emulates = True  # --emulate runs this target's board scripts on the board's ISA (the other targets have none)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--layout", choices=("nhwc", "nchw"),
                            help="rpi target: I/O layout of the .tflite heads (default nhwc: no transposes)")
        parser.add_argument("--allow-float-ops", action="store_true",
                            help="rpi target: accept an int8 head that keeps float ops instead of failing")

    def validate(self, options: RpiOptions) -> None:
        from bottlefit.targets.rpi.tflite import require_litert_torch

        require_litert_torch()
        if options.layout not in ("nhwc", "nchw"):
            raise UserError(f"--layout {options.layout!r}: choose nhwc or nchw")
        get_profile(options.profile)

    def needs(self, options: RpiOptions) -> Needs:
        """Every head but head.fp32.tflite is int8, and the fp32 one is converted on the calibration images too."""
        return Needs(calibration=True, int8_head=True)

    def build(self, ctx: BuildContext) -> BuildResult:
        """The heads, the board's choice among them, the codec tables and board/ (in that order: each reads the
        ones before)."""
        opts: RpiOptions = ctx.options
        profile = get_profile(opts.profile)
        ctx.log(f"rpi: board profile {profile.describe()}")
        out = Path(ctx.out_dir)
        images = np.ascontiguousarray(ctx.calibration.images, dtype=np.float32)
        arts = self._tflite_heads(ctx, images, Layout(opts.layout.upper()), opts.allow_float_ops)
        arts += self._onnx_and_ncnn_heads(ctx, images)
        profile = self._board_choice(ctx, profile, arts)
        from bottlefit.serve.export import write_codec_tables

        # the context codec's tables, fitted on this export's calibration codes: the server and board/client.py
        # read them from here
        tables = write_codec_tables(out, "rpi", ctx.split.card, [a for a in arts if a.file in BOARD_HEADS],
                                    images, ctx.log)
        arts += tables
        arts += self._board_bundle(out, ctx.split.card, arts, ctx.heldout, profile, tables)
        return ctx.result(arts)

    def _tflite_heads(self, ctx: BuildContext, images: np.ndarray, layout: Layout,
                      allow_float: bool) -> list[Artifact]:
        """head.int8.tflite (from ``ctx.int8_head``) and head.fp32.tflite (from the split's head), both through the
        head rewrite (proved exact here on the calibration images)."""
        from bottlefit.targets.rpi.tflite import export_tflite

        card, out, observer = ctx.split.card, Path(ctx.out_dir), ctx.observer
        proof = torch.from_numpy(images[: min(4, len(images))])
        rw = rewrite_head(ctx.split.head.encoder, card.bottleneck.module, proof)
        with torch.no_grad():
            ref_mag = float(ctx.split.head(torch.from_numpy(images[:1]).clone()).abs().max())
        assert rw.max_abs_error is not None
        if rw.max_abs_error > REWRITE_TOL * max(1.0, ref_mag):
            raise VerificationError(f"head rewrite changed the output by {rw.max_abs_error:.3g} (> "
                                    f"{REWRITE_TOL:g} x {max(1.0, ref_mag):.3g}); this is a bug in head_rewrite")
        for c in rw.changes:
            ctx.log(f"rpi: {c}")
        ctx.log(f"rpi: rewritten head max abs error {rw.max_abs_error:.2e}")
        rewrite = {"changes": rw.changes, "max_abs_error": rw.max_abs_error, "origin": rw.origin}

        # int8 heads come from the weight-rounded head when the export asks for it; fp32 ones never do
        rw8 = rw if ctx.int8_head is ctx.split.head else rewrite_head(ctx.int8_head.encoder, card.bottleneck.module)
        ctx.log(f"rpi: head.int8.tflite (PT2E, {observer} ranges over {len(images)} images, {layout} I/O)")
        i8 = export_tflite(rw8, images, out / "head.int8.tflite", int8=True, layout=layout, observer=observer,
                           allow_float_ops=allow_float, log=ctx.log)
        ctx.log(f"rpi: {len(i8.float_ops)} float ops; ops {' '.join(i8.ops)}")
        f32 = export_tflite(rw, images, out / "head.fp32.tflite", int8=False, layout=layout, log=ctx.log)
        equalization = getattr(ctx.split.head, "equalization", None)
        return [
            Artifact("head.int8.tflite", Role.HEAD, Runtime.LITERT, Precision.INT8, i8.inputs, i8.outputs,
                     quantization={"method": "pt2e-static", "observer": observer,
                                   "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor affine",
                                   "float_ops": len(i8.float_ops),
                                   "float_op_list": [f.describe() for f in i8.float_ops],
                                   "calibration": ctx.calibration.describe(),
                                   # observer "search": which activations took the Q/DQ heads' searched ranges
                                   **({"range_search": i8.ranges} if i8.ranges else {}),
                                   **({"equalization": equalization} if equalization else {})},
                     extra={"layout": layout, "ops": i8.ops, "rewrite": rewrite, "converter": "litert-torch"}),
            Artifact("head.fp32.tflite", Role.HEAD, Runtime.LITERT, Precision.FP32, f32.inputs, f32.outputs,
                     extra={"layout": layout, "ops": f32.ops, "rewrite": rewrite, "converter": "litert-torch"}),
        ]

    def _onnx_and_ncnn_heads(self, ctx: BuildContext, images: np.ndarray) -> list[Artifact]:
        """head.int8.onnx and, where ncnn's writer can express the head, head.int8.ncnn.param + .bin."""
        out, observer, calib = Path(ctx.out_dir), ctx.observer, ctx.calibration.describe()
        ctx.log(f"rpi: {ONNX_INT8_FILE} (ONNX Runtime Q/DQ, {observer} ranges, asymmetric int8 activations)")
        ox = write_int8_onnx(ctx.int8_head, images, out / ONNX_INT8_FILE, observer)
        if ox.rewritten_nodes:
            ctx.log(f"rpi: {', '.join(ox.rewritten_nodes)} (BatchNorm after the max-pool) -> 1x1 depthwise conv")
        ox_in, ox_out, ox_ops = onnx_specs(ox.path)
        # model paths ("bottleneck.encoder.4"); the mapping needs only the split's card
        ox_quant = ox.quantization_record(functools.partial(SplitModel.head_module_path, ctx.split), calib)
        return [Artifact(ONNX_INT8_FILE, Role.HEAD, Runtime.ONNXRUNTIME, Precision.INT8, ox_in, ox_out,
                         quantization=ox_quant, extra={"opset": DEFAULT_OPSET, "ops": ox_ops, "format": "qdq"}),
                *self._ncnn_head(ctx, images, out, ox_out[0], ox_quant, calib)]

    def _board_choice(self, ctx: BuildContext, profile: RpiProfile, arts: list[Artifact]) -> RpiProfile:
        """The board profile for the heads this export has (its default head, or the cheapest measured one that is
        here). Every artifact records the board's name (``board_profile``); the head the board runs by default
        records the choice and why, with the measured costs (``board_choice``)."""
        chosen = profile.choose({a.file for a in arts})
        if chosen is not profile:
            ctx.log(f"rpi: board profile {chosen.describe()} ({chosen.why.split(';')[0]})")
        for a in arts:
            a.extra["board_profile"] = chosen.name
            if a.file == chosen.model:
                a.extra["board_choice"] = chosen.record()
        return chosen

    def _ncnn_head(self, ctx: BuildContext, images: np.ndarray, out: Path, onnx_out: TensorSpec,
                   onnx_quant: dict[str, Any], calib: dict[str, Any]) -> list[Artifact]:
        """head.int8.ncnn.param + .bin from the head the other int8 heads come from. It emits float (ncnn
        dequantizes each conv's output); its wire codes are head.int8.onnx's output grid, the same calibrated
        quantization of the same bottleneck."""
        from bottlefit.exporter.ncnn import INPUT, OUTPUT, write_ncnn

        ctx.log(f"rpi: {NCNN_INT8_FILE} (ncnn int8: per-channel weights, symmetric {ctx.observer} input scales over "
                f"{len(images)} images, float between convs)")
        try:
            nc = write_ncnn(ctx.int8_head.encoder, images, out / NCNN_INT8_FILE, int8=True, observer=ctx.observer)
        except UserError as e:  # a head ncnn's writer cannot express: the other heads still ship
            ctx.log(f"rpi: no {NCNN_INT8_FILE}: {e}")
            return []
        ins = [TensorSpec(INPUT, (1, *images.shape[1:]), "float32", Layout.NCHW)]
        outs = [TensorSpec(OUTPUT, onnx_out.shape, "float32", Layout.NCHW)]
        wire_grid = onnx_quant.get("output")
        quant = {"method": "ncnn-int8", "weights": "int8 per-channel symmetric (127 / max|w|)",
                 "activations": "int8 per-tensor symmetric at each conv's input (127 / amax), float between",
                 "observer": ctx.observer,
                 "input_scales": nc.input_scales, "calibration": calib,
                 **({"output": {**wire_grid, "from": ONNX_INT8_FILE}} if isinstance(wire_grid, dict) else {})}
        head = Artifact(NCNN_INT8_FILE, Role.HEAD, Runtime.NCNN, Precision.INT8, ins, outs, quantization=quant,
                        extra={"ops": nc.layers, "weights": nc.weights.name, "format": "ncnn param + bin"})
        return [head, Artifact(nc.weights.name, Role.AUX, Runtime.NONE, Precision.INT8, parity=False)]

    def _board_bundle(self, out: Path, card: Any, arts: list[Artifact], heldout: Any,
                      profile: RpiProfile, tables: list[Artifact]) -> list[Artifact]:
        """board/: the golden I/O for every int8 head, made under each head's reference semantics (TFLite reference
        kernels, ONNX spec Q/DQ): never by this host's own int8 kernels, which may deviate; then the board's
        scripts, client and README (the one bundle writer, bottlefit.serve.export)."""
        from bottlefit.models.checkpoint import sha256_file
        from bottlefit.runtimes import get_runner
        from bottlefit.runtimes.head import output_lsb, reference_semantics
        from bottlefit.serve.contract import contract_id, tail_model_name
        from bottlefit.serve.export import BoardBundle, write_board_bundle
        from bottlefit.targets.rpi import bundle_readme

        codec_files = {t.extra["codec_tables"]["head"]: t.file for t in tables}
        board = out / "board"
        board.mkdir(exist_ok=True)
        # The first few of the images parity judges on (never the calibration images).
        gx = heldout.images[:GOLDEN_COUNT]
        models, files = [], []
        for art in (a for a in arts if a.file in BOARD_HEADS):
            runner = get_runner(art.runtime, out / art.file, num_threads=1, reference=True)
            in_spec, out_spec = art.inputs[0], art.outputs[0]
            xs = [wire.encode(in_spec, gx[i : i + 1]) for i in range(len(gx))]
            ys = [runner.infer({in_spec.name: x})[out_spec.name] for x in xs]
            stem = BOARD_HEADS[art.file]
            np.save(board / f"{stem}_inputs.npy", np.concatenate(xs))
            np.save(board / f"{stem}_outputs.npy", np.concatenate(ys))
            files += [f"{stem}_inputs.npy", f"{stem}_outputs.npy"]
            models.append({"model": f"../{art.file}", "runtime": art.runtime, "input": in_spec.to_dict(),
                           "output": out_spec.to_dict(), "lsb": output_lsb(art), "wire": _wire_codes(art),
                           # binds this head's payloads to this export (bottlefit serve refuses other exports')
                           "contract_id": contract_id(card, sha256_file(out / art.file)),
                           "inputs_file": f"{stem}_inputs.npy", "outputs_file": f"{stem}_outputs.npy",
                           "made_with": f"{reference_semantics(art.runtime)} on the export host",
                           "tolerances": dict(GOLDEN_TOLERANCES),
                           # the context codec's tables for this head (bottlefit serve reads the same file)
                           "codec_tables": f"../{codec_files[art.file]}" if art.file in codec_files else None})
        golden = {
            "format": "bottlefit-golden",
            "format_version": 2,
            "default_runtime": profile.runtime,
            # the board profile's choice: run_head.py / verify_on_board.py use its delegate and threads by default
            "default_delegate": profile.delegate,
            "default_threads": profile.threads,
            "profile": profile.record(),
            # the tail server's model (bottlefit serve / Triton) and input name, for board/client.py
            "tail_model": tail_model_name(card),
            "tail_input": "bottleneck",
            "models": models,
            "names": list(heldout.names[:GOLDEN_COUNT]),
            "preprocess": {"resize": int(card.resize), "crop": [int(card.input_shape[1]), int(card.input_shape[2])],
                           "mean": list(card.mean), "std": list(card.std)},
        }
        (board / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
        files += [bundle_readme.write_example(board, gx[:1], card).name]
        heads = [a for a in arts if a.file in BOARD_HEADS]
        text = bundle_readme.render(golden, sorted(a.file for a in arts if a.role == "head"),
                                    bundle_readme.example_what(heldout.names[0], card))
        bundle = BoardBundle("board", BOARD_HEAD_MODULE, tuple(BOARD_DIR / f for f in BOARD_FILES))
        shipped = write_board_bundle(out, "rpi", card, bundle, heads, tables, lambda _: text)
        return shipped + [Artifact(f"board/{f}", Role.AUX, Runtime.NONE, Precision.INT8, parity=False)
                          for f in ("golden.json", *files)]

    def start_execution(self, target_dir: Path, artifacts: list[Artifact], emulate: Emulate,
                        log: Callable[[str], object]) -> Started:
        """The bundle's verify_on_board.py on the Pi's ISA under emulation (bottlefit.targets.rpi.emulated),
        started and not waited for: ``collect()`` for the records, ``cancel()`` when they are no longer wanted, so
        the caller's own work (parity) runs beside the guests."""
        from bottlefit.targets.rpi.emulated import start

        return start(target_dir, [a for a in artifacts if a.file in BOARD_HEADS], emulate, log)


TARGET = RpiTarget()
