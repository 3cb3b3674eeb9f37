"""ncnn runner (Tencent's inference library for mobile CPUs), and ncnn's int8 scheme evaluated exactly.

An ncnn model is two files: ``NAME.param`` (text: a magic line, the layer and blob counts, then one layer per line:
type, name, input and output counts, input blobs, output blobs, ``key=value`` parameters) and ``NAME.bin`` (the
weights, layer by layer) beside it. The runner takes the .param path. Its inputs are the Input layers' blobs, its
outputs the blobs no layer reads; each is NCHW float32 with a batch of 1 (ncnn's Mat is CHW).

Default: the ncnn library (``pip install ncnn``) with float32 semantics: its fp16 storage and arithmetic, which it
turns on by itself on cores that have them (Cortex-A76), are off, because they change the numerics.

``reference=True`` needs no ncnn: the layers :data:`REFERENCE_LAYERS` evaluated from the two files as ncnn
defines them, the same on every host. An int8 Convolution (``8=1``: per-output-channel weight scales and one input
scale follow its weights) quantizes its input to ``round(x * s_in)`` and its float weights to ``round(w * s_w[c])``
(ties away from zero, clamped to [-127, 127]; products in float32; stored int8 weights are taken as they are),
accumulates the integer products exactly, and dequantizes in float32 as ncnn does: ``acc * (1 / (s_in * s_w[c]))
+ bias``, then its fused ReLU. A float conv sums in float64. Measured: the x86-64 and the emulated A72 and A76
kernels give the reference's int8 head outputs bit for bit (tests/emulation/test_ncnn_on_arm.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.runtimes.base import IOSpec, Runner, RuntimeUnavailable

MAGIC = 7767517
REFERENCE_LAYERS = ("Input", "Convolution", "ReLU", "Pooling", "Scale", "BinaryOp")
# the 4-byte tag in front of a weight blob in NAME.bin: float32 as is, or int8 (ncnn2int8's output)
TAG_FP32, TAG_INT8 = 0, 0x000D4B38
_REQUANT = 100  # int8_scale_term above this: the conv requantizes its output (not evaluated by the reference)


@dataclass
class Layer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, float] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: int, default: float = 0) -> float:
        return self.params.get(key, default)

    def geti(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))


def parse_param(path: Path) -> list[Layer]:
    """The layers of ``path`` (an ncnn .param file); UserError naming the file and line for anything else."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the ncnn param file ({e})") from None
    if not lines or lines[0].strip() != str(MAGIC):
        raise UserError(f"{path}: not an ncnn param file (its first line is not the magic {MAGIC}; the binary "
                        ".param.bin form is not read here)")
    try:
        n_layers = int(lines[1].split()[0])
    except (IndexError, ValueError):
        raise UserError(f"{path} line 2: expected '<layer count> <blob count>'") from None
    layers = []
    for no, line in enumerate(lines[2:2 + n_layers], start=3):
        f = line.split()
        try:
            n_in, n_out = int(f[2]), int(f[3])
            blobs = f[4:4 + n_in + n_out]
            if len(blobs) != n_in + n_out:
                raise ValueError
            params: dict[int, float] = {}
            for kv in f[4 + n_in + n_out:]:
                k, _, v = kv.partition("=")
                if int(k) <= -23300:  # an array parameter
                    raise UserError(f"{path} line {no}: array parameter {kv!r} is not supported by this runner")
                params[int(k)] = float(v) if any(c in v for c in ".eE") else int(v)
        except (IndexError, ValueError):
            raise UserError(f"{path} line {no}: not a layer line ('type name n_in n_out blobs... k=v...')") from None
        layers.append(Layer(f[0], f[1], blobs[:n_in], blobs[n_in:], params))
    if len(layers) != n_layers:
        raise UserError(f"{path}: {n_layers} layers announced, {len(layers)} present")
    return layers


