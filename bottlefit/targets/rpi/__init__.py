"""Raspberry Pi target (64-bit Raspberry Pi OS, CPU only).

Writes ``head.int8.tflite`` (full-integer, for ai-edge-litert + XNNPACK), ``head.fp32.tflite``,
``head.int8.onnx`` (ONNX Runtime) and ``board/`` (runner, verifier, golden I/O made on this host).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bottlefit.errors import UserError, VerificationError
from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Artifact, TensorSpec
from bottlefit.targets.rpi.head_rewrite import rewrite_head
from bottlefit.targets.rpi.tflite import OBSERVERS

BOARD_DIR = Path(__file__).parent / "board"
BOARD_FILES = ("run_head.py", "verify_on_board.py", "README.md")
GOLDEN_COUNT = 4
REWRITE_TOL = 1e-4  # relative to the head output's magnitude; the rewrite is exact up to float32 rounding
# host LiteRT vs board LiteRT on the same int8 file: kernels may differ by 1 LSB (XNNPACK x86 vs ARM)
GOLDEN_TOLERANCES = {"max_abs_lsb": 2.0, "cosine_min": 0.999}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RpiTarget:
    name = "rpi"
    summary = "Raspberry Pi (64-bit OS): full-int8 TFLite for ai-edge-litert/XNNPACK, int8 ONNX for ONNX Runtime"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc",
                            help="I/O layout of the .tflite heads (nhwc: no transposes in the graph)")
        parser.add_argument("--allow-float-ops", action="store_true",
                            help="accept an int8 head that keeps float ops instead of failing")
        if "--observer" not in parser._option_string_actions:  # another part of the command may own it
            parser.add_argument("--observer", choices=OBSERVERS, default="minmax",
                                help="activation range observer for calibration (default: min/max)")

    def validate(self, options: argparse.Namespace, card: Any) -> None:
        from bottlefit.targets.rpi.tflite import require_litert_torch

        require_litert_torch()
        if getattr(options, "layout", "nhwc") not in ("nhwc", "nchw"):
            raise UserError(f"--layout {options.layout!r}: choose nhwc or nchw")
        if len(tuple(card.input_shape)) != 3:
            raise UserError(f"the rpi target needs a C x H x W image input, the card says {card.input_shape}")

    def build(self, ctx: Any) -> list[Artifact]:
        from bottlefit.targets.rpi.onnx_int8 import export_onnx_int8
        from bottlefit.targets.rpi.tflite import export_tflite

        opts = ctx.options
        layout = str(getattr(opts, "layout", "nhwc")).upper()
        observer = getattr(opts, "observer", None) or "minmax"
        allow_float = bool(getattr(opts, "allow_float_ops", False))
        card = ctx.split.card
        out = Path(ctx.out_dir)
        images = np.ascontiguousarray(ctx.calibration.images, dtype=np.float32)
        calib = {"count": len(images), "sha256": ctx.calibration.sha256, "source": ctx.calibration.source}

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

        ctx.log(f"rpi: head.int8.tflite (PT2E, {observer} ranges over {len(images)} images, {layout} I/O)")
        i8 = export_tflite(rw, images, out / "head.int8.tflite", int8=True, layout=layout, observer=observer,
                           allow_float_ops=allow_float, log=ctx.log)
        ctx.log(f"rpi: {len(i8.float_ops)} float ops; ops {' '.join(i8.ops)}")
        f32 = export_tflite(rw, images, out / "head.fp32.tflite", int8=False, layout=layout, log=ctx.log)
        ctx.log("rpi: head.int8.onnx (ONNX Runtime, our ranges)")
        ox = export_onnx_int8(rw.module, images, out / "head.int8.onnx", observer=observer)

        arts = [
            Artifact("head.int8.tflite", "head", "litert", "int8", i8.inputs, i8.outputs,
                     quantization={"method": "pt2e-static", "observer": observer,
                                   "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor affine",
                                   "float_ops": len(i8.float_ops),
                                   "float_op_list": [f.describe() for f in i8.float_ops], "calibration": calib},
                     extra={"layout": layout, "ops": i8.ops, "rewrite": rewrite, "converter": "litert-torch"}),
            Artifact("head.fp32.tflite", "head", "litert", "fp32", f32.inputs, f32.outputs,
                     extra={"layout": layout, "ops": f32.ops, "rewrite": rewrite, "converter": "litert-torch"}),
            Artifact("head.int8.onnx", "head", "onnxruntime", "int8", ox.inputs, ox.outputs,
                     quantization={"method": "ort-quantize_static", "variant": ox.variant, "observer": observer,
                                   "weights": "int8 per-channel symmetric", "calibration": calib,
                                   "ranges": {k: list(v) for k, v in ox.ranges.items()}},
                     extra={"opset": 13, "ops": ox.ops, "rewrite": rewrite}),
        ]
        arts += self._board_bundle(out, card, i8.inputs[0], i8.outputs[0], getattr(opts, "images", None), ctx.log)
        for a in arts:
            a.sha256 = _sha256(out / a.file)
        return arts

    def _board_bundle(
        self, out: Path, card: Any, in_spec: TensorSpec, out_spec: TensorSpec, images: str | None, log: Any
    ) -> list[Artifact]:
        from bottlefit.exporter.export import heldout_images
        from bottlefit.runtimes.litert import LiteRTRunner

        board = out / "board"
        board.mkdir(exist_ok=True)
        for f in BOARD_FILES:
            shutil.copyfile(BOARD_DIR / f, board / f)
        # The same held-out images parity judges on (never the calibration images).
        held = heldout_images(card, images, GOLDEN_COUNT, log)
        runner = LiteRTRunner(out / "head.int8.tflite", num_threads=1)
        xs = [wire.encode(in_spec, held.images[i : i + 1]) for i in range(len(held))]
        ys = [runner.infer({in_spec.name: x})[out_spec.name] for x in xs]
        np.save(board / "golden_inputs.npy", np.concatenate(xs))
        np.save(board / "golden_outputs.npy", np.concatenate(ys))
        golden = {
            "format": "bottlefit-golden",
            "format_version": 1,
            "model": "../head.int8.tflite",
            "input": in_spec.to_dict(),
            "output": out_spec.to_dict(),
            "inputs_file": "golden_inputs.npy",
            "outputs_file": "golden_outputs.npy",
            "names": list(held.names),
            "made_with": "ai-edge-litert on the export host",
            "tolerances": dict(GOLDEN_TOLERANCES),
            "preprocess": {"resize": int(card.resize), "crop": [int(card.input_shape[1]), int(card.input_shape[2])],
                           "mean": list(card.mean), "std": list(card.std)},
        }
        (board / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
        files = [f"board/{f}" for f in (*BOARD_FILES, "golden.json", "golden_inputs.npy", "golden_outputs.npy")]
        return [Artifact(f, "aux", "none", "int8", parity=False) for f in files]


TARGET = RpiTarget()
