"""``custom_densenet169``/``custom_densenet201``: BottleFit bottleneck + torchvision DenseNet's later blocks."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import densenet169, densenet201

from bottlefit.models.bottleneck import densenet_layers, make_bottleneck


class CustomDenseNet(nn.Module):
    """features = (bottleneck, denseblock3, transition3, denseblock4, norm5), then relu, pool, classifier."""

    def __init__(self, bottleneck: nn.Module, base: nn.Module) -> None:
        super().__init__()
        kept = ["denseblock3", "transition3", "denseblock4", "norm5"]
        modules: OrderedDict[str, nn.Module] = OrderedDict(bottleneck=bottleneck)
        for name, child in base.features.named_children():
            if name in kept:
                modules[name] = child
        self.features = nn.Sequential(modules)
        self.relu = nn.ReLU(inplace=True)
        self.adaptive_avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = base.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        z = self.relu(z)
        z = self.adaptive_avgpool(z)
        return self.classifier(torch.flatten(z, 1))


def _custom_densenet(factory, bottleneck_channel: int, bq: bool, num_classes: int) -> CustomDenseNet:
    layers, idx = densenet_layers(bottleneck_channel)
    return CustomDenseNet(make_bottleneck(layers, idx, bq), factory(weights=None, num_classes=num_classes))


def custom_densenet169(bottleneck_channel: int = 12, bq: bool = False, num_classes: int = 1000) -> CustomDenseNet:
    return _custom_densenet(densenet169, bottleneck_channel, bq, num_classes)


def custom_densenet201(bottleneck_channel: int = 12, bq: bool = False, num_classes: int = 1000) -> CustomDenseNet:
    return _custom_densenet(densenet201, bottleneck_channel, bq, num_classes)
