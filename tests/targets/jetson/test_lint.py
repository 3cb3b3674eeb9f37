from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bottlefit.targets.jetson.lint import LintIssue, lint_onnx
from bottlefit.targets.jetson.profiles import get_profile


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_conv_model(
    opset: int = 13,
    zp_dtype: type = np.int8,
    act_zp: int = 0,
    act_scale: float = 0.02,
    with_zero_points: bool = True,
    extra_nodes: list[onnx.NodeProto] | None = None,
    extra_inits: list[onnx.TensorProto] | None = None,
    output: str = "y",
) -> onnx.ModelProto:
    """x -Q/DQ(per-tensor)-> Conv(W: DQ per-channel int8) -> Relu -> y: the shape TensorRT wants."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        _init("x_scale", np.array(act_scale, np.float32)),
        _init("x_zp", np.array(act_zp, zp_dtype)),
        _init("w_q", w_q),
        _init("w_scale", w_scale),
        _init("w_zp", np.zeros(4, np.int8)),
        _init("b", np.zeros(4, np.float32)),
    ]
    zp = ["x_zp"] if with_zero_points else []
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", *zp], ["x_q"], name="input_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", *zp], ["x_dq"], name="input_dequant"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="conv.weight_dequant", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b"], ["c"], name="/stem/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="/stem/relu/Relu"),
        *(extra_nodes or []),
    ]
    if output == "y":
        nodes.append(helper.make_node("Identity", ["r"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 4, 8, 8] if output == "y" else None)],
        inits + (extra_inits or []),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def errors(issues: list[LintIssue]) -> list[LintIssue]:
    return [i for i in issues if i.severity == "error"]


@pytest.mark.parametrize("profile", ["nano", "xavier-nx", "orin"])
def test_good_qdq_conv_passes(profile: str) -> None:
    model = qdq_conv_model()
    onnx.checker.check_model(model)
    assert lint_onnx(model, get_profile(profile)) == []


def test_op_unknown_to_82_names_the_node() -> None:
    extra = [helper.make_node("HardSwish", ["r"], ["h"], name="/stem/act/HardSwish")]
    model = qdq_conv_model(opset=14, extra_nodes=extra, output="h")
    issues = errors(lint_onnx(model, get_profile("nano")))
    hard = [i for i in issues if i.op == "HardSwish"]
    assert hard and hard[0].node == "/stem/act/HardSwish"
    assert "TensorRT 8.2" in hard[0].reason
    assert "/stem/act/HardSwish (HardSwish)" in str(hard[0])


def test_custom_domain_op_fails() -> None:
    extra = [helper.make_node("FusedConv", ["r"], ["h"], name="fused", domain="com.microsoft")]
    model = qdq_conv_model(extra_nodes=extra, output="h")
    issues = errors(lint_onnx(model, get_profile("orin")))
    assert [(i.node, i.op) for i in issues] == [("fused", "FusedConv")]
    assert "com.microsoft" in issues[0].reason


@pytest.mark.parametrize("profile", ["nano", "xavier-nx", "orin"])
def test_uint8_zero_point_fails(profile: str) -> None:
    issues = errors(lint_onnx(qdq_conv_model(zp_dtype=np.uint8), get_profile(profile)))
    assert {i.node for i in issues} == {"input_quant", "input_dequant"}
    assert all("UINT8" in i.reason for i in issues)


def test_nonzero_zero_point_and_bad_scale() -> None:
    issues = errors(lint_onnx(qdq_conv_model(act_zp=3, act_scale=-0.1), get_profile("xavier-nx")))
    reasons = " | ".join(i.reason for i in issues)
    assert "all zeros" in reasons and "> 0" in reasons
    assert {i.node for i in issues} == {"input_quant", "input_dequant"}


def test_opset_17_on_nano_fails_but_not_on_xavier() -> None:
    model = qdq_conv_model(opset=17)
    issues = errors(lint_onnx(model, get_profile("nano")))
    assert [(i.node, i.op) for i in issues] == [("", "model")]
    assert "opset 17" in issues[0].reason and "13" in issues[0].reason
    assert lint_onnx(model, get_profile("xavier-nx")) == []


def test_missing_zero_point_only_fails_on_8x() -> None:
    model = qdq_conv_model(with_zero_points=False)
    for name in ("nano", "xavier-nx"):
        issues = errors(lint_onnx(model, get_profile(name)))
        assert {i.node for i in issues} == {"input_quant", "input_dequant"}
        assert all("3 inputs" in i.reason for i in issues)
    assert lint_onnx(model, get_profile("orin")) == []


def test_per_axis_on_activation_fails() -> None:
    scales = _init("act_scales", np.full(4, 0.1, np.float32))
    zps = _init("act_zps", np.zeros(4, np.int8))
    extra = [helper.make_node("QuantizeLinear", ["r", "act_scales", "act_zps"], ["rq"], name="act_quant", axis=1)]
    model = qdq_conv_model(extra_nodes=extra, extra_inits=[scales, zps], output="rq")
    issues = errors(lint_onnx(model, get_profile("orin")))
    assert [(i.node, i.op) for i in issues] == [("act_quant", "QuantizeLinear")]
    assert "per-axis" in issues[0].reason


def test_per_axis_count_must_match_weight_dim() -> None:
    model = qdq_conv_model()
    for node in model.graph.node:
        if node.name == "conv.weight_dequant":
            node.attribute[0].i = 1  # axis 1 has 3 channels, 4 scales
    issues = errors(lint_onnx(model, get_profile("orin")))
    assert [i.node for i in issues] == ["conv.weight_dequant"]


def test_int64_initializer_warns_on_8x_only() -> None:
    shape = _init("flat_shape", np.array([1, -1], np.int64))
    extra = [helper.make_node("Reshape", ["r", "flat_shape"], ["flat"], name="/head/Reshape")]
    model = qdq_conv_model(extra_nodes=extra, extra_inits=[shape], output="flat")
    issues = lint_onnx(model, get_profile("xavier-nx"))
    assert [(i.node, i.op, i.severity) for i in issues] == [("/head/Reshape", "Reshape", "warning")]
    assert "flat_shape" in issues[0].reason
    assert lint_onnx(model, get_profile("orin")) == []


def test_maxpool_with_indices_fails() -> None:
    extra = [helper.make_node("MaxPool", ["r"], ["p", "idx"], name="/pool/MaxPool", kernel_shape=[2, 2])]
    model = qdq_conv_model(extra_nodes=extra, output="p")
    issues = errors(lint_onnx(model, get_profile("orin")))
    assert [(i.node, i.op) for i in issues] == [("/pool/MaxPool", "MaxPool")]
    assert "Indices" in issues[0].reason


def test_pad_wrap_mode_only_on_10x() -> None:
    pads = _init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    extra = [helper.make_node("Pad", ["r", "pads"], ["padded"], name="/pad/Pad", mode="wrap")]
    model = qdq_conv_model(extra_nodes=extra, extra_inits=[pads], output="padded")
    issues = errors(lint_onnx(model, get_profile("xavier-nx")))
    assert [(i.node, i.op) for i in issues] == [("/pad/Pad", "Pad")]
    assert "wrap" in issues[0].reason
    assert errors(lint_onnx(model, get_profile("orin"))) == []


def test_unnamed_node_gets_an_index_label() -> None:
    extra = [helper.make_node("Elu", ["r"], ["e"])]
    model = qdq_conv_model(extra_nodes=extra, output="e")
    issues = errors(lint_onnx(model, get_profile("orin")))
    assert [(i.node, i.op) for i in issues] == [("#5", "Elu")]
