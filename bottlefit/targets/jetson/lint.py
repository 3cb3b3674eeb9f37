"""Static check of an ONNX graph against a Jetson profile's TensorRT ONNX parser, on a host without TensorRT.

Operator facts come from trt_ops.json (read from onnx-tensorrt at each JetPack's pin); the Q/DQ, INT64,
MaxPool and Pad rules are the parser restrictions listed there and in docs/tensorrt.md.
An op missing from the table is an error: the table covers what was verified, not everything TensorRT has.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bottlefit.targets.jetson.profiles import Profile

_OPS_FILE = Path(__file__).with_name("trt_ops.json")
_PAD_MODES = {"8": ("constant", "reflect", "edge"), "10": ("constant", "reflect", "edge", "wrap")}
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class LintIssue:
    node: str  # node name (or "#<index>" when unnamed; "" for model-level issues)
    op: str
    reason: str
    severity: str  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{self.node} ({self.op})" if self.node else self.op
        return f"{self.severity}: {where}: {self.reason}"


@functools.cache
def load_ops_table() -> dict[str, dict[str, dict[str, Any]]]:
    return json.loads(_OPS_FILE.read_text(encoding="utf-8"))


class _Graph:
    """Constant lookup and producers, so rules can read initializers and Constant outputs alike."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.const_types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
                        self.const_types[node.output[0]] = attr.t.data_type

    def weight_of(self, name: str) -> np.ndarray | None:
        """The weight behind a tensor: an initializer, or the one a QuantizeLinear quantizes; None if none."""
        if name in self.consts:
            return self.consts[name]
        prod = self.producer.get(name)
        if prod is not None and prod.op_type == "QuantizeLinear" and prod.input[0] in self.consts:
            return self.consts[prod.input[0]]
        return None


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index}"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


Add = Callable[..., None]  # add(label, op, reason, severity="error"): record one LintIssue


def lint_onnx(model: onnx.ModelProto, profile: Profile) -> list[LintIssue]:
    """Every issue the profile's TensorRT parser would raise (error) or should make you look at (warning)."""
    table = load_ops_table()[profile.ops_key]
    trt = f"TensorRT {profile.ops_key}"
    major = profile.ops_key.split(".")[0]
    issues: list[LintIssue] = []

    def add(label: str, op: str, reason: str, severity: str = "error") -> None:
        issues.append(LintIssue(label, op, reason, severity))

    opset = _model_opset(model)
    if opset > profile.max_opset:
        add(
            "",
            "model",
            f"opset {opset} is above {profile.describe()}'s maximum {profile.max_opset}; re-export",
        )

    g = _Graph(model.graph)
    first_user: dict[str, tuple[str, str]] = {}  # tensor -> (label, op) of its first consumer
    for i, node in enumerate(model.graph.node):
        label = _node_label(node, i)
        for name in node.input:
            first_user.setdefault(name, (label, node.op_type))
        entry = table.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if not entry or not entry.get("supported"):
            domain = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""
            add(
                label,
                node.op_type,
                f"operator{domain} is not in the verified {trt} ONNX parser support table",
            )
            continue
        _check_node(node, label, g, major, trt, add)

    if major == "8":
        _check_int64_initializers(model, first_user, trt, add)
    return issues


def _check_node(node: onnx.NodeProto, label: str, g: _Graph, major: str, trt: str, add: Add) -> None:
    """The attributes of a supported operator that the parser of TensorRT ``major`` still refuses or narrows."""
    if node.op_type in _QDQ:
        _check_qdq(node, label, g, major, trt, add)
    elif node.op_type == "MaxPool":
        if len([o for o in node.output if o]) > 1:
            add(
                label,
                node.op_type,
                f"the Indices (2nd) output is unsupported by {trt}; export MaxPool alone",
            )
        dilations = _attr(node, "dilations")
        if dilations and any(d != 1 for d in dilations):
            add(label, node.op_type, f"dilations {list(dilations)} unsupported by {trt} (must be 1)")
    elif node.op_type == "Pad":
        mode = _attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode not in _PAD_MODES[major if major in _PAD_MODES else "10"]:
            add(label, node.op_type, f"pad mode {mode!r} is unsupported by {trt} ('Unsupported pad mode')")
    elif node.op_type == "Constant" and major == "8" and g.const_types.get(node.output[0]) == TensorProto.INT64:
        add(
            label,
            node.op_type,
            f"INT64 constant: {trt} casts it down to INT32 (check values fit)",
            "warning",
        )


def _check_int64_initializers(model: onnx.ModelProto, first_user: dict[str, tuple[str, str]], trt: str,
                              add: Add) -> None:
    """TensorRT 8 has no INT64: it casts such weights to INT32 with a warning (10.x has INT64); each is named by
    its first consumer."""
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT64:
            label, op = first_user.get(init.name, (init.name, "initializer"))
            add(
                label,
                op,
                f"INT64 initializer {init.name!r}: {trt} casts it down to INT32 (check values fit)",
                "warning",
            )


def _check_qdq(node: onnx.NodeProto, label: str, g: _Graph, major: str, trt: str, add: Add) -> None:
    op = node.op_type
    inputs = list(node.input) + [""] * (3 - len(node.input))
    x, scale_name, zp_name = inputs[:3]
    if not zp_name:
        if major == "8":
            add(label, op, f"{trt} requires all 3 inputs: add an explicit int8 zero point of 0")
    elif zp_name not in g.consts:
        add(label, op, "zero point is not a constant; TensorRT needs a constant symmetric zero point")
    else:
        zp = g.consts[zp_name]
        ztype = g.const_types[zp_name]
        if ztype != TensorProto.INT8:
            add(
                label,
                op,
                f"zero point type {TensorProto.DataType.Name(ztype)}: TensorRT quantizes to signed int8, "
                "so a uint8 graph means different numbers; use INT8 zero points",
            )
        if np.any(zp != 0):
            add(label, op, "zero point must be all zeros (TensorRT quantization is symmetric)")
    if scale_name not in g.consts:
        add(label, op, "scale is not a constant; TensorRT needs constant scales to check and fold", "warning")
        return
    scale = np.asarray(g.consts[scale_name], dtype=np.float64)
    if scale.size == 0 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        add(label, op, "every scale must be finite and > 0")
    if scale.size > 1:
        weight = g.weight_of(x)
        axis = int(_attr(node, "axis", 1))
        if weight is None:
            add(label, op, "per-axis scales on an activation: TensorRT takes per-axis only for weights")
        elif weight.ndim and scale.size != weight.shape[axis % weight.ndim]:
            add(label, op, f"{scale.size} scales but weight dim[{axis}] is {weight.shape[axis % weight.ndim]}")
