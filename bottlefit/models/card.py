"""The model card: everything a later stage needs to know about a BottleFit model, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BottleneckSpec:
    """Where the model is cut and what crosses the network."""

    module: str  # PyTorch module path of the encoder, e.g. "bottleneck.encoder"
    shape: tuple[int, ...]  # per image, C x H x W
    dtype: str = "float32"
    quantizer: str | None = None  # "bq8" for the authors' per-image 8-bit quantizer

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelCard:
    arch: str  # custom_resnet152 | custom_densenet169 | custom_densenet201 | registered small variants
    params: dict[str, Any]  # constructor arguments, e.g. {"bottleneck_channel": 12, "bottleneck_ver": "2"}
    input_shape: tuple[int, int, int] = (3, 224, 224)
    resize: int = 256  # eval preprocessing: resize shorter side, then center crop to input_shape
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    bottleneck: BottleneckSpec = field(default_factory=lambda: BottleneckSpec("bottleneck.encoder", (12, 29, 29)))
    weights: str = "checkpoint"  # "checkpoint" or "untrained" (random init, for demos and tests)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB, already model-sized -> (N, 3, H, W) float32 model input: /255, then
        (x - mean) / std, in float32 (the calibration's preprocessing and every bench path normalize here)."""
        x = np.asarray(rgb).astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def rgb8(self, x: np.ndarray) -> np.ndarray:
        """The inverse to 8 bits, as a camera would deliver the image: (N, 3, H, W) model input -> (N, H, W, 3)
        uint8 RGB, x * std + mean, times 255, rounded half to even, clipped to 0..255, in float32."""
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        v = (np.asarray(x, np.float32) * std + mean) * np.float32(255.0)
        return np.ascontiguousarray(np.clip(np.round(v), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["bottleneck"]["shape"] = list(self.bottleneck.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        b = dict(d["bottleneck"])
        b["shape"] = tuple(int(x) for x in b["shape"])
        return cls(
            arch=str(d["arch"]),
            params=dict(d.get("params", {})),
            input_shape=tuple(int(x) for x in d.get("input_shape", (3, 224, 224))),
            resize=int(d.get("resize", 256)),
            mean=tuple(float(x) for x in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(x) for x in d.get("std", IMAGENET_STD)),
            num_classes=int(d.get("num_classes", 1000)),
            bottleneck=BottleneckSpec(**b),
            weights=str(d.get("weights", "checkpoint")),
        )
