"""TFLite's reference kernels (the interpreter's BUILTIN_REF op resolver) for full-int8 graphs, evaluated with
vectorised numpy: the same integers as the reference interpreter, op by op, in a fraction of its time.

Fidelity of a .tflite head is judged under TFLite's reference semantics, which are integer arithmetic and so the
same on every CPU. The reference interpreter computes them one multiply at a time (~280 ms for an R152 head);
this module computes the same integers with matrix products:

* CONV_2D / DEPTHWISE_CONV_2D (int8 activations, int8 weights per channel or per tensor with zero point 0, int32
  bias): ``acc = bias + sum w * (x - zp_in)`` over the in-bounds taps (padding contributes nothing), then the
  reference requantization ``MultiplyByQuantizedMultiplier(acc, M_c, shift_c) + zp_out`` (gemmlowp's
  saturating rounding doubling high multiply, then a rounding right shift), clamped to the fused activation's
  range. ``M_c, shift_c`` come from ``in_scale * w_scale_c / out_scale`` in double precision, as TFLite's
  QuantizeMultiplier makes them (frexp, round half away from zero, Q31). The sums are integers: computed in
  float32 only where every partial sum is provably below 2^24 (so any summation order is exact), else in
  float64 (exact below 2^53).
* MAX_POOL_2D (max over the in-bounds taps, then the activation clamp), AVERAGE_POOL_2D (in-bounds sum, divided
  by the in-bounds count rounding half away from zero), ADD (both inputs rescaled onto a common 2^20-finer grid,
  summed, rescaled: three MultiplyByQuantizedMultiplier), PAD / PADV2 (the output zero point or the constant),
  TRANSPOSE, and QUANTIZE from int8 to int8 (a requantization, one MultiplyByQuantizedMultiplier).

Anything else (another op, another type, a fused activation other than RELU / RELU6 / RELU_N1_TO_1, dynamic
shapes, grouped convolution, float tensors, more than one subgraph) raises :class:`Unsupported` when the file is
loaded, and the caller runs the reference interpreter instead. Equality with the interpreter is tested bit for bit
on every BottleFit head (tests/runtimes/test_tflite_reference.py), and parity cross-checks it on a sample of each
export's images (bottlefit.parity.verify).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.runtimes.base import IOSpec, Runner, RuntimeUnavailable
from bottlefit.runtimes.cpu import one_blas_thread

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# a float32 sum of integers is exact while every partial sum stays below 2^24 in magnitude
FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53


class Unsupported(Exception):  # noqa: N818 - a reason, not a failure: the caller falls back to the interpreter
    """The graph holds an op or an attribute this evaluator does not cover; the message names it."""


# ------------------------------------------------------------------ TFLite's fixed-point arithmetic (numpy, int64)


def round_half_away(x: float) -> int:
    """C's ``std::round`` (TfLiteRound): halves away from zero (Python's round() goes to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(Q31 multiplier, shift) for a positive real multiplier, as TFLite's QuantizeMultiplier makes them (the
    double-rounding build: shift may exceed 30)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = round_half_away(q * (1 << 31))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def _wrap_int32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32's range (what C's int32 arithmetic does on these CPUs)."""
    return ((x + 2**31) & (2**32 - 1)) - 2**31


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int32 values held in int64, for a non-negative ``b`` (a
    quantized multiplier, so INT32_MIN * INT32_MIN, the one saturating case, cannot occur).

    gemmlowp computes (a*b + nudge) / 2^31 with C's division (truncating toward zero), nudge = 2^30 for a
    non-negative product, 1 - 2^30 for a negative one. For a negative t = a*b + 1 - 2^30, truncation is
    floor((t + 2^31 - 1) / 2^31) = floor((a*b + 2^30) / 2^31): one arithmetic shift gives both cases."""
    return (a * b + (1 << 30)) >> 31


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero. gemmlowp adds 1
    when the remainder ``x & mask`` exceeds ``mask/2`` (+1 for a negative x); the same as one shift of
    x + 2^(exponent-1), less 1 for a negative x (exponent > 0; exponent 0 leaves x)."""
    half = (np.int64(1) << exponent) >> 1
    return (x + half - ((x < 0) & (exponent > 0))) >> exponent


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier (double rounding) on int32 values held in int64; ``multiplier`` and
    ``shift`` broadcast against ``x`` (per output channel on the last axis)."""
    if np.any(shift > 0):  # x * 2^left in int32 first (C's int32 multiply: wraps)
        x = _wrap_int32(x << np.maximum(shift, 0))
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), np.maximum(-shift, 0))


