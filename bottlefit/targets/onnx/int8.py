"""``--target onnx --int8``: head.int8.onnx, a Q/DQ int8 head for ONNX Runtime on CPUs (x86, ARM).

Float in, float out (the graph ends in DequantizeLinear), so it drops in for head.onnx. Activations are
asymmetric uint8 (ONNX Runtime's CPU kernels are U8S8; a ReLU folds into its conv's zero point), weights
symmetric int8 per output channel. Ranges come from our observers on the calibration set (``--calib``,
``--calib-count``, ``--observer``); the standalone BatchNorm after the max-pool is rewritten as a depthwise
conv (bottlefit.exporter.qdq), without which the int8 head ran slower than fp32.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from bottlefit.exporter.artifact import Artifact, Layout, Precision, Role, Runtime, TensorSpec
from bottlefit.exporter.qdq import quantize_head
from bottlefit.targets import BuildContext

INT8_FILE = "head.int8.onnx"
SYMMETRIC = False  # CPU kernels: asymmetric uint8 activations. TensorRT (symmetric) is the Jetson target's.


def _spec(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim)


def build_int8_head(ctx: BuildContext, fp32_head_path: Path, opset: int) -> Artifact:
    observer = ctx.observer
    calib = ctx.calibration
    ctx.log(f"quantizing {fp32_head_path.name} -> {INT8_FILE}: observer {observer} on {len(calib)} calibration "
            f"images; activations {'int8 symmetric' if SYMMETRIC else 'uint8 asymmetric'} per tensor, "
            "weights int8 symmetric per channel")
    head = ctx.int8_head
    with ctx.int8_onnx_source(fp32_head_path, opset, "input", "bottleneck") as source:
        res = quantize_head(source, ctx.out_dir / INT8_FILE, calib.images, head, observer,
                            symmetric=SYMMETRIC, per_channel=True, output_int8=False)
    if res.rewritten_nodes:
        ctx.log(f"rewrote {', '.join(res.rewritten_nodes)} (BatchNorm after the max-pool) as an exact 1x1 "
                "depthwise conv so it runs as an int8 conv")
    model = onnx.load(str(res.path), load_external_data=False)
    inp = next(i for i in model.graph.input if i.name == res.input_name)
    out = next(o for o in model.graph.output if o.name == res.output_name)
    # manifest readers want model paths ("bottleneck.encoder.4"), not paths inside the head
    quant = res.quantization_record(ctx.split.head_module_path, calib.describe())
    return Artifact(
        INT8_FILE, Role.HEAD, Runtime.ONNXRUNTIME, Precision.INT8,
        [TensorSpec(res.input_name, _spec(inp), "float32", Layout.NCHW)],
        [TensorSpec(res.output_name, _spec(out), "float32", Layout.NCHW)],
        quantization=quant,
        extra={"opset": opset, "format": "qdq", "from": fp32_head_path.name},
    )
