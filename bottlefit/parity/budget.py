"""Where an int8 Q/DQ head's error comes from: its bottleneck fidelity with one activation grid at a time.

Each activation of a Q/DQ head is rounded onto an int8 grid by a QuantizeLinear -> DequantizeLinear pair; pairs
that share one scale and zero point (a max-pool re-quantized onto its input's grid) are one grid. The budget runs
the head under reference semantics (ONNX Runtime, graph optimizations off) once per grid with every other grid
bypassed, once with every grid bypassed (the weights alone), and once as written (all), and compares each
bottleneck with the fp32 head's. As noise powers the rows nearly add up, so the lowest row names the grid worth
working on, and a row that alone sits below a goal shows that no other fix can reach it.

Bypassing a pair keeps what it does besides rounding: ONNX Runtime's quantizer drops a Relu whose output grid
starts at 0 (the clamp does the Relu's work), so a bypassed grid whose lowest value is 0 becomes a Relu, and any
other one an identity. Weights and biases stay int8/int32 in every row: the file holds only their integers.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bottlefit.errors import UserError
from bottlefit.parity import metrics
from bottlefit.runtimes.onnxruntime import OnnxRuntimeRunner

_QMIN = {TensorProto.UINT8: 0, TensorProto.INT8: -128}


@dataclass(frozen=True)
class Grid:
    """One activation grid: the tensors its pairs quantize, and whether its lowest value is 0 (it then also
    stands for a Relu)."""

    tensors: tuple[str, ...]
    starts_at_zero: bool


@dataclass(frozen=True)
class BudgetRow:
    grids: str  # "all", "weights" (no activation grid), or the tensor names of the one grid kept
    module: str | None  # the head module whose output the grid quantizes, when known
    sqnr_db: float  # pooled over the images (parity's definition)
    sqnr_db_mean: float  # mean of the per-image figures
    cosine: float  # the worst image's

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def activation_grids(model: onnx.ModelProto) -> list[Grid]:
    """The activation grids of a Q/DQ graph in graph order (QuantizeLinear nodes fed by a computed tensor)."""
    inits = {i.name: i for i in model.graph.initializer}
    grids: dict[tuple[str, str], list[str]] = {}
    at_zero: dict[tuple[str, str], bool] = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        zp_name = n.input[2] if len(n.input) > 2 else ""
        key = (n.input[1], zp_name)
        if n.input[1] not in inits or numpy_helper.to_array(inits[n.input[1]]).size != 1:
            raise UserError(f"{n.name}: the activation scale is not a constant scalar; the error budget reads only "
                            "per-tensor activation grids (the Q/DQ heads bottlefit writes)")
        zp_t = inits.get(zp_name)
        dtype = zp_t.data_type if zp_t is not None else TensorProto.UINT8
        if dtype not in _QMIN:
            raise UserError(f"{n.name}: a {TensorProto.DataType.Name(dtype)} grid; the error budget reads int8 and "
                            "uint8 activation grids")
        zp = int(numpy_helper.to_array(zp_t).reshape(-1)[0]) if zp_t is not None else 0
        grids.setdefault(key, []).append(n.input[0])
        at_zero[key] = zp == _QMIN[dtype]
    return [Grid(tuple(ts), at_zero[k]) for k, ts in grids.items()]


def _float_output(model: onnx.ModelProto) -> None:
    """A head that emits its quantized bottleneck (output_int8) gets the DequantizeLinear back, so every variant
    emits float and the output's grid is a pair like the others."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        q = producers.get(out.name)
        if q is None or q.op_type != "QuantizeLinear":
            continue
        raw = f"{out.name}__int8"
        q.output[0] = raw
        model.graph.node.append(helper.make_node("DequantizeLinear", [raw, *q.input[1:]], [out.name],
                                                 name=f"{out.name}__dequantize"))
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def bypass(model: onnx.ModelProto, keep: set[tuple[str, ...]]) -> onnx.ModelProto:
    """A copy of the Q/DQ head with every activation grid not in ``keep`` (a set of ``Grid.tensors``) bypassed:
    its pairs replaced by an identity, or by a Relu where the grid starts at 0."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _float_output(m)
    inits = {i.name for i in m.graph.initializer}
    bypassed = [g for g in activation_grids(m) if g.tensors not in keep]
    drop = {t for g in bypassed for t in g.tensors}
    relu = {t for g in bypassed if g.starts_at_zero for t in g.tensors}
    graph_outputs = {o.name for o in m.graph.output}
    quantized = {n.output[0]: n.input[0] for n in m.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] in drop}
    rename: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in quantized:
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized:
            src = quantized[n.input[0]]
            if src in relu or n.output[0] in graph_outputs:
                op = "Relu" if src in relu else "Identity"
                nodes.append(helper.make_node(op, [src], [n.output[0]], name=f"{n.output[0]}__bypass"))
            else:
                rename[n.output[0]] = src
            continue
        nodes.append(n)
    for n in nodes:
        for k, name in enumerate(n.input):
            n.input[k] = rename.get(name, name)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _wire_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """Quantized tensor -> "<output> (wire)" for the grids whose pair ends the graph: the bottleneck's grid."""
    outputs = {o.name for o in model.graph.output}
    q_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    out = {q_of[n.input[0]]: f"{n.output[0]} (wire)" for n in model.graph.node
           if n.op_type == "DequantizeLinear" and n.input[0] in q_of and n.output[0] in outputs}
    out.update({t: f"{o} (wire)" for o, t in q_of.items() if o in outputs})  # output_int8: the Q ends the graph
    return out