# ------------------------------------------------------------------ the graph


@dataclass(frozen=True)
class _Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: np.ndarray  # float32, empty when not quantized
    zero_point: np.ndarray  # int64
    qdim: int
    data: np.ndarray | None  # constant tensors only

    @property
    def zp(self) -> int:
        if self.zero_point.size != 1:
            raise Unsupported(f"tensor {self.name!r}: per-channel activation quantization")
        return int(self.zero_point[0])

    @property
    def s(self) -> float:
        """The per-tensor scale as float32 (the interpreter's ``params.scale``)."""
        if self.scale.size != 1:
            raise Unsupported(f"tensor {self.name!r}: per-channel activation quantization")
        return float(self.scale[0])


_DTYPES = {"FLOAT32": np.float32, "INT32": np.int32, "INT8": np.int8, "INT64": np.int64, "UINT8": np.uint8,
           "INT16": np.int16}


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as fb
    except ImportError as e:
        raise RuntimeUnavailable("no TFLite schema here (it ships with ai-edge-litert): pip install "
                                 "'bottlefit[rpi]'") from e
    return fb


def _names(cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if isinstance(v, int) and not k.startswith("_")}


@dataclass
class _Op:
    name: str
    inputs: list[int]
    outputs: list[int]
    options: Any


class _Graph:
    """One .tflite's main subgraph: tensors (constants decoded), operators in execution order, I/O, signatures."""

    def __init__(self, data: bytes) -> None:
        fb = _schema()
        model = fb.ModelT.InitFromPackedBuf(data, 0)
        if len(model.subgraphs or []) != 1:
            raise Unsupported(f"{len(model.subgraphs or [])} subgraphs (the evaluator runs single-subgraph graphs)")
        sg = model.subgraphs[0]
        type_names = _names(fb.TensorType)
        op_names = _names(fb.BuiltinOperator)
        self.tensors: list[_Tensor] = []
        for i, t in enumerate(sg.tensors or []):
            tname = type_names.get(t.type, str(t.type))
            if tname not in _DTYPES:
                raise Unsupported(f"tensor {i} has type {tname}")
            if t.sparsity is not None:
                raise Unsupported(f"tensor {i} is sparse")
            if t.shapeSignature is not None and any(int(d) < 0 for d in t.shapeSignature):
                raise Unsupported(f"tensor {i} has a dynamic shape")
            shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
            dtype = np.dtype(_DTYPES[tname])
            q = t.quantization
            scale = np.asarray(q.scale if q is not None and q.scale is not None else [], np.float32)
            zp = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [], np.int64)
            qdim = int(q.quantizedDimension) if q is not None else 0
            data_arr = None
            buf = model.buffers[t.buffer] if t.buffer is not None and t.buffer < len(model.buffers or []) else None
            if buf is not None:
                raw: Any = buf.data
                if (raw is None or len(raw) == 0) and buf.offset and buf.offset > 1:
                    raw = data[int(buf.offset): int(buf.offset) + int(buf.size)]
                if raw is not None and len(raw) > 0:
                    data_arr = np.frombuffer(bytes(bytearray(raw)), dtype=dtype).reshape(shape).copy()
            name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            self.tensors.append(_Tensor(i, name, shape, dtype, scale, zp, qdim, data_arr))
        self.ops: list[_Op] = []
        for op in sg.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
            name = op_names.get(builtin, f"builtin {builtin}")
            if name == "CUSTOM":
                raise Unsupported("a custom op")
            self.ops.append(_Op(name, [int(i) for i in op.inputs], [int(i) for i in op.outputs], op.builtinOptions))
        self.inputs = [int(i) for i in sg.inputs]
        self.outputs = [int(i) for i in sg.outputs]
        self.aliases: dict[str, int] = {}
        for sig in model.signatureDefs or []:
            for tm in sig.inputs or []:
                key = tm.name.decode() if isinstance(tm.name, bytes) else str(tm.name)
                self.aliases[key] = int(tm.tensorIndex)
        self.activation_names = _names(fb.ActivationFunctionType)
        self.padding_names = _names(fb.Padding)


