"""parity.diagnose on a six-layer head exported here: the rows follow the head's named layers (a folded BatchNorm
reported through the module after it), healthy layers agree, and a layer broken in the ONNX file is the first row
that diverges while the layers before it stay exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bottlefit.exporter.artifact import TensorSpec
from bottlefit.exporter.onnx import export_onnx
from bottlefit.parity.diagnose import _leaf_outputs, first_divergence_onnx


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        # conv, BN (folded into the conv by the exporter), ReLU, max-pool, conv, ReLU
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            bn = self.encoder[1]
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


INPUT = TensorSpec("input", (1, 3, 16, 16), "float32")
LEAVES = ["encoder.0", "encoder.1", "encoder.2", "encoder.3", "encoder.4", "encoder.5"]


@pytest.fixture(scope="module")
def head_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Head, Path, np.ndarray]:
    head = Head().eval()
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    path = tmp_path_factory.mktemp("diag") / "head.onnx"
    assert export_onnx(head, torch.from_numpy(x[:1]), path, 13, "input", "bottleneck").max_abs_error < 1e-5
    return head, path, x


def test_leaf_outputs_are_every_leaf_module_and_leave_no_hooks(head_onnx) -> None:
    head, _, x = head_onnx
    outs = _leaf_outputs(head, torch.from_numpy(x))
    assert list(outs) == LEAVES
    assert outs["encoder.3"].shape == (3, 8, 8, 8) and outs["encoder.5"].shape == (3, 4, 8, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(outs["encoder.5"], head(torch.from_numpy(x)).numpy())
    assert all(not m._forward_hooks for m in head.modules())


def test_healthy_head_agrees_layer_by_layer(head_onnx) -> None:
    head, path, x = head_onnx
    rows = first_divergence_onnx(path, head, x, INPUT, min_cosine=0.99)
    # the exporter folds BN 1 into conv 0 and names no node after it: conv 0's row stands through the BN, and the
    # fused ReLU 2 is a row of its own
    assert [(r["module"], r["through"]) for r in rows] == [
        ("encoder.0", "encoder.1"), ("encoder.2", "encoder.2"), ("encoder.3", "encoder.3"),
        ("encoder.4", "encoder.4"), ("encoder.5", "encoder.5")]
    for r in rows:
        assert r["cosine"] > 0.99999 and r["max_abs_error"] < 1e-4, r
        assert r["sqnr_db"] is None or r["sqnr_db"] > 80, r


def test_broken_layer_is_the_first_to_diverge(head_onnx, tmp_path: Path) -> None:
    head, path, x = head_onnx
    model = onnx.load(str(path))
    conv4 = next(n for n in model.graph.node if n.op_type == "Conv" and "/encoder.4/" in n.name)
    w = next(i for i in model.graph.initializer if i.name == conv4.input[1])
    w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))  # every weight's sign flipped
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    rows = {r["module"]: r for r in first_divergence_onnx(broken, head, x, INPUT, min_cosine=0.99)}
    for healthy in ("encoder.0", "encoder.2", "encoder.3"):
        assert rows[healthy]["cosine"] > 0.99999
    assert rows["encoder.4"]["cosine"] < 0  # the conv's output negated, its bias kept: anti-correlated
    assert rows["encoder.4"]["sqnr_db"] < 0 and rows["encoder.5"]["cosine"] < 0.99
    first = next(m for m, r in rows.items() if r["cosine"] < 0.99)
    assert first == "encoder.4"


def test_quantized_input_is_encoded_with_its_grid(head_onnx, tmp_path: Path) -> None:
    """A head that takes int8 codes: diagnose encodes the float images with the input's scale/zero-point first."""
    head, path, x = head_onnx
    model = onnx.load(str(path))
    # a DequantizeLinear in front: int8 codes with scale 1/32 -> the float the head computes on
    inp = model.graph.input[0]
    inp.type.tensor_type.elem_type = onnx.TensorProto.INT8
    for n in model.graph.node:
        n.input[:] = ["input_dq" if i == "input" else i for i in n.input]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1 / 32, np.float32), "in_scale"),
                                    numpy_helper.from_array(np.array(0, np.int8), "in_zp")])
    model.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["input", "in_scale", "in_zp"],
                                                     ["input_dq"], name="input_dequant"))
    q = tmp_path / "int8_in.onnx"
    onnx.save(model, str(q))
    spec = TensorSpec("input", (1, 3, 16, 16), "int8", scale=1 / 32, zero_point=0)
    xq = np.clip(np.round(x * 32), -128, 127).astype(np.float32) / 32  # what the codes stand for
    rows = first_divergence_onnx(q, head, xq, spec, min_cosine=0.99)
    assert len(rows) == 5 and all(r["cosine"] > 0.99999 for r in rows)


def test_tflite_rows_follow_the_models_own_module_paths(head_onnx, tmp_path: Path) -> None:
    """The int8 .tflite of the same head (BN folded into conv 0, ReLU fused into it, the max-pool, conv 4 + fused
    ReLU 5), read tensor by tensor under TFLite's reference kernels: one row per computing layer, named by the
    model's paths (``bottleneck.encoder.N``), each close to PyTorch's output of the module it stands through."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_torch")
    from bottlefit.exporter.head_rewrite import rewrite_head
    from bottlefit.exporter.split import Head as SplitHead
    from bottlefit.exporter.split import SplitModel
    from bottlefit.models.card import BottleneckSpec, ModelCard
    from bottlefit.parity.diagnose import first_divergence_tflite
    from bottlefit.targets.rpi.tflite import export_tflite

    head, _, x = head_onnx
    card = ModelCard(arch="tiny", params={}, input_shape=(3, 16, 16),
                     bottleneck=BottleneckSpec("bottleneck.encoder", (4, 8, 8)))
    sm = SplitModel(head=SplitHead(head.encoder), tail=None, card=card, model=None)  # type: ignore[arg-type]
    rw = rewrite_head(head.encoder, card.bottleneck.module)
    info = export_tflite(rw, x, tmp_path / "head.int8.tflite", int8=True, log=lambda _m: None)
    rows = first_divergence_tflite(tmp_path / "head.int8.tflite", sm, x, info.inputs[0], rw.origin)
    p = "bottleneck.encoder."
    assert [(r["module"], r["through"]) for r in rows] == [
        (p + "0", p + "2"), (p + "3", p + "3"), (p + "5", p + "5")]  # the graph output: named by the ReLU
    for r in rows:
        assert r["cosine"] > 0.999 and r["sqnr_db"] > 30, r  # int8 against float (measured 0.99996, 41-44 dB)
