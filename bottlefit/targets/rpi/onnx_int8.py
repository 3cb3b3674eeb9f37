"""The head as int8 ONNX for ONNX Runtime on ARM CPUs.

ORT's ``quantize_static`` writes the graph, but the activation ranges are ours: we run the fp32 head ONNX over
our calibration images, feed every float tensor to our range observer, and hand the ranges to ORT as its
calibration cache (``calibration_cache_path``, a ``TensorsData`` JSON), so ORT's own calibrator never runs.

Variants, measured on the rewritten heads (1 thread, interleaved, x86 host; bench/bench_rpi_heads.py): QDQ of
all ops with asymmetric activations was the fastest that kept parity, ~0.7x of the fp32 head's latency
(u8 and s8 activations within ~7% of each other on x86; s8 is the default because ORT's QDQ guidance names
S8S8 first for ARM, untested on a Pi here); conv-only was slower (the Relu/MaxPool between convs stay
float and add Q/DQ pairs), and symmetric
activations slower still (a post-ReLU tensor wastes half the int8 grid and the ReLU is not folded).
Float input, float output: the graph begins with QuantizeLinear and ends with DequantizeLinear, so the board
feeds the normalized image as is. The int8-on-the-wire head is the TFLite one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import TensorSpec
from bottlefit.targets.rpi.tflite import range_observer

OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "bottleneck"

# name -> quantize_static keyword arguments (per-channel int8 weights in all of them)
VARIANTS: dict[str, dict[str, Any]] = {
    "qdq_s8": {"format": "QDQ", "activation_type": "QInt8"},
    "qdq_u8": {"format": "QDQ", "activation_type": "QUInt8"},
    "qdq_s8_conv": {"format": "QDQ", "activation_type": "QInt8", "op_types_to_quantize": ["Conv"]},
    "qdq_s8_sym": {"format": "QDQ", "activation_type": "QInt8", "extra_options": {"ActivationSymmetric": True}},
    "qop_u8": {"format": "QOperator", "activation_type": "QUInt8"},
}
DEFAULT_VARIANT = "qdq_s8"


@dataclass
class OnnxInt8Info:
    variant: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)


def fp32_onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """The head as fp32 ONNX, opset 13, static batch-1 shape, weights inline."""
    with tempfile.TemporaryDirectory(prefix="bottlefit-onnx-") as tmp:
        path = Path(tmp) / "head.onnx"
        # legacy exporter: the dynamo one writes opset 18 and side data files (shared/STACK.md)
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
        )  # fmt: skip
        return path.read_bytes()


def tensor_ranges(model_bytes: bytes, images: np.ndarray, observer: str) -> dict[str, tuple[float, float]]:
    """(lo, hi) of the graph input and of every node output over ``images``, from our observer."""
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    names = [INPUT_NAME] + [o for n in model.graph.node for o in n.output if o]
    present = {o.name for o in model.graph.output}
    for n in names:
        if n not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no graph fusion: the calibrated names must be the ones quantize_static sees
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    observers = {n: range_observer(observer) for n in names}
    for i in range(len(images)):
        x = np.ascontiguousarray(images[i : i + 1], dtype=np.float32)
        observers[INPUT_NAME].update(x)
        for n, v in zip(out_names, sess.run(out_names, {INPUT_NAME: x}), strict=True):
            if n in observers and np.asarray(v).dtype == np.float32:
                observers[n].update(np.asarray(v))
    return {n: tuple(float(r) for r in o.range()) for n, o in observers.items()}  # type: ignore[misc]


def quantize_bytes(model_bytes: bytes, ranges: dict[str, tuple[float, float]], variant: str) -> bytes:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    if variant not in VARIANTS:
        raise UserError(f"unknown ONNX Runtime int8 variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="bottlefit-ortq-") as tmp:
        src, dst, cache = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        src.write_bytes(model_bytes)
        data = {n: (np.float32(lo), np.float32(hi)) for n, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT logs a pre-processing hint per call through the root logger
        try:
            quantize_static(
                str(src), str(dst), None,
                calibration_cache_path=str(cache),
                calibrate_method=CalibrationMethod.MinMax,
                quant_format=getattr(QuantFormat, v["format"]),
                activation_type=getattr(QuantType, v["activation_type"]),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=v.get("op_types_to_quantize"),
                extra_options=dict(v.get("extra_options", {})),
            )  # fmt: skip
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def _specs(model_bytes: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    model = onnx.load_from_string(model_bytes)

    def spec(vi: onnx.ValueInfoProto) -> TensorSpec:
        dims = tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        return TensorSpec(name=vi.name, shape=dims, dtype=dtype, layout="NCHW" if len(dims) == 4 else "")

    return [spec(i) for i in model.graph.input], [spec(o) for o in model.graph.output]


def export_onnx_int8(
    module: nn.Module,
    images: np.ndarray,
    path: Path,
    *,
    observer: str = "minmax",
    variant: str = DEFAULT_VARIANT,
) -> OnnxInt8Info:
    """Write ``path`` (atomically) and describe it. ``images``: float32 NCHW calibration images."""
    example = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32))
    fp32 = fp32_onnx_bytes(module, example)
    ranges = tensor_ranges(fp32, images, observer)
    data = quantize_bytes(fp32, ranges, variant)
    inputs, outputs = _specs(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    return OnnxInt8Info(variant, inputs, outputs, ranges, ops)