Env = dict[int, np.ndarray]
Kernel = Callable[[Env], None]


# ------------------------------------------------------------------ kernels, built once per graph


def _activation_range(graph: _Graph, act: int, out: _Tensor) -> tuple[int, int]:
    """CalculateActivationRangeQuantized for an int8 output: the clamp a fused activation leaves."""
    name = graph.activation_names.get(int(act), str(act))
    qmin, qmax = -128, 127
    scale, zp = np.float32(out.s), out.zp

    def q(f: float) -> int:
        return zp + round_half_away(float(np.float32(f) / scale))  # float division, as the kernel does

    if name == "NONE":
        return qmin, qmax
    if name == "RELU":
        return max(qmin, q(0.0)), qmax
    if name == "RELU6":
        return max(qmin, q(0.0)), min(qmax, q(6.0))
    if name == "RELU_N1_TO_1":
        return max(qmin, q(-1.0)), min(qmax, q(1.0))
    raise Unsupported(f"fused activation {name}")


def _same_or_valid(graph: _Graph, padding: int, size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """(output size, leading pad) as TFLite's ComputePaddingHeightWidth gives them."""
    eff = (k - 1) * dilation + 1
    name = graph.padding_names.get(int(padding), str(padding))
    if name == "SAME":
        out = (size + stride - 1) // stride
    elif name == "VALID":
        out = (size - eff + stride) // stride
    else:
        raise Unsupported(f"padding {name}")
    total = (out - 1) * stride + eff - size
    return out, max(0, total // 2)


def _int8(t: _Tensor, what: str) -> None:
    if t.dtype != np.int8:
        raise Unsupported(f"{what} {t.name!r} is {t.dtype.name}, not int8")
    if t.scale.size == 0:
        raise Unsupported(f"{what} {t.name!r} is not quantized")


def _nhwc(t: _Tensor, what: str) -> None:
    if len(t.shape) != 4:
        raise Unsupported(f"{what} {t.name!r} has rank {len(t.shape)}, not 4 (NHWC)")


def _windows(x: np.ndarray, k: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
             out: tuple[int, int]) -> np.ndarray:
    """(N, OH, OW, C, KH, KW) view of the taps of padded NHWC ``x``."""
    eff = ((k[0] - 1) * dilation[0] + 1, (k[1] - 1) * dilation[1] + 1)
    w = np.lib.stride_tricks.sliding_window_view(x, eff, axis=(1, 2))
    return w[:, : (out[0] - 1) * stride[0] + 1 : stride[0], : (out[1] - 1) * stride[1] + 1 : stride[1], :,
             :: dilation[0], :: dilation[1]]


def _pad_hw(x: np.ndarray, top: int, left: int, out: tuple[int, int], k: tuple[int, int], stride: tuple[int, int],
            dilation: tuple[int, int], value: float | int) -> np.ndarray:
    """``x`` (NHWC) padded with ``value`` so that every tap of every output lies inside: ``top``/``left`` ahead,
    as many as needed behind (a tap past the input's end is skipped by the kernels, like a ``value`` tap)."""
    need_h = (out[0] - 1) * stride[0] + (k[0] - 1) * dilation[0] + 1
    need_w = (out[1] - 1) * stride[1] + (k[1] - 1) * dilation[1] + 1
    bottom = max(0, need_h - top - x.shape[1])
    right = max(0, need_w - left - x.shape[2])
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


@dataclass(frozen=True)
class _Requant:
    multiplier: np.ndarray  # int64 per output channel
    shift: np.ndarray  # int64 per output channel
    zp_out: int
    act: tuple[int, int]

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        y = multiply_by_quantized_multiplier(acc, self.multiplier, self.shift) + self.zp_out
        return np.clip(y, self.act[0], self.act[1]).astype(np.int8)


def _conv_requant(graph: _Graph, x: _Tensor, w: _Tensor, out: _Tensor, channels: int, act: int) -> _Requant:
    """Per output channel: ``double(in_scale) * double(w_scale_c) / double(out_scale)`` -> (multiplier, shift),
    as TFLite's PopulateConvolutionQuantizationParams computes them from the float32 scales."""
    if w.scale.size not in (1, channels):
        raise Unsupported(f"filter {w.name!r} has {w.scale.size} scales for {channels} channels")
    if np.any(w.zero_point != 0):
        raise Unsupported(f"filter {w.name!r} has a non-zero zero point")
    in_s, out_s = float(np.float32(x.s)), float(np.float32(out.s))
    pairs = [quantize_multiplier(in_s * float(w.scale[c if w.scale.size > 1 else 0]) / out_s)
             for c in range(channels)]
    return _Requant(np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64), out.zp,
                    _activation_range(graph, act, out))


def _bias(b: _Tensor | None, channels: int) -> np.ndarray:
    if b is None:
        return np.zeros(channels, np.int64)
    if b.dtype != np.int32 or b.data is None or b.data.size != channels:
        raise Unsupported(f"bias {b.name!r} is not a constant int32 vector of {channels}")
    return b.data.astype(np.int64)


def _exact_dtype(bound: float, what: str) -> type:
    """float32 where every partial sum of the accumulation stays below 2^24, else float64; refused past int32
    (the interpreter's int32 accumulator could wrap there)."""
    if bound < FLOAT32_EXACT:
        return np.float32
    if bound <= INT32_MAX:
        return np.float64
    raise Unsupported(f"{what}: the accumulator may leave int32 ({bound:.3g})")


def _conv2d(graph: _Graph, op: _Op) -> Kernel:
    t = graph.tensors
    x, w, out = t[op.inputs[0]], t[op.inputs[1]], t[op.outputs[0]]
    b = t[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    for tensor, what in ((x, "input"), (out, "output")):
        _int8(tensor, what)
        _nhwc(tensor, what)
    _int8(w, "filter")
    if w.data is None or len(w.shape) != 4:
        raise Unsupported(f"filter {w.name!r} is not a constant OHWI tensor")
    o = op.options
    if getattr(o, "quantizedBiasType", 0):
        raise Unsupported("a conv with a non-default quantized bias type")
    cout, kh, kw, cin = w.shape
    if cin != x.shape[3]:
        raise Unsupported(f"grouped convolution ({x.shape[3]} input channels, filter takes {cin})")
    stride, dil = (int(o.strideH), int(o.strideW)), (int(o.dilationHFactor), int(o.dilationWFactor))
    oh, top = _same_or_valid(graph, o.padding, x.shape[1], kh, stride[0], dil[0])
    ow, left = _same_or_valid(graph, o.padding, x.shape[2], kw, stride[1], dil[1])
    if (oh, ow, cout) != tuple(out.shape[1:]):
        raise Unsupported(f"conv output {out.shape} is not the computed {(oh, ow, cout)}")
    requant = _conv_requant(graph, x, w, out, cout, int(o.fusedActivationFunction))
    bias = _bias(b, cout)
    zp_in = x.zp
    wq = w.data.astype(np.int64)
    span = max(127 - zp_in, zp_in + 128)  # the largest |x - zp_in|
    bound = float(np.abs(wq).reshape(cout, -1).sum(axis=1).max()) * span
    dtype = _exact_dtype(bound + float(np.abs(bias).max(initial=0)), f"conv {out.name!r}")
    # taps in (C, KH, KW) order, as the windows come
    wmat = np.ascontiguousarray(wq.transpose(0, 3, 1, 2).reshape(cout, -1).T.astype(dtype))
    src, dst = op.inputs[0], op.outputs[0]

    def run(env: Env) -> None:
        xs = env[src].astype(dtype) - dtype(zp_in)
        xp = _pad_hw(xs, top, left, (oh, ow), (kh, kw), stride, dil, 0)
        cols = _windows(xp, (kh, kw), stride, dil, (oh, ow)).reshape(-1, cin * kh * kw)
        acc = (cols @ wmat).astype(np.int64) + bias
        env[dst] = requant(acc).reshape(out.shape)

    return run


def _depthwise(graph: _Graph, op: _Op) -> Kernel:
    t = graph.tensors
    x, w, out = t[op.inputs[0]], t[op.inputs[1]], t[op.outputs[0]]
    b = t[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    for tensor, what in ((x, "input"), (out, "output")):
        _int8(tensor, what)
        _nhwc(tensor, what)
    _int8(w, "filter")
    if w.data is None or len(w.shape) != 4 or w.shape[0] != 1:
        raise Unsupported(f"depthwise filter {w.name!r} is not a constant 1HWO tensor")
    o = op.options
    _, kh, kw, cout = w.shape
    cin = x.shape[3]
    if cout % cin:
        raise Unsupported(f"depthwise conv with {cout} outputs for {cin} inputs")
    mult = cout // cin
    stride, dil = (int(o.strideH), int(o.strideW)), (int(o.dilationHFactor), int(o.dilationWFactor))
    oh, top = _same_or_valid(graph, o.padding, x.shape[1], kh, stride[0], dil[0])
    ow, left = _same_or_valid(graph, o.padding, x.shape[2], kw, stride[1], dil[1])
    if (oh, ow, cout) != tuple(out.shape[1:]):
        raise Unsupported(f"depthwise output {out.shape} is not the computed {(oh, ow, cout)}")
    requant = _conv_requant(graph, x, w, out, cout, int(o.fusedActivationFunction))
    bias = _bias(b, cout)
    zp_in = x.zp
    wq = w.data[0].astype(np.int64)  # (KH, KW, C_out)
    src, dst = op.inputs[0], op.outputs[0]

    def run(env: Env) -> None:
        xs = env[src].astype(np.int64) - zp_in
        if mult > 1:  # output channel c reads input channel c // mult
            xs = np.repeat(xs, mult, axis=3)
        xp = _pad_hw(xs, top, left, (oh, ow), (kh, kw), stride, dil, 0)
        acc = np.broadcast_to(bias, (xs.shape[0], oh, ow, cout)).copy()
        for i in range(kh):  # integer arithmetic: exact in int64
            for j in range(kw):
                r0, c0 = i * dil[0], j * dil[1]
                acc += xp[:, r0 : r0 + (oh - 1) * stride[0] + 1 : stride[0],
                          c0 : c0 + (ow - 1) * stride[1] + 1 : stride[1], :] * wq[i, j]
        env[dst] = requant(acc)

    return run


def _pool(graph: _Graph, op: _Op) -> Kernel:
    t = graph.tensors
    x, out = t[op.inputs[0]], t[op.outputs[0]]
    for tensor, what in ((x, "input"), (out, "output")):
        _int8(tensor, what)
        _nhwc(tensor, what)
    o = op.options
    k, stride = (int(o.filterHeight), int(o.filterWidth)), (int(o.strideH), int(o.strideW))
    oh, top = _same_or_valid(graph, o.padding, x.shape[1], k[0], stride[0], 1)
    ow, left = _same_or_valid(graph, o.padding, x.shape[2], k[1], stride[1], 1)
    if (oh, ow, x.shape[3]) != tuple(out.shape[1:]):
        raise Unsupported(f"pool output {out.shape} is not the computed {(oh, ow, x.shape[3])}")
    lo, hi = _activation_range(graph, int(o.fusedActivationFunction), out)
    src, dst = op.inputs[0], op.outputs[0]
    if op.name == "MAX_POOL_2D":

        def run_max(env: Env) -> None:
            # int8's lowest value is where the kernel's running max starts, so padding with it changes nothing
            xp = _pad_hw(env[src], top, left, (oh, ow), k, stride, (1, 1), -128)
            m = _windows(xp, k, stride, (1, 1), (oh, ow)).max(axis=(4, 5))
            env[dst] = np.clip(m, lo, hi).astype(np.int8)

        return run_max
    ones = _pad_hw(np.ones((1, *x.shape[1:3], 1), np.int64), top, left, (oh, ow), k, stride, (1, 1), 0)
    count = _windows(ones, k, stride, (1, 1), (oh, ow)).sum(axis=(4, 5))  # in-bounds taps per output
    if np.any(count == 0):
        raise Unsupported("an average pool window outside the input")
    half = count // 2

    def run_avg(env: Env) -> None:
        xp = _pad_hw(env[src].astype(np.int64), top, left, (oh, ow), k, stride, (1, 1), 0)
        acc = _windows(xp, k, stride, (1, 1), (oh, ow)).sum(axis=(4, 5))
        # C's truncating division of (acc +- count/2) by count: halves away from zero
        avg = np.where(acc > 0, (acc + half) // count, -((half - acc) // count))
        env[dst] = np.clip(avg, lo, hi).astype(np.int8)

    return run_avg


def _pad(graph: _Graph, op: _Op) -> Kernel:
    t = graph.tensors
    x, p, out = t[op.inputs[0]], t[op.inputs[1]], t[op.outputs[0]]
    _int8(x, "input")
    _int8(out, "output")
    if p.data is None or p.data.shape != (len(x.shape), 2):
        raise Unsupported(f"pad {out.name!r} has non-constant paddings")
    widths = [(int(a), int(b)) for a, b in p.data]
    if op.name == "PADV2" and len(op.inputs) > 2 and op.inputs[2] >= 0:
        c = t[op.inputs[2]]
        if c.data is None or c.data.size != 1 or c.dtype != np.int8:
            raise Unsupported(f"pad {out.name!r} has a non-constant or non-int8 pad value")
        value = int(c.data.reshape(-1)[0])
    else:
        value = out.zp
    src, dst = op.inputs[0], op.outputs[0]

    def run(env: Env) -> None:
        env[dst] = np.pad(env[src], widths, constant_values=np.int8(value))

    return run


def _transpose(graph: _Graph, op: _Op) -> Kernel:
    _int8(graph.tensors[op.inputs[0]], "input")
    perm = graph.tensors[op.inputs[1]].data
    if perm is None:
        raise Unsupported("a transpose with a non-constant permutation")
    axes = tuple(int(a) for a in perm.reshape(-1))
    src, dst = op.inputs[0], op.outputs[0]

    def run(env: Env) -> None:
        env[dst] = np.ascontiguousarray(env[src].transpose(axes))

    return run


def _quantize(graph: _Graph, op: _Op) -> Kernel:
    """int8 -> int8 requantization: (x - zp_in) * M + zp_out, M from in_scale / out_scale in double."""
    x, out = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    _int8(out, "output")
    src, dst = op.inputs[0], op.outputs[0]
    if x.dtype == np.int8:
        _int8(x, "input")
        mult, shift = quantize_multiplier(float(np.float32(x.s)) / float(np.float32(out.s)))
        m, sh, zp_in, zp_out = np.int64(mult), np.int64(shift), x.zp, out.zp

        def requantize(env: Env) -> None:
            y = multiply_by_quantized_multiplier(env[src].astype(np.int64) - zp_in, m, sh) + zp_out
            env[dst] = np.clip(y, -128, 127).astype(np.int8)

        return requantize
    raise Unsupported(f"QUANTIZE from {x.dtype.name} (only int8 -> int8 requantization is covered)")


def _add(graph: _Graph, op: _Op) -> Kernel:
    """int8 ADD as TFLite's reference kernel: both inputs moved to a common grid at 2^20 times their resolution
    (each ``(x - zp) << 20`` times its multiplier from ``scale / (2 * max scale)``), summed, then scaled by
    ``2 * max scale / (2^20 * out scale)``; every multiply is MultiplyByQuantizedMultiplier."""
    t = graph.tensors
    a, b, out = t[op.inputs[0]], t[op.inputs[1]], t[op.outputs[0]]
    for tensor, what in ((a, "input"), (b, "input"), (out, "output")):
        _int8(tensor, what)
    if np.broadcast_shapes(a.shape, b.shape) != out.shape:
        raise Unsupported(f"ADD of {a.shape} and {b.shape} into {out.shape}")
    left = 20
    # float32 arithmetic where the kernel has it (2 * max of two floats, 2^20 * a float), then double
    twice_max = float(np.float32(2) * max(np.float32(a.s), np.float32(b.s)))
    real = (float(np.float32(a.s)) / twice_max, float(np.float32(b.s)) / twice_max,
            twice_max / float(np.float32(1 << left) * np.float32(out.s)))
    if not all(0.0 < r < 1.0 for r in real):
        raise Unsupported(f"ADD with a rescale outside (0, 1): {real}")
    (ma, sa), (mb, sb), (mo, so) = (tuple(np.int64(v) for v in quantize_multiplier(r)) for r in real)
    lo, hi = _activation_range(graph, int(op.options.fusedActivationFunction), out)
    za, zb, zo = a.zp, b.zp, out.zp
    ia, ib, dst = op.inputs[0], op.inputs[1], op.outputs[0]

    def run(env: Env) -> None:
        xa = multiply_by_quantized_multiplier((env[ia].astype(np.int64) - za) << left, ma, sa)
        xb = multiply_by_quantized_multiplier((env[ib].astype(np.int64) - zb) << left, mb, sb)
        y = multiply_by_quantized_multiplier(xa + xb, mo, so) + zo
        env[dst] = np.clip(y, lo, hi).astype(np.int8)

    return run


KERNELS: dict[str, Callable[[_Graph, _Op], Kernel]] = {
    "ADD": _add,
    "CONV_2D": _conv2d,
    "DEPTHWISE_CONV_2D": _depthwise,
    "MAX_POOL_2D": _pool,
    "AVERAGE_POOL_2D": _pool,
    "PAD": _pad,
    "PADV2": _pad,
    "TRANSPOSE": _transpose,
    "QUANTIZE": _quantize,
}


def plan(data: bytes) -> tuple[_Graph, list[Kernel]]:
    """The graph and one kernel per operator; :class:`Unsupported` names the first thing not covered."""
    graph = _Graph(data)
    kernels = []
    for i, op in enumerate(graph.ops):
        make = KERNELS.get(op.name)
        if make is None:
            raise Unsupported(f"operator {i} is {op.name}")
        try:
            kernels.append(make(graph, op))
        except Unsupported as e:
            raise Unsupported(f"operator {i} ({op.name}): {e}") from None
    return graph, kernels


def _spec(t: _Tensor) -> IOSpec:
    return IOSpec(t.name, t.shape, t.dtype)


class TFLiteReferenceRunner(Runner):
    """A .tflite under TFLite's reference-kernel semantics, computed by this module (see its docstring). Names
    are the .tflite tensor names, as :class:`~bottlefit.runtimes.litert.LiteRTRunner` has them; an input may also
    be given by its signature name. Raises :class:`Unsupported` for a graph it does not cover."""

    name = "litert"  # the artifact's runtime: its reference semantics, not another runtime
    #: what computes the outputs, for the records that say so (LiteRTRunner has the same attributes)
    evaluator = "bottlefit.runtimes.tflite_reference (TFLite reference-kernel arithmetic, vectorised numpy)"
    reference = True
    xnnpack = False
    fallback: str | None = None

    def __init__(self, path: Path) -> None:
        _schema()
        super().__init__(path)
        self.graph, self._kernels = plan(self.path.read_bytes())
        g = self.graph
        self._inputs = {g.tensors[i].name: _spec(g.tensors[i]) for i in g.inputs}
        self._outputs = {g.tensors[i].name: _spec(g.tensors[i]) for i in g.outputs}
        self._alias = {k: g.tensors[i].name for k, i in g.aliases.items() if i in g.inputs}

    def input_specs(self) -> dict[str, IOSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, IOSpec]:
        return dict(self._outputs)

    def _resolve_alias(self, name: str) -> str:
        return name if name in self._inputs else self._alias.get(name, name)

    def infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with one_blas_thread():
            env = self.tensors(inputs)
        return {self.graph.tensors[i].name: np.array(env[i], copy=True) for i in self.graph.outputs}

    def tensors(self, inputs: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
        """Every tensor of the graph after one run, by tensor index (what the interpreter keeps with
        ``experimental_preserve_all_tensors``); ``inputs`` by canonical name, already checked."""
        g = self.graph
        env: Env = {t.index: t.data for t in g.tensors if t.data is not None}
        for i in g.inputs:
            env[i] = inputs[g.tensors[i].name]
        for kernel in self._kernels:
            kernel(env)
        return env
