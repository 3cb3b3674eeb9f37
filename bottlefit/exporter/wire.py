"""The bottleneck wire contract: float tensors <-> what an artifact takes and emits (shared/DESIGN.md §4)."""

from __future__ import annotations

import numpy as np

from bottlefit.exporter.artifact import TensorSpec

_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}
_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def encode(spec: TensorSpec, x: np.ndarray) -> np.ndarray:
    """Float NCHW batch -> the array the artifact's runtime takes for ``spec``."""
    x = np.asarray(x, dtype=np.float32)
    if spec.layout == "NHWC" and x.ndim == 4:
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
    if spec.layout == "NHWC" and y.ndim == 4:
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)


def to_bytes(spec: TensorSpec, y: np.ndarray) -> bytes:
    """The payload one image puts on the wire: the raw elements, C-order, in the artifact's layout."""
    return np.ascontiguousarray(y, dtype=_NP[spec.dtype]).tobytes()


def from_bytes(spec: TensorSpec, payload: bytes) -> np.ndarray:
    arr = np.frombuffer(payload, dtype=_NP[spec.dtype])
    return arr.reshape(spec.shape)
