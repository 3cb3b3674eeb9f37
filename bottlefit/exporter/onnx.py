"""fp32 ONNX export: static shapes, named tensors, simplified, one self-contained file, checked in ORT."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bottlefit.errors import UserError, VerificationError
from bottlefit.files import atomic_write_bytes

# The opset table, one source for every target. The legacy (TorchScript) exporter writes exactly the opset asked
# for; the dynamo exporter in torch 2.14 silently writes 18 (docs/tensorrt.md).
MIN_OPSET, MAX_OPSET = 11, 17  # what --opset accepts
MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) arrived in opset 13: every int8 Q/DQ head
# Every target's default: the oldest opset with per-channel Q/DQ, and the newest TensorRT 8.2 (Jetson Nano, the
# oldest parser a profile names) reads; nothing here needs newer ops. A Jetson profile may cap it (max_opset).
DEFAULT_OPSET = MIN_QDQ_OPSET

# The legacy exporter names each node by the module that emitted it: /encoder/encoder.4/BatchNormalization.
_SCOPE = re.compile(r"^/((?:[\w.]+/)*)([\w.]+)/[A-Za-z]+(?:_\d+)?$")


def module_of(node_name: str) -> str | None:
    """``/encoder/encoder.4/BatchNormalization`` -> ``encoder.4``; None for nodes no module owns."""
    m = _SCOPE.match(node_name)
    return m.group(2) if m else None


@dataclass
class OnnxExport:
    path: Path
    opset: int
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_abs_error: float  # ORT vs PyTorch on the example input


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset} is not supported: the exporter writes opsets {MIN_OPSET}–{MAX_OPSET} "
                        f"({DEFAULT_OPSET} for Jetson Nano / TensorRT 8.2, 17 for TensorRT 8.5+)")
    return opset


def to_onnx_model(module: nn.Module, example: torch.Tensor, opset: int, input_name: str,
                  output_name: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=[output_name], do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    return simplify(model)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise VerificationError("onnxsim could not validate the simplified model")
    onnx.checker.check_model(simplified)
    return simplified


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Atomically write one self-contained file (no external data: the whole proto, serialized in memory)."""
    return atomic_write_bytes(path, model.SerializeToString())


def ort_run(path: Path | bytes, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = path if isinstance(path, bytes) else str(path)
    sess = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@torch.no_grad()
def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str,
                output_name: str) -> OnnxExport:
    check_opset(opset)
    module.eval()
    model = to_onnx_model(module, example, opset, input_name, output_name)
    save_onnx(model, path)
    expected = module(example.clone()).numpy()
    got = ort_run(path, {input_name: example.numpy()})[0]
    err = float(np.abs(got - expected).max())
    return OnnxExport(path, opset, input_name, output_name, tuple(example.shape), tuple(expected.shape), err)
