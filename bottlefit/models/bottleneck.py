"""The BottleFit bottleneck: one flat layer list cut at ``bottleneck_idx`` into encoder and decoder.

Module and index names follow the authors' code exactly (docs/checkpoints.md) so that their
``state_dict`` loads with ``strict=True``: the decoder's indices restart at 0 after the cut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int, s: int, p: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p, bias=False)


def _stem(out_ch: int = 64) -> list[nn.Module]:
    # conv 7x7/2, BN, ReLU, max-pool 3x3/2 — the torchvision stem, re-created (no pretrained weights).
    return [_conv(3, out_ch, 7, 2, 3), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]


def resnet_layers(bottleneck_channel: int, bottleneck_ver: str) -> tuple[list[nn.Module], int]:
    """Layer list and cut index of ``Bottleneck4ResNet152``. Version matching is by string, as upstream:
    '1' and '2' select ver1 and ver2; any other value (including '3' and the integer 2) selects ver3."""
    bc = bottleneck_channel
    ver = bottleneck_ver
    if ver == "1":
        layers = [
            *_stem(bc),
            nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
            _conv(bc, 64, 2, 2, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            _conv(64, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            _conv(512, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            _conv(512, 512, 2, 1, 0), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            _conv(512, 512, 2, 1, 0), nn.AvgPool2d(2, 1),
        ]  # fmt: skip
        return layers, 4
    if ver == "2":
        layers = [
            *_stem(64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            _conv(64, bc, 2, 2, 1),
            nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
            _conv(bc, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            _conv(512, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            _conv(512, 512, 2, 1, 0), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            _conv(512, 512, 2, 1, 0), nn.AvgPool2d(2, 1),
        ]  # fmt: skip
        return layers, 7
    layers = [
        *_stem(64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        _conv(64, 512, 2, 2, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        _conv(512, bc, 2, 2, 1),
        nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(bc, 512, kernel_size=2, stride=2, padding=0, bias=False),
        nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        _conv(512, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        _conv(512, 512, 2, 1, 0), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        _conv(512, 512, 2, 1, 0), nn.AvgPool2d(2, 1),
    ]  # fmt: skip
    return layers, 10


def densenet_layers(bottleneck_channel: int) -> tuple[list[nn.Module], int]:
    """Layer list and cut index of ``Bottleneck4DenseNet`` (shared by DenseNet-169 and -201)."""
    bc = bottleneck_channel
    layers = [
        *_stem(64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        _conv(64, bc, 2, 2, 1),
        nn.BatchNorm2d(bc), nn.ReLU(inplace=True),
        _conv(bc, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        _conv(512, 512, 2, 1, 1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        _conv(512, 256, 2, 1, 0), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
        _conv(256, 256, 2, 1, 0), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
        _conv(256, 256, 2, 1, 0), nn.AvgPool2d(2, 2),
    ]  # fmt: skip
    return layers, 7


class QuantizedTensor(NamedTuple):
    tensor: torch.Tensor  # uint8
    scale: torch.Tensor  # 0-dim float
    zero_point: int


class Quantizer:
    """The authors' 8-bit bottleneck quantizer ("bq", docs/checkpoints.md), applied per image.

    Upstream computes one min/max over the whole batch and evaluates with batch size 1; computing them per
    image gives the same results at any batch size. The zero point is truncated (``int()``), as upstream.
    A constant tensor (max == min) would divide by zero upstream; here it gets scale 1 so it stays finite.
    """

    def __init__(self, num_bits: int = 8) -> None:
        if num_bits != 8:
            raise ValueError("only num_bits=8 is supported")
        self.num_bits = num_bits

    def quantize_one(self, z: torch.Tensor) -> QuantizedTensor:
        lo, hi = z.min(), z.max()
        scale = (hi - lo) / 255.0
        if float(scale) == 0.0:
            scale = torch.ones_like(scale)
        zp = int((-lo / scale).clamp(0, 255).item())
        q = (zp + z / scale).clamp(0, 255).round().to(torch.uint8)
        return QuantizedTensor(q, scale, zp)

    def __call__(self, z: torch.Tensor) -> list[QuantizedTensor]:
        return [self.quantize_one(z[i]) for i in range(z.shape[0])]


class Dequantizer:
    def __init__(self, num_bits: int = 8) -> None:
        self.num_bits = num_bits

    def __call__(self, qs: list[QuantizedTensor]) -> torch.Tensor:
        return torch.stack([q.scale * (q.tensor.float() - q.zero_point) for q in qs])


class BottleneckBase(nn.Module):
    """Encoder -> optional compressor -> optional decompressor -> decoder, in every mode (as upstream).

    ``compressor``/``decompressor`` are plain callables, so they add no state_dict entries.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        compressor: Callable | None = None,
        decompressor: Callable | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.compressor = compressor
        self.decompressor = decompressor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if self.compressor is not None:
            z = self.compressor(z)
        if self.decompressor is not None:
            z = self.decompressor(z)
        return self.decoder(z)


def make_bottleneck(layers: list[nn.Module], idx: int, quantize: bool) -> BottleneckBase:
    return BottleneckBase(
        nn.Sequential(*layers[:idx]),
        nn.Sequential(*layers[idx:]),
        Quantizer(8) if quantize else None,
        Dequantizer(8) if quantize else None,
    )