def _run(model: onnx.ModelProto, images: np.ndarray, folder: Path, name: str) -> np.ndarray:
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    runner = OnnxRuntimeRunner(path, num_threads=1, reference=True)
    i, o = next(iter(runner.input_specs())), next(iter(runner.output_specs()))
    return np.concatenate([runner.infer({i: images[k : k + 1]})[o] for k in range(len(images))])


def error_budget(qdq_onnx: Path | onnx.ModelProto, images: np.ndarray, reference: np.ndarray,
                 modules: dict[str, str] | None = None,
                 decode: Callable[[np.ndarray], np.ndarray] | None = None) -> list[BudgetRow]:
    """The budget of the Q/DQ head ``qdq_onnx`` (float NCHW input) on ``images``, against ``reference`` (the fp32
    head's bottlenecks for them; a path or the loaded model): rows "all", "weights", then one per activation grid
    in graph order.
    ``modules``: tensor -> head module path, to name each grid's module. ``decode``: applied to every output
    before it is compared (an equalized head's outputs back to the model's own domain, say)."""
    model = qdq_onnx if isinstance(qdq_onnx, onnx.ModelProto) else onnx.load(str(qdq_onnx))
    name = "the Q/DQ head" if isinstance(qdq_onnx, onnx.ModelProto) else str(qdq_onnx)
    inits = {i.name for i in model.graph.initializer}
    feeds = [i for i in model.graph.input if i.name not in inits]
    if len(feeds) != 1 or feeds[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise UserError(f"{name}: the error budget needs a Q/DQ head with one float input")
    grids = activation_grids(model)
    if not grids:
        raise UserError(f"{name}: no activation QuantizeLinear in it; the error budget is for int8 Q/DQ heads")
    x = np.ascontiguousarray(images, dtype=np.float32)
    wire = _wire_tensors(model)
    variants: list[tuple[str, str | None, set[tuple[str, ...]]]] = [
        ("all", None, {g.tensors for g in grids}), ("weights", None, set())]
    variants += [(", ".join(wire.get(t, t) for t in g.tensors), (modules or {}).get(g.tensors[0]), {g.tensors})
                 for g in grids]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bottlefit-budget-") as tmp:
        for k, (label, module, keep) in enumerate(variants):
            got = _run(bypass(model, keep), x, Path(tmp), f"v{k}")
            got = decode(got) if decode is not None else got
            rows.append(BudgetRow(label, module, metrics.sqnr_db(reference, got),
                                  metrics.mean_sqnr_db(reference, got), metrics.cosine(reference, got)))
    return rows


def render(rows: list[BudgetRow]) -> list[str]:
    """Markdown table lines."""
    out = ["| grid kept | module | SQNR dB (pooled) | SQNR dB (mean/img) | cosine (min) |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.grids} | {r.module or '—'} | {r.sqnr_db:.2f} | {r.sqnr_db_mean:.2f} | {r.cosine:.5f} |")
    return out


__all__ = ["BudgetRow", "Grid", "activation_grids", "bypass", "error_budget", "render"]
