"""``--target onnx --int8``: head.int8.onnx, a Q/DQ int8 head for ONNX Runtime on CPUs (x86, ARM).

Float in, float out (the graph ends in DequantizeLinear), so it drops in for head.onnx. Activations are
asymmetric uint8 (ONNX Runtime's CPU kernels are U8S8; a ReLU folds into its conv's zero point), weights
symmetric int8 per output channel. Ranges come from our observers on the calibration set (``--calib``,
``--calib-count``, ``--observer``); the standalone BatchNorm after the max-pool is rewritten as a depthwise
conv (bottlefit.exporter.qdq), without which the int8 head ran slower than fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from bottlefit.calibration.observers import make_observer
from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact, TensorSpec
from bottlefit.exporter.qdq import quantize_head
from bottlefit.targets import BuildContext

INT8_FILE = "head.int8.onnx"
SYMMETRIC = False  # CPU kernels: asymmetric uint8 activations. TensorRT (symmetric) is the Jetson target's.
MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (the axis attribute) arrived in opset 13


def validate(options: argparse.Namespace) -> None:
    """Refuse bad int8 options before any work starts."""
    make_observer(getattr(options, "observer", None) or "minmax")  # UserError naming the choices
    opset = getattr(options, "opset", None)
    if opset is not None and opset < MIN_QDQ_OPSET:
        raise UserError(f"--int8 needs --opset {MIN_QDQ_OPSET} or newer (per-channel Q/DQ); got --opset {opset}")


def _spec(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim)


def build_int8_head(ctx: BuildContext, fp32_head_path: Path, opset: int) -> Artifact:
    validate(ctx.options)
    observer = getattr(ctx.options, "observer", None) or "minmax"
    calib = ctx.calibration
    ctx.log(f"quantizing {fp32_head_path.name} -> {INT8_FILE}: observer {observer} on {len(calib)} calibration "
            f"images; activations {'int8 symmetric' if SYMMETRIC else 'uint8 asymmetric'} per tensor, "
            "weights int8 symmetric per channel")
    res = quantize_head(fp32_head_path, ctx.out_dir / INT8_FILE, calib.images, ctx.split.head, observer,
                        symmetric=SYMMETRIC, per_channel=True, output_int8=False)
    if res.rewritten_nodes:
        ctx.log(f"rewrote {', '.join(res.rewritten_nodes)} (BatchNorm after the max-pool) as an exact 1x1 "
                "depthwise conv so it runs as an int8 conv")
    model = onnx.load(str(res.path), load_external_data=False)
    inp = next(i for i in model.graph.input if i.name == res.input_name)
    out = next(o for o in model.graph.output if o.name == res.output_name)
    quant = res.quantization_record()
    quant["output"] = {"dtype": res.activation_dtype, "scale": res.output_scale, "zero_point": res.output_zero_point}
    # Manifest readers want model paths ("bottleneck.encoder.4"), not paths inside the head.
    quant["tensor_modules"] = {t: ctx.split.head_module_path(m) for t, m in res.tensor_modules.items()}
    quant["calibration_sha256"] = calib.sha256
    return Artifact(
        INT8_FILE, "head", "onnxruntime", "int8",
        [TensorSpec(res.input_name, _spec(inp), "float32", "NCHW")],
        [TensorSpec(res.output_name, _spec(out), "float32", "NCHW")],
        quantization=quant,
        extra={"opset": opset, "format": "qdq", "from": fp32_head_path.name},
    )
