"""Q/DQ (explicit quantization) ONNX for a head: our observers' ranges, ONNX Runtime's graph writer.

Used by the onnx target (ONNX Runtime CPU, asymmetric uint8 activations), the rpi target (ONNX Runtime on ARM,
asymmetric int8 activations) and the Jetson target (TensorRT explicit quantization: symmetric, every zero point
0, every Q/DQ with an explicit zero-point input).

How it works:
1. ``prepare_fp32``: the fp32 head with every BatchNormalization that no conv absorbed (the one after the
   max-pool) rewritten as an exact 1x1 depthwise Conv. Quantized as a BatchNormalization it stops ONNX
   Runtime's NHWC int8 path and the int8 head ran slower than fp32 (measured); as a conv it is an
   int8 QLinearConv. Tensor names are kept (the Jetson cache names tensors of the fp32 graph), the node is
   renamed ``<scope>/Conv`` in the same scope so diagnosis still names its module.
2. ``observe_activations``: the prepared fp32 graph runs in ONNX Runtime over the calibration images with
   every intermediate tensor exposed, and OUR observers (``bottlefit.calibration.observers``) turn them into
   ranges. Running the graph itself, not hooks on PyTorch modules, makes the mapping to ONNX tensor names
   exact whatever the exporter fused; ``head`` supplies the module paths for reporting. Observer ``search``
   (``bottlefit.calibration.search``): every activation's candidate ranges (min/max, percentiles, entropy,
   MSE) are judged by the output error of the conv that reads it, and the choice is recorded per tensor;
   ``search_table`` hands the same ranges to the TFLite converter.
3. ``quantize_static`` (QDQ format, per-channel int8 weights) writes the graph with our scale/zero point
   forced on every activation through ``TensorQuantOverrides``; ORT's own calibrators never run (the ranges
   reach it through its calibration cache).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from bottlefit.calibration.observers import Observer, calibrate_two_pass, make_observer
from bottlefit.calibration.search import LayerProbe, SearchChoice, search
from bottlefit.errors import UserError, VerificationError
from bottlefit.exporter.head_rewrite import batchnorm_affine
from bottlefit.exporter.onnx import module_of, save_onnx

# ONNX Runtime renames a graph output it quantizes: "<name>_QuantizeLinear_Input" feeds the Q node.
_ORT_OUTPUT_SUFFIX = "_QuantizeLinear_Input"
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_ACT_DTYPES = ("int8", "uint8")
# Ops whose int8 output ONNX Runtime quantizes with its input's parameters (they move values, never make new
# ones; TensorRT also wants equal scales across them). Mirrored here so the file carries what we computed.
_SAME_AS_INPUT = frozenset({"MaxPool", "AveragePool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                            "Slice", "TopK"})


@dataclass
class QdqResult:
    """What ``quantize_head`` wrote.

    ``activation_scales`` / ``activation_zero_points``: per-tensor activation parameters read back from the
    written file, keyed by the tensor's name in the fp32 graph, in topological order. For TensorRT's cache:
    amax = 127 * scale (``amax()``). ``tensor_modules``: ONNX tensor name -> module path inside ``head``
    (e.g. ``encoder.4``), for the tensors some module produced.
    """

    path: Path
    activation_scales: dict[str, float]
    activation_zero_points: dict[str, int]
    tensor_modules: dict[str, str]
    observer: str
    symmetric: bool
    per_channel: bool
    activation_dtype: str  # int8 | uint8
    output_int8: bool
    input_name: str
    output_name: str
    output_scale: float
    output_zero_point: int
    rewritten_nodes: list[str] = field(default_factory=list)  # BatchNormalization -> depthwise Conv
    calibration_count: int = 0
    # observer "search": per tensor, the method chosen and every candidate's output SQNR
    range_search: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the head's bottleneck equalization (bottlefit.exporter.equalize), when the head carries one
    equalization: dict[str, Any] | None = None

    def amax(self) -> dict[str, float]:
        """TensorRT's per-tensor amax (= 127 * scale), same keys and order as ``activation_scales``."""
        return {k: float(np.float32(127.0) * np.float32(s)) for k, s in self.activation_scales.items()}

    def quantization_record(self, module_path: Callable[[str], str] | None = None,
                            calibration: dict[str, Any] | None = None) -> dict[str, Any]:
        """The artifact's ``quantization`` section for the manifest, the same keys for every target.

        ``module_path`` maps a module path inside the head (``encoder.4``) to the model's (``bottleneck.encoder.4``)
        for readers of the manifest; ``calibration`` describes the calibration set (source, count, sha256)."""
        modules = {t: module_path(m) if module_path else m for t, m in self.tensor_modules.items()}
        return {
            "format": "qdq",
            "observer": self.observer,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
            "weights": "int8",
            "activations": self.activation_dtype,
            # The manifest's JSON sorts keys: the topological order travels as its own list.
            "activation_order": list(self.activation_scales),
            "activation_scales": dict(self.activation_scales),
            "activation_zero_points": dict(self.activation_zero_points),
            "tensor_modules": modules,
            "rewritten_nodes": list(self.rewritten_nodes),
            "calibration_count": self.calibration_count,
            **({"range_search": dict(self.range_search)} if self.range_search else {}),
            **({"equalization": self.equalization} if self.equalization is not None else {}),
            "output": {"dtype": self.activation_dtype, "scale": self.output_scale,
                       "zero_point": self.output_zero_point},
            **({"calibration": calibration} if calibration is not None else {}),
        }


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def rewrite_standalone_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Replace every 4-D BatchNormalization (inference form) by the exact 1x1 depthwise Conv, in place.

    weight = gamma / sqrt(var + eps), bias = beta - mean * weight (head_rewrite.batchnorm_affine, the formula the
    PyTorch rewrites use), computed in float64 and rounded once. Returns the new node names.

    Why on the graph and not by exporting head_rewrite's PyTorch rewrite: the Q/DQ heads are made from the fp32
    head.onnx each target ships, and keep its tensor names (TensorRT's calibration cache names them) and node
    scopes (diagnosis names modules by them); an export of the rewritten nn.Sequential names both after its
    children ("/0/Conv"), so head.qdq.onnx and head.int8.onnx would change bytes and lose those names.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shapes = _tensor_ranks(model)
    done: list[str] = []
    for idx, node in enumerate(list(g.node)):
        if node.op_type != "BatchNormalization" or len(node.output) != 1:
            continue  # training-mode BN (extra outputs) is not an inference affine
        if not all(n in inits for n in node.input[1:5]) or shapes.get(node.input[0]) != 4:
            continue
        eps = float(_attr(node, "epsilon", 1e-5))
        w, b = batchnorm_affine(*(numpy_helper.to_array(inits[n]) for n in node.input[1:5]), eps)
        c = int(w.size)
        name = node.name.rsplit("/", 1)[0] + "/Conv" if "/" in node.name else (node.name or f"bn{idx}") + "_conv"
        wname, bname = f"{name}.weight", f"{name}.bias"
        g.initializer.extend([numpy_helper.from_array(w.astype(np.float32).reshape(c, 1, 1, 1), wname),
                              numpy_helper.from_array(b.astype(np.float32), bname)])
        conv = helper.make_node("Conv", [node.input[0], wname, bname], list(node.output), name=name, group=c,
                                kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1])
        g.node.remove(node)
        g.node.insert(idx, conv)
        done.append(name)
    if done:
        used = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return done


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def prepare_fp32(fp32_onnx: Path | onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The fp32 graph the Q/DQ graph is made from: standalone BatchNorms as depthwise convs."""
    model = onnx.load(str(fp32_onnx)) if isinstance(fp32_onnx, Path | str) else onnx.ModelProto.FromString(
        fp32_onnx.SerializeToString())
    rewritten = rewrite_standalone_batchnorm(model)
    onnx.checker.check_model(model)
    return model, rewritten


@dataclass(frozen=True)
class RangeEntry:
    """One activation's searched int8 parameters and its values on the first calibration image: another
    converter's observer finds its tensor by value (``match_range``) and takes these parameters."""

    name: str
    sample: np.ndarray  # NCHW, the first calibration image
    scale: float
    zero_point: int
    method: str


def search_table(model: onnx.ModelProto, images: np.ndarray, symmetric: bool,
                 activation_dtype: str = "int8") -> list[RangeEntry]:
    """The range search of ``search_activations`` as a table other converters can read (``match_range``)."""
    observers, kept = observe_and_sample(model, images, "search", keep=search_samples(model, images))
    fixed, choices = search(observers, kept, symmetric, "int8" if symmetric else activation_dtype,
                            layer_probes(model))
    params, sources = _params_and_sources(model, fixed, symmetric, activation_dtype)
    return [RangeEntry(n, kept[n][:1], float(np.float32(sc)), int(zp), choices[sources[n]].method
                       if sources[n] in choices else "minmax")
            for n, (sc, zp) in params.items() if n in kept]


def match_range(table: list[RangeEntry], x: np.ndarray, rtol: float = 1e-3) -> RangeEntry | None:
    """The table's entry whose sample is ``x`` (the same tensor of the same image, NCHW or NHWC), within
    ``rtol`` of its magnitude; the closest when several match, None when none does."""
    best: tuple[float, RangeEntry] | None = None
    for e in table:
        a = e.sample
        cands = [x] if x.shape == a.shape else []
        if x.ndim == 4 and x.transpose(0, 3, 1, 2).shape == a.shape:
            cands.append(x.transpose(0, 3, 1, 2))
        for c in cands:
            d = float(np.max(np.abs(c - a))) if a.size else 0.0
            if d <= rtol * max(1.0, float(np.max(np.abs(a)))) and (best is None or d < best[0]):
                best = (d, e)
    return best[1] if best else None


def _float_activations(model: onnx.ModelProto) -> list[str]:
    """Graph inputs and node outputs that are float tensors, in topological (graph) order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    names += [o for n in model.graph.node for o in n.output if o]
    return [n for n in names if elem.get(n) == onnx.TensorProto.FLOAT]


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Optimizations off: every exposed tensor is computed exactly as the graph writes it.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def observe_activations(model: onnx.ModelProto, images: np.ndarray, observer: str = "minmax",
                        observer_kwargs: dict[str, Any] | None = None) -> dict[str, Observer]:
    """Our observers over every float activation of ``model`` (fp32), one image at a time (static batch).

    Histogram observers get two passes (``calibrate_two_pass``): min/max first to fix each histogram's range.
    """
    return observe_and_sample(model, images, observer, observer_kwargs)[0]


def sample_indices(n: int, keep: int) -> list[int]:
    """``keep`` calibration images spread evenly over ``n`` (all when keep >= n): the range search's samples."""
    if keep <= 0:
        return []
    if keep >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, keep)})


