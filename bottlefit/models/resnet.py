"""``custom_resnet152``: BottleFit bottleneck + torchvision ResNet-152's layer3, layer4, avgpool, fc."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models import resnet152

from bottlefit.models.bottleneck import make_bottleneck, resnet_layers


class CustomResNet(nn.Sequential):
    """Children in the authors' order: bottleneck, layer3, layer4, avgpool, flatten, fc."""


def custom_resnet152(
    bottleneck_channel: int = 12, bottleneck_ver: str = "2", bq: bool = False, num_classes: int = 1000
) -> CustomResNet:
    layers, idx = resnet_layers(bottleneck_channel, str(bottleneck_ver))
    base = resnet152(weights=None, num_classes=num_classes)  # weights come from checkpoints, never downloaded
    return CustomResNet(
        OrderedDict(
            {
                "bottleneck": make_bottleneck(layers, idx, bq),
                "layer3": base.layer3,
                "layer4": base.layer4,
                "avgpool": base.avgpool,
                "flatten": nn.Flatten(1),
                "fc": base.fc,
            }
        )
    )
