"""Reduced-size BottleFit variants for the demo and fast tests.

``mini_resnet`` is built exactly like ``custom_resnet152`` (docs/checkpoints.md): a BottleFit
bottleneck replaces the teacher's stem + layer1 + layer2, and the teacher's layer3, layer4, avgpool and fc are
kept. Only the sizes shrink: the teacher is a torchvision ``ResNet`` of ``BasicBlock`` [1, 1, 1, 1] with widths
16/32/64/128, 10 classes, on 3x32x32 inputs (MNIST digits upsampled from 28x28 and repeated to 3 channels).

Shapes for a 3x32x32 input (the ver2 layer list, scaled down; the same k2 conv/avg-pool arithmetic):

| module | teacher | student |
|---|---|---|
| stem (conv 7x7/2 + max-pool) | 16x8x8 | encoder: 16x8x8 |
| layer1 / bottleneck conv k2 s2 p1 | 16x8x8 | **bc x 5 x 5** (the bottleneck) |
| layer2 / decoder (5→6→7→6→5, avg-pool k2 s1) | 32x4x4 | 32x4x4 |
| layer3 | 64x2x2 | 64x2x2 (kept) |
| layer4 | 128x1x1 | 128x1x1 (kept) |
| avgpool, fc | 10 | 10 (kept) |
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from bottlefit.models.bottleneck import make_bottleneck
from bottlefit.models.resnet import CustomResNet

MINI_WIDTHS = (16, 32, 64, 128)
MINI_INPUT = (3, 32, 32)
MINI_RESIZE = 32  # eval preprocessing resizes the shorter side to the input size: the centre crop keeps it all
MINI_TEACHER = "mini_resnet_teacher"


class MiniResNet(ResNet):
    """torchvision's ResNet with narrower stages: same module names and forward, so its state_dict keys are
    torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` …) and the hook pairs are the ResNet ones."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = MINI_WIDTHS) -> None:
        # ResNet.__init__ hard-codes 64..512 channels, so set up what _make_layer needs ourselves.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # BasicBlock only accepts the default
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        # torchvision's init, so the teacher trains as a torchvision ResNet would.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_teacher(num_classes: int = 10) -> MiniResNet:
    """The teacher ``mini_resnet`` is distilled from (random init; the demo trains it first)."""
    return MiniResNet(num_classes=num_classes)


def _conv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p, bias=False)


def mini_layers(
    bottleneck_channel: int, widths: tuple[int, int, int, int] = MINI_WIDTHS
) -> tuple[list[nn.Module], int]:
    """The ver2 layer list (cut at 7) with the stem at widths[0] and the decoder at the teacher's layer2 width."""
    bc, w0, w1 = bottleneck_channel, widths[0], widths[1]
    layers = [
        _conv(3, w0, 7, 2, 3), nn.BatchNorm2d(w0), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
        _conv(w0, bc, 2, 2, 1),
        nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
        _conv(bc, w1, 2, 1, 1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        _conv(w1, w1, 2, 1, 1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        _conv(w1, w1, 2, 1, 0), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        _conv(w1, w1, 2, 1, 0), nn.AvgPool2d(2, 1),
    ]  # fmt: skip
    return layers, 7


def mini_resnet(bottleneck_channel: int = 4, bq: bool = False, num_classes: int = 10) -> CustomResNet:
    layers, idx = mini_layers(bottleneck_channel)
    base = build_teacher(num_classes)
    return CustomResNet(
        OrderedDict(
            bottleneck=make_bottleneck(layers, idx, bq),
            layer3=base.layer3,
            layer4=base.layer4,
            avgpool=base.avgpool,
            flatten=nn.Flatten(1),
            fc=base.fc,
        )
    )


# Teachers that are not torchvision models, by the name an Architecture's ``teacher`` field uses.
TEACHERS = {MINI_TEACHER: build_teacher}
