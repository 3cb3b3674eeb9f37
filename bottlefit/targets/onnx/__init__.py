"""``--target onnx``: fp32 head and tail for ONNX Runtime (and, with ``--int8``, an int8 Q/DQ head)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact, Layout, Precision, Role, Runtime, TensorSpec
from bottlefit.exporter.onnx import DEFAULT_OPSET, MIN_QDQ_OPSET, check_opset, export_onnx
from bottlefit.targets import BuildContext, BuildResult, Emulate, Finished, Needs


@dataclass(frozen=True)
class OnnxOptions:
    """``--target onnx``: the opset of head.onnx/tail.onnx, whether to add the int8 head, and whether to write
    the Triton model repository for the tail (``triton/``)."""

    opset: int = DEFAULT_OPSET
    int8: bool = False
    triton: bool = True


def fp32_pair(ctx: BuildContext, opset: int) -> list[Artifact]:
    """head.onnx and tail.onnx (fp32), each checked in ONNX Runtime against PyTorch on a random input."""
    sm, card = ctx.split, ctx.split.card
    x = torch.randn(1, *card.input_shape, generator=torch.Generator().manual_seed(0))
    ctx.log(f"exporting head.onnx (opset {opset})")
    h = export_onnx(sm.head, x, ctx.out_dir / "head.onnx", opset, "input", "bottleneck")
    with torch.no_grad():
        z = sm.head(x)
    ctx.log(f"exporting tail.onnx (opset {opset}; {sum(p.numel() for p in sm.tail.parameters()):,} parameters)")
    t = export_onnx(sm.tail, z, ctx.out_dir / "tail.onnx", opset, "bottleneck", "logits")
    ctx.log(f"ONNX Runtime vs PyTorch: head max abs error {h.max_abs_error:.3g}, tail {t.max_abs_error:.3g}")
    zspec = TensorSpec("bottleneck", h.output_shape, "float32", Layout.NCHW)
    return [
        Artifact("head.onnx", Role.HEAD, Runtime.ONNXRUNTIME, Precision.FP32,
                 [TensorSpec("input", h.input_shape, "float32", Layout.NCHW)], [zspec],
                 extra={"opset": opset, "export_max_abs_error": h.max_abs_error}),
        Artifact("tail.onnx", Role.TAIL, Runtime.ONNXRUNTIME, Precision.FP32, [zspec],
                 [TensorSpec("logits", t.output_shape, "float32", Layout.NONE)],
                 extra={"opset": opset, "export_max_abs_error": t.max_abs_error}),
    ]


def serving_files(ctx: BuildContext, arts: list[Artifact], triton: bool = True) -> list[Artifact]:
    """Split serving's files beside the artifacts: codec tables of the int8 heads (fitted on this export's
    calibration images) and the tail's Triton model repository."""
    from bottlefit.serve.export import write_codec_tables, write_triton

    card = ctx.split.card
    extra = []
    if any(a.role == Role.HEAD and a.precision == Precision.INT8 for a in arts):
        extra += write_codec_tables(ctx.out_dir, "onnx", card, arts,
                                    ctx.calibration.images, ctx.log)
    tail = next((a for a in arts if a.role == Role.TAIL and a.runtime == Runtime.ONNXRUNTIME), None)
    if triton and tail is not None:
        extra += write_triton(ctx.out_dir, "onnx", card, tail, arts, log=ctx.log)
    return extra


class OnnxTarget:
    name = "onnx"
    summary = "fp32 head.onnx + tail.onnx for ONNX Runtime; --int8 adds head.int8.onnx (Q/DQ)"
    options_type = OnnxOptions
    emulates = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--int8", action="store_true", help="onnx target: also write head.int8.onnx")
        parser.add_argument("--no-triton", dest="triton", action="store_false",
                            help="onnx target: skip triton/ (the tail's Triton model repository, a second copy of "
                                 "tail.onnx with a dynamic batch dimension)")

    def validate(self, options: OnnxOptions) -> None:
        check_opset(options.opset)
        if options.int8 and options.opset < MIN_QDQ_OPSET:
            raise UserError(f"--int8 needs --opset {MIN_QDQ_OPSET} or newer (per-channel Q/DQ); "
                            f"got --opset {options.opset}")

    def needs(self, options: OnnxOptions) -> Needs:
        """The fp32 pair is made from the split alone; ``--int8`` calibrates (its ranges, its codec tables)."""
        return Needs(calibration=options.int8, int8_head=options.int8)

    def build(self, ctx: BuildContext) -> BuildResult:
        options: OnnxOptions = ctx.options
        arts = fp32_pair(ctx, options.opset)
        if options.int8:
            from bottlefit.targets.onnx.int8 import build_int8_head

            arts.append(build_int8_head(ctx, ctx.out_dir / "head.onnx", options.opset))
        return ctx.result(arts + serving_files(ctx, arts, triton=options.triton))

    def start_execution(self, target_dir: Path, artifacts: list[Artifact], emulate: Emulate,
                        log: Callable[[str], object]) -> Finished:
        """No device of its own: the host-kernel runs parity records are all there is."""
        return Finished()


TARGET = OnnxTarget()
