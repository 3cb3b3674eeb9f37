"""BottleFit architectures (the authors' module and key names), model cards and checkpoint I/O.

The registry (and so torch) is imported on first use of its names: reading a model card, as ``bottlefit serve``
does, needs no torch."""

from __future__ import annotations

from typing import Any

from bottlefit.models.card import BottleneckSpec, ModelCard

__all__ = ["Architecture", "BottleneckSpec", "ModelCard", "build", "get", "names"]

_REGISTRY_NAMES = ("Architecture", "build", "get", "names")


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        from bottlefit.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
