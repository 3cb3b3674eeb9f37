"""Which head layer diverged first: ONNX intermediate tensors vs the PyTorch head's module outputs.

The legacy exporter names every node by the module it came from (``/encoder/encoder.4/BatchNormalization``).
A node whose module was fused away (a BatchNorm folded into the conv before it) leaves a gap; the tensor of
the last node of a module then stands for the output of every module up to the next named one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from bottlefit.exporter import wire
from bottlefit.exporter.artifact import TensorSpec
from bottlefit.exporter.onnx import module_of
from bottlefit.parity.metrics import cosine, sqnr_db

if TYPE_CHECKING:
    from bottlefit.exporter.split import SplitModel



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


# ---------------------------------------------------------------- TFLite (litert) heads

# TFLite fused activations (schema ActivationFunctionType) -> the PyTorch modules that compute the same thing
_FUSED_ACTIVATIONS: dict[str, tuple[type[torch.nn.Module], ...]] = {
    "RELU": (torch.nn.ReLU,),
    "RELU6": (torch.nn.ReLU6, torch.nn.Hardtanh),
    "RELU_N1_TO_1": (torch.nn.Hardtanh,),
    "TANH": (torch.nn.Tanh,),
}


def _fused_activations(data: bytes) -> dict[int, str]:
    """Operator index (main subgraph) -> name of its fused activation, for operators that fuse one."""
    try:
        from ai_edge_litert import schema_py_generated as fb
    except ImportError:  # tflite-runtime alone ships no schema: names are then the only evidence
        return {}
    option_class = {v: getattr(fb, k, None) for k, v in vars(fb.BuiltinOptions).items() if isinstance(v, int)}
    act_name = {v: k for k, v in vars(fb.ActivationFunctionType).items() if isinstance(v, int)}
    sg = fb.Model.GetRootAs(data, 0).Subgraphs(0)
    out: dict[int, str] = {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        cls = option_class.get(op.BuiltinOptionsType())
        table = op.BuiltinOptions()
        if cls is None or table is None or not hasattr(cls, "FusedActivationFunction"):
            continue
        opts = cls()
        opts.Init(table.Bytes, table.Pos)
        act = int(opts.FusedActivationFunction())
        if act != fb.ActivationFunctionType.NONE:
            out[i] = act_name.get(act, str(act))
    return out


def first_divergence_tflite(tflite_path: Path, split: SplitModel, x: np.ndarray, input_spec: TensorSpec,
                            origin: dict[str, list[str]] | None = None) -> list[dict]:
    """Per head layer in execution order: the .tflite's activation vs PyTorch's, in the same rows as
    :func:`first_divergence_onnx` with the model's own module paths (``features.bottleneck.encoder.4``).

    Which tensors: every 4-D tensor an operator writes that is float32 or quantized per tensor (non-zero scale),
    dequantized with its own scale/zero-point, NHWC -> NCHW (TFLite computes NHWC inside the graph; only the
    graph's own input/output follow the artifact's layout). Read with ``experimental_preserve_all_tensors`` and
    TFLite's reference kernels (the fidelity semantics): XNNPACK would hide intermediates inside its delegate.

    What a tensor stands for: litert-torch names a tensor after the rewritten-head children that made it
    (``…ReLU_1;;…Conv2d_0;1``: a conv, its folded BN and the fused ReLU); ``origin`` (the manifest's
    ``extra["rewrite"]["origin"]``, rebuilt with ``rewrite_head`` when None) maps children to model paths. An
    unnamed tensor (the graph output) stands for the latest module its operator's inputs name. The reference is
    the PyTorch output of the LAST leaf module the tensor stands for, extended by one leaf when the operator
    fuses an activation (schema ``fused_activation_function``) and the next leaf is that activation, so a fused
    CONV_2D+ReLU is compared with the ReLU's output even where its name leaves the ReLU out. ``module`` is the
    first module the tensor stands for (the layer that computed it), ``through`` the reference module. Per
    reference module the last tensor in execution order whose shape matches is kept (a PAD before a conv is
    named after the conv but has another shape, so it drops out).
    """
    from bottlefit.exporter.head_rewrite import RewrittenHead, rewrite_head
    from bottlefit.runtimes.litert import interpreter_module

    data = Path(tflite_path).read_bytes()
    mod = interpreter_module()
    # TFLite's reference kernels, as fidelity uses (XNNPACK would also hide intermediates inside its delegate)
    interp = mod.Interpreter(model_content=data, experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=mod.OpResolverType.BUILTIN_REF)
    interp.allocate_tensors()
    if origin is None:
        rw = rewrite_head(split.head.encoder, split.card.bottleneck.module)  # deterministic: the export's map
    else:
        rw = RewrittenHead(torch.nn.Sequential(), {str(k): list(v) for k, v in origin.items()})

    ref_local = _leaf_outputs(split.head, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    ref = {split.head_module_path(k): v for k, v in ref_local.items()}
    leaves = list(ref)
    pos = {p: i for i, p in enumerate(leaves)}
    modules = {split.head_module_path(n): m for n, m in split.head.named_modules()}

    def leaves_of(names: list[str]) -> list[str]:
        found = {leaf for n in names for p in rw.origin_of_tensor(n) for leaf in leaves
                 if leaf == p or leaf.startswith(p + ".")}
        return sorted(found, key=pos.__getitem__)

    tensors = {int(t["index"]): t for t in interp.get_tensor_details()}
    graph_io = {int(d["index"]) for d in interp.get_input_details() + interp.get_output_details()}
    layout = (input_spec.layout or "NHWC").upper()
    picked = _pick_tensors(interp, tensors, graph_io, _fused_activations(data), leaves_of, ref, modules, layout)
    got = _dequantized_outputs(interp, tensors, graph_io, picked, x, input_spec, layout)
    rows = []
    for through, (idx, module, _) in picked.items():
        g, r = np.concatenate(got[idx]), ref[through]
        sq = sqnr_db(r, g)
        rows.append({"module": module, "through": through, "tensor": str(tensors[idx]["name"]),
                     "cosine": cosine(r, g), "sqnr_db": sq if np.isfinite(sq) else None,
                     "max_abs_error": float(np.max(np.abs(r - g)))})
    return rows


def _pick_tensors(interp: Any, tensors: dict[int, Any], graph_io: set[int], fused: dict[int, str],
                  leaves_of: Callable[[list[str]], list[str]], ref: dict[str, np.ndarray],
                  modules: dict[str, torch.nn.Module], layout: str) -> dict[str, tuple[int, str, int]]:
    """reference module -> (tensor index, module that computed it, op index): per reference module the last
    4-D activation in execution order whose shape matches (see first_divergence_tflite)."""
    leaves = list(ref)
    pos = {p: i for i, p in enumerate(leaves)}
    picked: dict[str, tuple[int, str, int]] = {}
    for op in interp._get_ops_details():  # noqa: SLF001 - the interpreter's only per-op view
        for idx in (int(i) for i in op["outputs"] if i >= 0):
            t = tensors.get(idx)
            if t is None or len(t["shape"]) != 4:
                continue
            scale = float(t["quantization"][0])
            if np.dtype(t["dtype"]) != np.float32 and scale == 0.0:
                continue  # per-channel or unquantized integers are not activations
            covered = leaves_of([str(t["name"])])
            if not covered:
                ins = leaves_of([str(tensors[int(i)]["name"]) for i in op["inputs"] if int(i) in tensors])
                covered = ins[-1:]
            if not covered:
                continue
            through = covered[-1]
            act = fused.get(int(op["index"]))
            nxt = pos[through] + 1
            if act and nxt < len(leaves) and isinstance(modules.get(leaves[nxt]), _FUSED_ACTIVATIONS.get(act, ())):
                through = leaves[nxt]
            nchw = idx in graph_io and layout == "NCHW"
            shape = tuple(int(s) for s in t["shape"])
            if (shape[1:] if nchw else (shape[3], shape[1], shape[2])) != ref[through].shape[1:]:
                continue
            picked.pop(through, None)  # re-insert: dict order follows the last tensor's execution order
            picked[through] = (idx, covered[0], int(op["index"]))
    return picked


def _dequantized_outputs(interp: Any, tensors: dict[int, Any], graph_io: set[int],
                         picked: dict[str, tuple[int, str, int]], x: np.ndarray, input_spec: TensorSpec,
                         layout: str) -> dict[int, list[np.ndarray]]:
    """Run every image; each picked tensor dequantized with its own scale/zero point, as float NCHW."""
    in_detail = next((d for d in interp.get_input_details() if str(d["name"]) == input_spec.name),
                     interp.get_input_details()[0])
    got: dict[int, list[np.ndarray]] = {idx: [] for idx, _, _ in picked.values()}
    for i in range(x.shape[0]):
        interp.set_tensor(in_detail["index"], wire.encode(input_spec, x[i : i + 1]))
        interp.invoke()
        for idx in got:
            t = tensors[idx]
            v = interp.get_tensor(idx)
            scale, zp = t["quantization"]
            if np.dtype(t["dtype"]) != np.float32:
                v = (v.astype(np.float32) - np.float32(zp)) * np.float32(scale)
            if not (idx in graph_io and layout == "NCHW"):
                v = v.transpose(0, 3, 1, 2)
            got[idx].append(np.ascontiguousarray(v, dtype=np.float32))
    return got