def observe_and_sample(model: onnx.ModelProto, images: np.ndarray, observer: str = "minmax",
                       observer_kwargs: dict[str, Any] | None = None,
                       keep: int = 0) -> tuple[dict[str, Observer], dict[str, np.ndarray]]:
    """``observe_activations``, and every activation's values on ``keep`` of the images (``sample_indices``),
    stacked along the batch axis: what the range search judges candidates on."""
    kw = observer_kwargs or {}
    make_observer(observer, **kw)  # an unknown name fails here, before the session is built
    if images.ndim != 4 or images.dtype != np.float32 or len(images) == 0:
        raise UserError(f"calibration images must be a non-empty float32 NCHW array, got {images.shape} "
                        f"{images.dtype}")
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    names = _float_activations(probe)
    inits = {i.name for i in probe.graph.initializer}
    input_name = next(i.name for i in probe.graph.input if i.name not in inits)
    existing = {o.name for o in probe.graph.output}
    for n in names:
        if n not in existing and n != input_name:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = _session(probe)
    run_names = [o.name for o in sess.get_outputs()]
    keep_idx = set(sample_indices(len(images), keep))
    kept: dict[str, list[np.ndarray]] = {}

    def run_all(update: Any) -> None:
        kept.clear()  # the last pass's samples are kept (every pass computes the same values)
        for i in range(len(images)):
            x = np.ascontiguousarray(images[i : i + 1])
            outs = [x, *sess.run(run_names, {input_name: x})]
            for n, arr in zip([input_name, *run_names], outs, strict=True):
                update(n, arr)
                if i in keep_idx:
                    kept.setdefault(n, []).append(arr)

    observers = calibrate_two_pass(observer, run_all, **kw)
    order = [input_name, *names]
    samples = {n: np.concatenate(kept[n]) for n in order if n in kept}
    return {n: observers[n] for n in order if n in observers}, samples


