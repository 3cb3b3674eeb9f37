"""What an exported file is: its runtime, precision and the exact encoding of its inputs and outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an artifact, as its runtime sees it.

    ``layout`` is "NCHW" or "NHWC" for 4-D tensors ("" otherwise). For integer tensors ``scale`` and
    ``zero_point`` give the affine map to float: ``float = scale * (q - zero_point)``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | float16 | int8 | uint8
    layout: str = "NCHW"
    scale: float | None = None
    zero_point: int | None = None

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
            layout=d.get("layout", "NCHW"),
            scale=d.get("scale"),
            zero_point=d.get("zero_point"),
        )


@dataclass
class Artifact:
    """A file in a target directory. ``file`` is relative to that directory."""

    file: str
    role: str  # head | tail | model | aux (caches, scripts, golden data: not run by parity)
    runtime: str  # onnxruntime | litert | tensorrt | none
    precision: str  # fp32 | fp16 | int8
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)  # method, observer, per-tensor ranges …
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific facts (opset, profile, …)
    sha256: str = ""
    parity: bool = True  # whether parity.verify runs this artifact

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
            role=d["role"],
            runtime=d["runtime"],
            precision=d["precision"],
            inputs=[TensorSpec.from_dict(t) for t in d.get("inputs", [])],
            outputs=[TensorSpec.from_dict(t) for t in d.get("outputs", [])],
            quantization=d.get("quantization", {}),
            extra=d.get("extra", {}),
            sha256=d.get("sha256", ""),
            parity=bool(d.get("parity", True)),
        )