def read_weights(layers: list[Layer], path: Path) -> None:
    """Fill each Convolution's weights from ``path`` (its .bin), in layer order, as ncnn reads them."""
    try:
        data = path.read_bytes()
    except OSError:
        raise UserError(f"{path}: the ncnn weights file is missing beside its .param (ncnn models are "
                        "NAME.param + NAME.bin)") from None
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise UserError(f"{path}: ends at byte {len(data)}, before the weights its .param announces")
        pos += n
        return data[pos - n:pos]

    for layer in layers:
        if layer.type == "Scale":  # raw float32 arrays, no tag
            n = layer.geti(0)
            layer.weights["scale"] = np.frombuffer(take(4 * n), "<f4").astype(np.float64)
            if layer.geti(1):
                layer.weights["bias"] = np.frombuffer(take(4 * n), "<f4").astype(np.float64)
            continue
        if layer.type != "Convolution":
            continue
        size, cout = layer.geti(6), layer.geti(0)
        (tag,) = struct.unpack("<I", take(4))
        if tag == TAG_FP32:
            layer.weights["w"] = np.frombuffer(take(4 * size), "<f4").astype(np.float64)
        elif tag == TAG_INT8:
            layer.weights["w_int8"] = np.frombuffer(take(-(-size // 4) * 4)[:size], np.int8).astype(np.float64)
        else:
            raise UserError(f"{path}: layer {layer.name}: weight tag {tag:#x} (fp16 or quantized tables) is not "
                            "read by this runner")
        if layer.geti(5):
            layer.weights["bias"] = np.frombuffer(take(4 * cout), "<f4").astype(np.float64)
        if layer.geti(8):
            layer.weights["w_scale"] = np.frombuffer(take(4 * cout), "<f4").astype(np.float64)
            layer.weights["in_scale"] = np.frombuffer(take(4), "<f4").astype(np.float64)
        if layer.geti(8) > _REQUANT:
            layer.weights["out_scale"] = np.frombuffer(take(4), "<f4").astype(np.float64)
    if pos != len(data):
        raise UserError(f"{path}: {len(data) - pos} bytes left after the weights its .param announces")


def _out_size(size: int, k: int, s: int, pad: int, ceil: bool) -> int:
    span = size + 2 * pad - k
    return (-(-span // s) if ceil else span // s) + 1


def infer_shapes(layers: list[Layer]) -> dict[str, tuple[int, ...] | None]:
    """Blob -> NCHW shape (batch 1) where the layer's rule is known here, else None."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for ly in layers:
        ins = [shapes.get(b) for b in ly.inputs]
        shape: tuple[int, ...] | None = None
        if ly.type == "Input":  # w, h, c; absent: any size (not checked, nothing inferred below)
            dims = (ly.geti(2, -1), ly.geti(1, -1), ly.geti(0, -1))
            shape = (1, *dims)
        elif ins and ins[0] is not None and min(ins[0]) < 0:
            shape = None
        elif ins and ins[0] is not None and ly.type in ("ReLU", "Scale", "BinaryOp"):
            shape = ins[0]
        elif ins and ins[0] is not None and ly.type == "Convolution" and ly.geti(4) >= 0:
            _, _, h, w = ins[0]
            kw, sw, pw = ly.geti(1), ly.geti(3, 1), ly.geti(4)
            kh, sh, ph = ly.geti(11, kw), ly.geti(13, sw), ly.geti(14, pw)
            shape = (1, ly.geti(0), _out_size(h, kh, sh, ph, False), _out_size(w, kw, sw, pw, False))
        elif ins and ins[0] is not None and ly.type == "Pooling" and ly.geti(4) == 0 and ly.geti(5) in (0, 1):
            _, c, h, w = ins[0]
            k, s, p = ly.geti(1), ly.geti(2, 1), ly.geti(3)
            shape = (1, c, _out_size(h, k, s, p, ly.geti(5) == 0), _out_size(w, k, s, p, ly.geti(5) == 0))
        for b in ly.outputs:
            shapes[b] = shape
    return shapes


def _round_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _conv(ly: Layer, x: np.ndarray, path: Path) -> np.ndarray:
    import torch

    cout, cin = ly.geti(0), x.shape[1]
    kw, sw, pw = ly.geti(1), ly.geti(3, 1), ly.geti(4)
    kh, sh, ph = ly.geti(11, kw), ly.geti(13, sw), ly.geti(14, pw)
    if ly.geti(2, 1) != 1 or ly.geti(12, 1) != 1 or pw < 0 or ly.geti(9) not in (0, 1):
        raise UserError(f"{path}: layer {ly.name}: dilation, automatic padding or activation type "
                        f"{ly.geti(9)} is not evaluated by the ncnn reference (plain conv, optional ReLU)")
    if ly.geti(8) > _REQUANT:
        raise UserError(f"{path}: layer {ly.name}: int8_scale_term {ly.geti(8)} (an int8 output) is not evaluated "
                        "by the ncnn reference (it dequantizes each conv's output: int8_scale_term 1)")
    wt = ly.weights.get("w", ly.weights.get("w_int8"))
    assert wt is not None
    w = wt.reshape(cout, cin, kh, kw)
    if ly.geti(8):
        # in float32, as ncnn computes: the input times its scale, rounded; the dequantization scale
        # 1 / (s_in * s_w[c]) and acc * scale + bias
        s_in, s_w = np.float32(ly.weights["in_scale"][0]), ly.weights["w_scale"].astype(np.float32)
        x = np.clip(_round_away((x.astype(np.float32) * s_in).astype(np.float64)), -127, 127)
        if "w" in ly.weights:
            w = np.clip(_round_away(w.astype(np.float32) * s_w[:, None, None, None]), -127, 127)
    # float64 sums of integer products stay exact far beyond any conv's size here (2^53)
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w, np.float64)),
                                   stride=(sh, sw), padding=(ph, pw)).numpy()
    if ly.geti(8):
        scale = np.where(s_w != 0, np.float32(1) / (s_in * s_w), np.float32(0)).astype(np.float32)
        y32 = y.astype(np.float32) * scale[None, :, None, None]
        if "bias" in ly.weights:
            y32 = y32 + ly.weights["bias"].astype(np.float32)[None, :, None, None]
        y = y32.astype(np.float64)
    elif "bias" in ly.weights:
        y = y + ly.weights["bias"][None, :, None, None]
    return np.maximum(y, 0.0) if ly.geti(9) == 1 else y


def _pool(ly: Layer, x: np.ndarray, path: Path) -> np.ndarray:
    import torch

    if ly.geti(0) != 0 or ly.geti(4) or ly.geti(5) not in (0, 1):
        raise UserError(f"{path}: layer {ly.name}: only max pooling with explicit padding (pad_mode 0 or 1) is "
                        "evaluated by the ncnn reference")
    k, s, p = ly.geti(1), ly.geti(2, 1), ly.geti(3)
    return torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ly.geti(5) == 0).numpy()


def evaluate(layers: list[Layer], feeds: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Every blob, in float64, for the NCHW ``feeds`` (the reference semantics)."""
    blobs: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in feeds.items()}
    for ly in layers:
        if ly.type == "Input":
            continue
        x = blobs[ly.inputs[0]]
        if ly.type == "Convolution":
            y = _conv(ly, x, path)
        elif ly.type == "ReLU" and not ly.get(0):
            y = np.maximum(x, 0.0)
        elif ly.type == "Pooling":
            y = _pool(ly, x, path)
        elif ly.type == "Scale" and ly.geti(0) == x.shape[1]:
            y = x * ly.weights["scale"][None, :, None, None]
            if "bias" in ly.weights:
                y = y + ly.weights["bias"][None, :, None, None]
        elif ly.type == "BinaryOp" and ly.geti(0) == 0 and len(ly.inputs) == 2:
            y = x + blobs[ly.inputs[1]]
        else:
            raise UserError(f"{path}: layer {ly.name} ({ly.type}) is not evaluated by the ncnn reference (it knows "
                            f"{', '.join(REFERENCE_LAYERS)}: plain conv, ReLU, max pool, per-channel scale, add)")
        blobs[ly.outputs[0]] = y
    return blobs


class NcnnRunner(Runner):
    """See the module doc: the ncnn library, or with ``reference=True`` its scheme evaluated exactly."""

    name = "ncnn"

    def __init__(self, path: Path, num_threads: int = 0, reference: bool = False) -> None:
        self.reference = reference
        ncnn: Any = None
        if not reference:
            try:
                import ncnn
            except ImportError as e:
                raise RuntimeUnavailable("ncnn is not installed here: pip install ncnn") from e
        super().__init__(path)
        self.layers = parse_param(self.path)
        self.weights_path = self.path.with_suffix(".bin")
        consumed = {b for ly in self.layers for b in ly.inputs}
        shapes = infer_shapes(self.layers)
        self._inputs = {b: IOSpec(b, shapes[b], np.dtype(np.float32))
                        for ly in self.layers if ly.type == "Input" for b in ly.outputs}
        self._outputs = {b: IOSpec(b, shapes.get(b), np.dtype(np.float32))
                         for ly in self.layers for b in ly.outputs if b not in consumed}
        if reference:
            read_weights(self.layers, self.weights_path)
            return
        if not self.weights_path.is_file():
            raise UserError(f"{self.weights_path}: the ncnn weights file is missing beside its .param (ncnn models "
                            "are NAME.param + NAME.bin)")
        self._ncnn = ncnn
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.use_int8_inference = True
        opt.use_fp16_packed = opt.use_fp16_storage = opt.use_fp16_arithmetic = False
        if num_threads:
            opt.num_threads = num_threads
        if self.net.load_param(str(self.path)) != 0 or self.net.load_model(str(self.weights_path)) != 0:
            raise UserError(f"{self.path}: ncnn could not load this model and its {self.weights_path.name}")

    def input_specs(self) -> dict[str, IOSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, IOSpec]:
        return dict(self._outputs)

    def infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.reference:
            blobs = evaluate(self.layers, inputs, self.path)
            return {n: blobs[n].astype(np.float32) for n in self._outputs}
        ex = self.net.create_extractor()
        for name, x in inputs.items():
            ex.input(name, self._ncnn.Mat(np.ascontiguousarray(x[0])))  # CHW: ncnn's Mat has no batch axis
        out = {}
        for name, spec in self._outputs.items():
            ret, mat = ex.extract(name)
            if ret != 0:
                raise UserError(f"{self.path}: ncnn failed to compute {name!r} (error {ret})")
            y = np.array(mat, dtype=np.float32)
            out[name] = y.reshape(spec.shape) if spec.shape is not None else y[None]
        return out
