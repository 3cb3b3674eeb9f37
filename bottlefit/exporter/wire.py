"""The bottleneck wire contract: float tensors <-> what an artifact takes and emits (docs/wire.md)."""

from __future__ import annotations

import numpy as np

from bottlefit.exporter.artifact import Layout, TensorSpec

_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}
_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def encode(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
    """Float NCHW batch -> the array the artifact's runtime takes for ``spec``."""
    x = np.asarray(x, dtype=np.float32)
    if spec.layout == Layout.NHWC and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    if spec.dtype in _RANGE:
        if spec.scale is None or spec.zero_point is None:
            raise ValueError(f"integer tensor {spec.name!r} has no scale/zero_point")
        lo, hi = _RANGE[spec.dtype]
        q = np.round(x / np.float32(spec.scale)) + spec.zero_point  # numpy rounds half to even, like the runtimes
        return np.ascontiguousarray(np.clip(q, lo, hi).astype(_NP[spec.dtype]))
    return np.ascontiguousarray(x.astype(_NP[spec.dtype]))


def decode(spec: TensorSpec, y: np.ndarray) -> np.ndarray:
    """What the artifact emitted for ``spec`` -> float32 NCHW, applying exactly the recorded affine."""
    y = np.asarray(y)
    if spec.dtype in _RANGE:
        if spec.scale is None or spec.zero_point is None:
            raise ValueError(f"integer tensor {spec.name!r} has no scale/zero_point")
        y = (y.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)
    else:
        y = y.astype(np.float32)
    if spec.layout == Layout.NHWC and y.ndim == 4:
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)


def to_bytes(spec: TensorSpec, y: np.ndarray) -> bytes:
    """The payload one image puts on the wire: the raw elements, C-order, in the artifact's layout."""
    return np.ascontiguousarray(y, dtype=_NP[spec.dtype]).tobytes()


def from_bytes(spec: TensorSpec, payload: bytes) -> np.ndarray:
    arr = np.frombuffer(payload, dtype=_NP[spec.dtype])
    return arr.reshape(spec.shape)


# The authors' per-image 8-bit quantizer ("bq", docs/checkpoints.md) on the wire. One image's payload:
#   float32 scale (little-endian) | uint8 zero_point | uint8[C*H*W] codes in NCHW order
# The tail recovers floats as scale * (code - zero_point), exactly what the model's Dequantizer computes.
BQ_HEADER = 5


def bq_payload(z: np.ndarray) -> bytes:
    """One image's float bottleneck (C x H x W) -> its bq wire payload, with the authors' arithmetic."""
    import torch

    from bottlefit.models.bottleneck import Quantizer

    q = Quantizer(8).quantize_one(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)))
    header = np.array([float(q.scale)], dtype="<f4").tobytes() + bytes([q.zero_point])
    return header + q.tensor.numpy().astype(np.uint8).tobytes()


def bq_decode(payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A bq payload -> the float C x H x W bottleneck the tail takes."""
    n = int(np.prod(shape))
    if len(payload) != BQ_HEADER + n:
        raise ValueError(f"bq payload has {len(payload)} bytes, expected {BQ_HEADER + n} for shape {shape}")
    scale = np.frombuffer(payload[:4], dtype="<f4")[0]
    zero_point = payload[4]
    codes = np.frombuffer(payload[BQ_HEADER:], dtype=np.uint8).reshape(shape)
    return (scale * (codes.astype(np.float32) - np.float32(zero_point))).astype(np.float32)


def contract(card_bottleneck: object, head_output: TensorSpec) -> dict[str, object]:
    """What crosses the network per image for a head artifact, as the manifest records it."""
    shape = tuple(card_bottleneck.shape)  # type: ignore[attr-defined]
    n = int(np.prod(shape))
    if getattr(card_bottleneck, "quantizer", None) == "bq8":
        return {"encoding": "bq8-per-image", "shape": list(shape), "layout": "NCHW", "bytes": BQ_HEADER + n,
                "payload": "float32 scale LE | uint8 zero_point | uint8[C*H*W]",
                "tail_applies": "scale * (code - zero_point)"}
    if head_output.dtype in _RANGE:
        return {"encoding": "static", "dtype": head_output.dtype, "shape": list(head_output.shape[1:]),
                "layout": head_output.layout, "bytes": n, "scale": head_output.scale,
                "zero_point": head_output.zero_point, "tail_applies": "scale * (code - zero_point)"}
    width = {"float32": 4, "float16": 2}[head_output.dtype]
    return {"encoding": head_output.dtype, "shape": list(head_output.shape[1:]), "layout": head_output.layout,
            "bytes": width * n}