def layer_probes(model: onnx.ModelProto) -> dict[str, LayerProbe]:
    """Activation -> the convolution that reads it, for tensors whose only reader is a 2-D Conv with constant
    weights: the range search judges that tensor's candidate ranges by this layer's output."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out: dict[str, LayerProbe] = {}
    for name, nodes in readers.items():
        if len(nodes) != 1 or name in inits:
            continue
        n = nodes[0]
        if n.op_type != "Conv" or n.input[0] != name or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        if w.ndim != 4 or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        pads = tuple(int(p) for p in _attr(n, "pads", [0, 0, 0, 0]))
        out[name] = LayerProbe(w, tuple(int(v) for v in _attr(n, "strides", [1, 1])),  # type: ignore[arg-type]
                               (pads[0], pads[1], pads[2], pads[3]),
                               tuple(int(v) for v in _attr(n, "dilations", [1, 1])),  # type: ignore[arg-type]
                               int(_attr(n, "group", 1)))
    return out


# The range search judges candidates on the activations of as many calibration images as fit this many values
# (every image of a small head; ~12 of an R152 head); the histograms see every image regardless.
SEARCH_BUDGET = 32_000_000


def search_samples(model: onnx.ModelProto, images: np.ndarray, budget: int = SEARCH_BUDGET) -> int:
    """How many calibration images the range search keeps every activation of (``SEARCH_BUDGET`` values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    per_image = 0
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            per_image += int(np.prod(dims[1:])) if len(dims) > 1 else 1
    return int(max(1, min(len(images), budget // max(1, per_image))))


def search_activations(model: onnx.ModelProto, images: np.ndarray, symmetric: bool, activation_dtype: str = "int8",
                       samples: int | None = None) -> tuple[dict[str, Observer], dict[str, SearchChoice]]:
    """Per-tensor range search (``bottlefit.calibration.search``) over every float activation of ``model``:
    one ``FixedObserver`` per tensor, and what was chosen and why. ``samples``: images judged on (default:
    ``search_samples``)."""
    keep = search_samples(model, images) if samples is None else samples
    observers, kept = observe_and_sample(model, images, "search", keep=keep)
    return search(observers, kept, symmetric, "int8" if symmetric else activation_dtype, layer_probes(model))


def activation_params(model: onnx.ModelProto, observers: dict[str, Observer], symmetric: bool,
                      activation_dtype: str = "uint8") -> dict[str, tuple[float, int]]:
    """(scale, zero point) per activation from our observers: symmetric int8 (zero point 0), or asymmetric in
    ``activation_dtype`` (uint8 or int8).

    A Relu/Clip, a max-pool or another data-movement op (``_SAME_AS_INPUT``) whose input feeds nothing else
    passes its OUTPUT's parameters back to that input: the output is what the next layer reads. For a
    max-pool the input's own range would be set by the many small values the pool discards (a histogram
    observer then clips the maxima it keeps); for a ReLU the negative side is zeroed anyway, and TensorRT
    fuses conv+ReLU under one scale, and ONNX Runtime folds the Relu into the conv only then. Where the
    input has other readers the op's output takes the input's parameters instead, as ONNX Runtime writes it.
    """
    return _params_and_sources(model, observers, symmetric, activation_dtype)[0]


def _params_and_sources(model: onnx.ModelProto, observers: dict[str, Observer], symmetric: bool,
                        activation_dtype: str) -> tuple[dict[str, tuple[float, int]], dict[str, str]]:
    """``activation_params``, and for each tensor the tensor whose observer decided its parameters."""
    params: dict[str, tuple[float, int]] = {}
    src: dict[str, str] = {}
    for name, obs in observers.items():
        params[name] = (obs.symmetric(127), 0) if symmetric else obs.asymmetric(activation_dtype)
        src[name] = name
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    shared = _SAME_AS_INPUT | {"Relu", "Clip"}
    for n in reversed(model.graph.node):  # reverse topological: chains pass the last output's parameters back
        if n.op_type in shared and consumers.get(n.input[0]) == 1 and n.output[0] in params and n.input[0] in params:
            params[n.input[0]] = params[n.output[0]]
            src[n.input[0]] = src[n.output[0]]
    for n in model.graph.node:
        if n.op_type in _SAME_AS_INPUT and n.input[0] in params and n.output[0] in params:
            params[n.output[0]] = params[n.input[0]]
            src[n.output[0]] = src[n.input[0]]
    return params, src


def tensor_modules(model: onnx.ModelProto, head: torch.nn.Module | None = None) -> dict[str, str]:
    """Activation tensor (its fp32 name) -> path inside ``head`` of the module whose node produced it, read from
    the exporter's node-name scopes. In a Q/DQ graph the producer of a quantized tensor is the node feeding
    its QuantizeLinear: after ONNX Runtime folds a Relu into the conv before it, that is the conv's module,
    as parity diagnosis names it."""
    known = {name for name, _ in head.named_modules()} if head is not None else None
    out: dict[str, str] = {}
    for n in model.graph.node:
        mod = module_of(n.name)
        if mod is None or n.op_type in _QDQ or (known is not None and mod not in known):
            continue
        for o in n.output:
            out[o.removesuffix(_ORT_OUTPUT_SUFFIX)] = mod
    return out


class _NoData:
    """Stands in for a calibration reader: the ranges come from the cache we write, never from ORT's run."""

    def get_next(self) -> None:
        return None


def _write_qdq(model: onnx.ModelProto, out: Path, params: dict[str, tuple[float, int]], symmetric: bool,
               per_channel: bool, op_types: list[str] | None, nodes_to_exclude: list[str] | None,
               activation_dtype: str) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    zp_dtype = np.int8 if activation_dtype == "int8" else np.uint8
    qmin, qmax = (-128, 127) if activation_dtype == "int8" else (0, 255)
    overrides = {name: [{"scale": np.array(s, dtype=np.float32), "zero_point": np.array(z, dtype=zp_dtype)}]
                 for name, (s, z) in params.items()}
    # ORT still wants a range per tensor; the overrides above decide the parameters, these only satisfy it.
    ranges = {}
    for name, (s, z) in params.items():
        lo, hi = (-127 * s, 127 * s) if symmetric else ((qmin - z) * s, (qmax - z) * s)
        ranges[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
    with tempfile.TemporaryDirectory(prefix="bottlefit-qdq-") as tmp:
        src = Path(tmp) / "fp32.onnx"
        dst = Path(tmp) / "qdq.onnx"
        cache = Path(tmp) / "ranges.json"
        onnx.save_model(model, str(src), save_as_external_data=False)
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's "please pre-process" advice is not for us
        try:
            quantize_static(
                str(src), str(dst), _NoData(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                per_channel=per_channel, reduce_range=False,
                activation_type=QuantType.QInt8 if activation_dtype == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=nodes_to_exclude, calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
                # Symmetric = TensorRT: its parser takes float biases only (no int32 DequantizeLinear).
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                               "QuantizeBias": not symmetric, "TensorQuantOverrides": overrides},
            )
        finally:
            root.setLevel(level)
        return onnx.load(str(dst))


def _init_value(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray:
    return numpy_helper.to_array(inits[name])


def _strip_output_dq(model: onnx.ModelProto, output_name: str) -> None:
    """Make the graph end in QuantizeLinear: the head emits the int8 tensor that goes on the wire."""
    g = model.graph
    dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and output_name in n.output), None)
    if dq is None:
        raise VerificationError(f"output {output_name!r} is not produced by a DequantizeLinear; cannot emit int8")
    q = next(n for n in g.node if dq.input[0] in n.output)
    inits = {i.name: i for i in g.initializer}
    zp_type = inits[q.input[2]].data_type
    q.output[0] = output_name
    g.node.remove(dq)
    out = next(o for o in g.output if o.name == output_name)
    out.type.tensor_type.elem_type = zp_type


def _finalize(model: onnx.ModelProto) -> None:
    # Only what the bytes need: no run-specific metadata, so equal inputs give equal files.
    model.producer_name = "bottlefit"
    from bottlefit import __version__

    model.producer_version = __version__
    del model.metadata_props[:]
    helper.set_model_props(model, {"bottlefit.qdq": "1"})


def read_activation_params(model: onnx.ModelProto) -> tuple[dict[str, float], dict[str, int]]:
    """Per-tensor activation (scale, zero point) of every QuantizeLinear on a non-constant tensor, keyed by
    the tensor's fp32 name, in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    scales: dict[str, float] = {}
    zps: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        name = n.input[0].removesuffix(_ORT_OUTPUT_SUFFIX)
        s = _init_value(inits, n.input[1])
        z = _init_value(inits, n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
        if s.size != 1:
            raise VerificationError(f"activation {name!r} is quantized per channel; expected per tensor")
        scales[name] = float(s.reshape(()))
        zps[name] = int(z.reshape(()))
    return scales, zps


def check_symmetric(model: onnx.ModelProto) -> None:
    """TensorRT's rules: every Q/DQ has an explicit zero point (three inputs) and every zero point is 0."""
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type not in _QDQ:
            continue
        if len(n.input) != 3 or not n.input[2]:
            raise VerificationError(f"{n.op_type} {n.name!r} has no explicit zero point")
        if n.input[2] not in inits or np.any(_init_value(inits, n.input[2]) != 0):
            raise VerificationError(f"{n.op_type} {n.name!r}: zero point is not 0")


def _check_written(qmodel: onnx.ModelProto, params: dict[str, tuple[float, int]], output_name: str,
                   symmetric: bool) -> tuple[dict[str, float], dict[str, int]]:
    """The file must carry exactly our observers' parameters, not anything ORT derived on its own; the output
    must be quantized; symmetric means every zero point 0. Returns the written (scales, zero points)."""
    scales, zps = read_activation_params(qmodel)
    for name, s in scales.items():
        want = params.get(name)
        if want is not None and (np.float32(want[0]) != np.float32(s) or want[1] != zps[name]):
            raise VerificationError(f"{name}: written scale/zero point ({s}, {zps[name]}) differ from the "
                                    f"observer's {want}")
    if output_name not in scales:
        raise VerificationError(f"the head output {output_name!r} was not quantized; check op_types")
    if symmetric:
        check_symmetric(qmodel)
    return scales, zps


def _activation_dtype(activation_dtype: str | None, symmetric: bool) -> str:
    """The activations' integer type: as asked, else int8 when symmetric and uint8 otherwise; symmetric uint8 is
    refused."""
    act_dtype = activation_dtype or ("int8" if symmetric else "uint8")
    if act_dtype not in _ACT_DTYPES or (symmetric and act_dtype != "int8"):
        raise UserError(f"activation_dtype {activation_dtype!r}: choose int8 or uint8 (symmetric needs int8)")
    return act_dtype


def _observe(model: onnx.ModelProto, images: np.ndarray, observer: str, observer_kwargs: dict[str, Any] | None,
             symmetric: bool, act_dtype: str) -> tuple[dict[str, Observer], dict[str, SearchChoice]]:
    """One observer per float activation over the calibration images, and (``observer`` search) what the range
    search chose per tensor and why."""
    if observer == "search":
        return search_activations(model, images, symmetric, act_dtype)
    return observe_activations(model, images, observer, observer_kwargs), {}


def _save(qmodel: onnx.ModelProto, out: Path, output_name: str, output_int8: bool) -> None:
    """``out``: the checked Q/DQ graph, ending in QuantizeLinear when ``output_int8``, without run-specific
    metadata (:func:`_finalize`: equal inputs give equal bytes)."""
    if output_int8:
        _strip_output_dq(qmodel, output_name)
    _finalize(qmodel)
    onnx.checker.check_model(qmodel)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(qmodel, out)


def _range_search(scales: dict[str, float], sources: dict[str, str],
                  choices: dict[str, SearchChoice]) -> dict[str, dict[str, Any]]:
    """Per quantized tensor, the search that decided it (a Relu's input takes its output's, see
    activation_params)."""
    return {t: choices[sources[t]].to_dict() | ({"same_as": sources[t]} if sources[t] != t else {})
            for t in scales if sources.get(t) in choices}


def quantize_head(
    fp32_onnx: Path,
    out: Path,
    calibration_images: np.ndarray,
    head: torch.nn.Module | None = None,
    observer: str = "minmax",
    *,
    symmetric: bool,
    per_channel: bool = True,
    op_types: list[str] | None = None,
    output_int8: bool = False,
    observer_kwargs: dict[str, Any] | None = None,
    nodes_to_exclude: Iterable[str] | None = None,
    rewrite_batchnorm: bool = True,
    activation_dtype: str | None = None,
) -> QdqResult:
    """Write ``out``: the Q/DQ int8 version of the fp32 head ``fp32_onnx``, calibrated on
    ``calibration_images`` (float32 NCHW, preprocessed as the model card says) with our ``observer``.

    ``symmetric``: int8 activations with zero point 0 everywhere (TensorRT); otherwise asymmetric activations
    (ONNX Runtime on CPUs). ``activation_dtype`` (int8 | uint8): default int8 when symmetric, uint8 otherwise;
    the rpi head asks for asymmetric int8 (S8S8 on ARM); symmetric uint8 is refused. Weights are always
    symmetric int8, per output channel when ``per_channel``. ``op_types``: the op types to quantize (default:
    all ORT knows). ``output_int8``: the graph ends in QuantizeLinear and emits the quantized bottleneck;
    otherwise it ends in DequantizeLinear and emits float. ``head``: the PyTorch head the graph was exported
    from; its module paths name the tensors in ``tensor_modules``. Same inputs give a byte-identical file.
    """
    act_dtype = _activation_dtype(activation_dtype, symmetric)
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    model, rewritten = prepare_fp32(fp32_onnx) if rewrite_batchnorm else (onnx.load(str(fp32_onnx)), [])
    inits = {i.name for i in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in inits)
    output_name = model.graph.output[0].name
    observers, choices = _observe(model, np.asarray(calibration_images), observer, observer_kwargs, symmetric,
                                  act_dtype)
    params, sources = _params_and_sources(model, observers, symmetric, act_dtype)
    qmodel = _write_qdq(model, out, params, symmetric, per_channel, op_types,
                        list(nodes_to_exclude) if nodes_to_exclude else None, act_dtype)
    scales, zps = _check_written(qmodel, params, output_name, symmetric)
    _save(qmodel, out, output_name, output_int8)
    return QdqResult(
        path=out,
        activation_scales=scales,
        activation_zero_points=zps,
        tensor_modules={t: m for t, m in tensor_modules(qmodel, head).items() if t in scales},
        observer=observer,
        symmetric=symmetric,
        per_channel=per_channel,
        activation_dtype=act_dtype,
        output_int8=output_int8,
        input_name=input_name,
        output_name=output_name,
        output_scale=scales[output_name],
        output_zero_point=zps[output_name],
        rewritten_nodes=rewritten,
        calibration_count=int(len(calibration_images)),
        range_search=_range_search(scales, sources, choices),
        equalization=getattr(head, "equalization", None),
    )
