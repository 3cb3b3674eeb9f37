"""What an exported file is: its role, runtime, precision and the exact encoding of its inputs and outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """What an artifact is for. Parity runs heads and tails; the rest are files the board or server reads."""

    HEAD = "head"
    TAIL = "tail"
    MODEL = "model"
    AUX = "aux"  # caches, scripts, golden data: not run by parity


class Runtime(StrEnum):
    """The runtime that runs an artifact on its device (``NONE``: a file nothing runs)."""

    ONNXRUNTIME = "onnxruntime"
    LITERT = "litert"
    TENSORRT = "tensorrt"
    NCNN = "ncnn"
    NONE = "none"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Layout(StrEnum):
    """A tensor's memory layout: channels first or last for 4-D tensors, ``NONE`` ("") for the others."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    NONE = ""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an artifact, as its runtime sees it.

    ``layout`` is NCHW or NHWC for 4-D tensors (``Layout.NONE`` otherwise). For integer tensors ``scale`` and
    ``zero_point`` give the affine map to float: ``float = scale * (q - zero_point)``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | float16 | int8 | uint8 (numpy's names)
    layout: Layout = Layout.NCHW
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", Layout(self.layout))  # a plain string from a caller or a manifest

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            name=d["name"],
            shape=tuple(int(x) for x in d["shape"]),
            dtype=d["dtype"],
            layout=Layout(d.get("layout", Layout.NCHW)),
            scale=d.get("scale"),
            zero_point=d.get("zero_point"),
        )


@dataclass
class Artifact:
    """A file in a target directory. ``file`` is relative to that directory. ``role``, ``runtime`` and
    ``precision`` are enums (a plain string given here is converted; an unknown one is a ValueError)."""

    file: str
    role: Role
    runtime: Runtime
    precision: Precision
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)  # method, observer, per-tensor ranges …
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific facts (opset, profile, …)
    sha256: str = ""
    parity: bool = True  # whether parity.verify runs this artifact

    def __post_init__(self) -> None:
        self.role, self.runtime, self.precision = Role(self.role), Runtime(self.runtime), Precision(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "role": self.role,
            "runtime": self.runtime,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "quantization": self.quantization,
            "extra": self.extra,
            "sha256": self.sha256,
            "parity": self.parity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(
            file=d["file"],
            role=Role(d["role"]),
            runtime=Runtime(d["runtime"]),
            precision=Precision(d["precision"]),
            inputs=[TensorSpec.from_dict(t) for t in d.get("inputs", [])],
            outputs=[TensorSpec.from_dict(t) for t in d.get("outputs", [])],
            quantization=d.get("quantization", {}),
            extra=d.get("extra", {}),
            sha256=d.get("sha256", ""),
            parity=bool(d.get("parity", True)),
        )
