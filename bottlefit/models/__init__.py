"""BottleFit architectures (the authors' module and key names), model cards and checkpoint I/O."""

from bottlefit.models.card import BottleneckSpec, ModelCard
from bottlefit.models.registry import Architecture, build, get, names

__all__ = ["Architecture", "BottleneckSpec", "ModelCard", "build", "get", "names"]
