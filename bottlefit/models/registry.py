"""The architectures BottleFit knows, their parameters, and the model card each one yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bottlefit.errors import UserError
from bottlefit.models.card import BottleneckSpec, ModelCard


@dataclass(frozen=True)
class Architecture:
    name: str
    factory: Callable[..., nn.Module]
    encoder_path: str  # module path of the encoder: the head's last module
    defaults: dict[str, Any]
    teacher: str  # torchvision classifier the student is distilled from
    input_shape: tuple[int, int, int] = (3, 224, 224)
    resize: int = 256


_ARCHS: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _ARCHS[arch.name] = arch
    return arch


def names() -> list[str]:
    _load_builtin()
    return sorted(_ARCHS)


def get(name: str) -> Architecture:
    _load_builtin()
    if name not in _ARCHS:
        raise UserError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(_ARCHS))}")
    return _ARCHS[name]


def builtin_architectures() -> list[Architecture]:
    """The architectures BottleFit ships: the authors' three and the small demo variant.

    The architecture modules only define models; this is the one place that imports them (lazily: they import
    torchvision) and describes them, so nothing in them imports the registry.
    """
    from bottlefit.models import small
    from bottlefit.models.densenet import custom_densenet169, custom_densenet201
    from bottlefit.models.resnet import custom_resnet152

    archs = [
        Architecture(
            "custom_resnet152",
            custom_resnet152,
            "bottleneck.encoder",
            {"bottleneck_channel": 12, "bottleneck_ver": "2", "bq": False, "num_classes": 1000},
            "resnet152",
        )
    ]
    for name, fn in (("custom_densenet169", custom_densenet169), ("custom_densenet201", custom_densenet201)):
        archs.append(
            Architecture(
                name,
                fn,
                "features.bottleneck.encoder",
                {"bottleneck_channel": 12, "bq": False, "num_classes": 1000},
                name.removeprefix("custom_"),
            )
        )
    archs.append(
        Architecture(
            "mini_resnet",
            small.mini_resnet,
            "bottleneck.encoder",
            {"bottleneck_channel": 4, "bq": False, "num_classes": 10},
            small.MINI_TEACHER,
            input_shape=small.MINI_INPUT,
            resize=small.MINI_RESIZE,
        )
    )
    return archs


_builtin_loaded = False


def _load_builtin() -> None:
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    for arch in builtin_architectures():
        register(arch)


_VER_IDX = {"1": 4, "2": 7}


def normalize_params(arch: Architecture, raw: dict[str, Any]) -> dict[str, Any]:
    """Our parameter dict from ours or the authors' config ``params`` (which name the bq processors)."""
    params = dict(arch.defaults)
    for key, value in raw.items():
        if key in ("compressor", "decompressor"):
            if value:
                name = value.get("name") if isinstance(value, dict) else None
                bits = (value.get("params") or {}).get("num_bits", 8) if isinstance(value, dict) else 8
                if name not in ("Quantizer", "Dequantizer") or bits != 8:
                    raise UserError(f"unsupported bottleneck processor {value!r}: only the 8-bit Quantizer is known")
                params["bq"] = True
        elif key in ("pretrained", "short_module_names", "short_feature_names", "bottleneck_idx"):
            continue  # checked below or irrelevant: weights come from the checkpoint
        elif key in params:
            params[key] = value
        else:
            raise UserError(f"unknown parameter {key!r} for {arch.name}; known: {', '.join(sorted(params))}")
    if "bottleneck_ver" in params:
        # Upstream matches by string: '1' and '2' pick ver1/ver2, anything else (the integer 2 too) is ver3.
        params["bottleneck_ver"] = params["bottleneck_ver"] if params["bottleneck_ver"] in ("1", "2") else "3"
    idx = raw.get("bottleneck_idx")
    if idx is not None:
        expected = _VER_IDX.get(params.get("bottleneck_ver", "2"), 10) if "bottleneck_ver" in params else 7
        if int(idx) != expected:
            raise UserError(
                f"bottleneck_idx={idx} is not a BottleFit configuration for {arch.name} (expected {expected})"
            )
    params["bottleneck_channel"] = int(params["bottleneck_channel"])
    if params["bottleneck_channel"] < 1:
        raise UserError("bottleneck_channel must be a positive integer")
    return params


def build(name: str, params: dict[str, Any] | None = None, weights: str = "checkpoint") -> tuple[nn.Module, ModelCard]:
    """Build an architecture (weights from PyTorch's default init) and its model card."""
    arch = get(name)
    p = normalize_params(arch, params or {})
    model = arch.factory(**p)
    model.eval()
    encoder = model.get_submodule(arch.encoder_path)
    with torch.no_grad():
        z = encoder(torch.zeros(1, *arch.input_shape))
    card = ModelCard(
        arch=name,
        params=p,
        input_shape=arch.input_shape,
        resize=arch.resize,
        num_classes=int(p.get("num_classes", 1000)),
        bottleneck=BottleneckSpec(arch.encoder_path, tuple(z.shape[1:]), "uint8" if p.get("bq") else "float32",
                                  "bq8" if p.get("bq") else None),
        weights=weights,
    )
    return model, card
