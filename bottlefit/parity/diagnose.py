"""Which head layer diverged first: ONNX intermediate tensors vs the PyTorch head's module outputs.

The legacy exporter names every node by the module it came from (``/encoder/encoder.4/BatchNormalization``).
A node whose module was fused away (a BatchNorm folded into the conv before it) leaves a gap; the tensor of
the last node of a module then stands for the output of every module up to the next named one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import torch

from bottlefit.exporter import wire
from bottlefit.exporter.artifact import TensorSpec
from bottlefit.parity.metrics import cosine, sqnr_db

_SCOPE = re.compile(r"^/((?:[\w.]+/)*)([\w.]+)/[A-Za-z]+(?:_\d+)?$")


def module_of(node_name: str) -> str | None:
    """``/encoder/encoder.4/BatchNormalization`` -> ``encoder.4``; None for nodes no module owns."""
    m = _SCOPE.match(node_name)
    return m.group(2) if m else None


def _leaf_outputs(head: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    outs: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in head.named_modules():
        if len(list(mod.children())) == 0:
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, o, name=name: outs.__setitem__(name, o.detach().clone().numpy())))
    try:
        with torch.no_grad():
            head(x.clone())
    finally:
        for h in hooks:
            h.remove()
    return outs


def first_divergence_onnx(onnx_path: Path, head: torch.nn.Module, x: np.ndarray, input_spec: TensorSpec,
                          min_cosine: float) -> list[dict]:
    """Per named head layer in order: cosine of the artifact's tensor vs PyTorch's. The caller picks the first
    below ``min_cosine``. Runs ORT with graph optimizations off, so Q/DQ pairs compute exactly as written."""
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    inferred = onnx.shape_inference.infer_shapes(model)
    vi = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    order: list[tuple[str, str]] = []  # (module, tensor), last tensor of each module
    for node in model.graph.node:
        mod = module_of(node.name)
        if mod is None or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if order and order[-1][0] == mod:
            order[-1] = (mod, node.output[0])
        else:
            order.append((mod, node.output[0]))
    # In a Q/DQ graph a tensor's quantization error appears after its Q -> DQ pair: compare what the next
    # layer reads, or a broken activation scale is blamed on the layer after it.
    q_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    order = [(mod, dq_of.get(q_of.get(t, ""), t)) for mod, t in order]
    existing = {o.name for o in model.graph.output}
    for _, t in order:
        if t not in existing and t in vi:
            model.graph.output.append(vi[t])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(x.shape[0]):
        res = sess.run(names, {input_spec.name: wire.encode(input_spec, x[i : i + 1])})
        for n, r in zip(names, res, strict=True):
            got[n].append(r)
    ref = _leaf_outputs(head, torch.from_numpy(x))
    leaf_order = list(ref)
    rows = []
    for k, (mod, tensor) in enumerate(order):
        if tensor not in got or mod not in ref:
            continue
        # The reference is the last PyTorch module before the next named one (covers fused modules).
        nxt = order[k + 1][0] if k + 1 < len(order) else None
        start = leaf_order.index(mod)
        end = leaf_order.index(nxt) if nxt in leaf_order else len(leaf_order)
        ref_mod = leaf_order[max(start, end - 1)]
        g = np.concatenate(got[tensor]).astype(np.float32)
        r = ref[ref_mod]
        if g.shape != r.shape:
            continue
        sq = sqnr_db(r, g)
        rows.append({"module": mod, "through": ref_mod, "tensor": tensor, "cosine": cosine(r, g),
                     "sqnr_db": sq if np.isfinite(sq) else None, "max_abs_error": float(np.max(np.abs(r - g)))})
    return rows
