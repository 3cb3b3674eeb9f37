"""Architectures: shapes, parameter counts and key names (docs/checkpoints.md), from the authors' layer specs."""

from __future__ import annotations

import pytest
import torch

from bottlefit.errors import UserError
from bottlefit.models import build
from bottlefit.models.bottleneck import Dequantizer, Quantizer

# (arch, params) -> (bottleneck shape, encoder params, decoder params, total params, bottleneck state_dict entries)
CASES = [
    ("custom_resnet152", {"bottleneck_ver": "2", "bottleneck_channel": 3}, (3, 29, 29), 10_432, 3_154_950,
     60_793_006, 36),
    ("custom_resnet152", {"bottleneck_ver": "2", "bottleneck_channel": 12}, (12, 29, 29), 12_736, 3_173_400,
     60_813_760, 36),
    ("custom_resnet152", {"bottleneck_ver": "1", "bottleneck_channel": 3}, (3, 56, 56), 447, 3_280_774, 60_908_845, 36),
    ("custom_resnet152", {"bottleneck_ver": "1", "bottleneck_channel": 12}, (12, 56, 56), 1_788, 3_283_096,
     60_912_508, 36),
    ("custom_resnet152", {"bottleneck_ver": "3", "bottleneck_channel": 12}, (12, 15, 15), 166_336, 3_173_400,
     60_967_360, 42),
    ("custom_resnet152", {"bottleneck_ver": "3", "bottleneck_channel": 24}, (24, 15, 15), 190_912, 3_198_000,
     61_016_536, 42),
    ("custom_densenet169", {"bottleneck_channel": 3}, (3, 29, 29), 10_432, 2_106_374, 14_836_654, 42),
    ("custom_densenet169", {"bottleneck_channel": 12}, (12, 29, 29), 12_736, 2_124_824, 14_857_408, 42),
    ("custom_densenet201", {"bottleneck_channel": 12}, (12, 29, 29), 12_736, 2_124_824, 20_721_856, 42),
]


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("arch,params,shape,enc,dec,total,n_keys", CASES)
def test_shapes_and_parameter_counts(arch, params, shape, enc, dec, total, n_keys) -> None:
    model, card = build(arch, params)
    prefix = card.bottleneck.module.rsplit(".", 1)[0]
    bottleneck = model.get_submodule(prefix)
    assert card.bottleneck.shape == shape
    assert _count(bottleneck.encoder) == enc
    assert _count(bottleneck.decoder) == dec
    assert _count(model) == total
    keys = [k for k in model.state_dict() if k.startswith(prefix + ".")]
    assert len(keys) == n_keys
    with torch.no_grad():
        z = bottleneck.encoder(torch.randn(1, 3, 224, 224))
        out = bottleneck.decoder(z)
    assert tuple(z.shape[1:]) == shape
    assert tuple(out.shape[1:]) == ((512, 28, 28) if arch == "custom_resnet152" else (256, 14, 14))


@pytest.mark.slow
def test_authors_key_names() -> None:
    model, _ = build("custom_resnet152", {"bottleneck_ver": "2", "bottleneck_channel": 12})
    sd = model.state_dict()
    assert tuple(sd["bottleneck.encoder.6.weight"].shape) == (12, 64, 2, 2)
    assert tuple(sd["bottleneck.decoder.2.weight"].shape) == (512, 12, 2, 2)
    assert "bottleneck.decoder.0.num_batches_tracked" in sd
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    assert not any(k.startswith(("conv1", "bn1", "layer1", "layer2")) for k in sd)
    assert [n for n, _ in model.named_children()] == ["bottleneck", "layer3", "layer4", "avgpool", "flatten", "fc"]
    dn, _ = build("custom_densenet201", {"bottleneck_channel": 12})
    assert [n for n, _ in dn.features.named_children()] == [
        "bottleneck", "denseblock3", "transition3", "denseblock4", "norm5"]
    assert tuple(dn.state_dict()["classifier.weight"].shape) == (1000, 1920)
    assert tuple(dn.state_dict()["features.bottleneck.decoder.14.weight"].shape) == (256, 256, 2, 2)
    v3, _ = build("custom_resnet152", {"bottleneck_ver": "3", "bottleneck_channel": 12})
    assert tuple(v3.state_dict()["bottleneck.decoder.2.weight"].shape) == (12, 512, 2, 2)  # ConvTranspose: in x out


@pytest.mark.slow
def test_version_matching_is_by_string_as_upstream() -> None:
    # The integer 2 is not '2': upstream falls through to ver3.
    _, card = build("custom_resnet152", {"bottleneck_ver": 2, "bottleneck_channel": 12})
    assert card.params["bottleneck_ver"] == "3" and card.bottleneck.shape == (12, 15, 15)
    with pytest.raises(UserError, match="bottleneck_idx=4"):
        build("custom_resnet152", {"bottleneck_ver": "2", "bottleneck_idx": 4})
    with pytest.raises(UserError, match="unknown architecture"):
        build("resnet9000")


def test_bq_quantizer_matches_hand_computation() -> None:
    z = torch.tensor([[[[-1.0, 0.0], [0.5, 2.0]]]])
    (q,) = Quantizer(8)(z)
    scale = 3.0 / 255.0
    zp = int(min(max(1.0 / scale, 0), 255))  # 85.0 -> 85 (truncated)
    assert abs(float(q.scale) - scale) < 1e-7 and q.zero_point == zp == 85
    expected = torch.tensor([[[0, 85], [128, 255]]], dtype=torch.uint8)  # 85+0.5/s = 127.5 -> 128 (half to even)
    assert torch.equal(q.tensor, expected)
    back = Dequantizer(8)([q])
    assert float((back - z).abs().max()) <= scale / 2 + 1e-6


@pytest.mark.slow
def test_bq_is_per_image() -> None:
    z = torch.stack([torch.linspace(-1, 1, 16).reshape(1, 4, 4), 10 * torch.linspace(-1, 1, 16).reshape(1, 4, 4)])
    qs = Quantizer(8)(z)
    assert abs(float(qs[0].scale) * 10 - float(qs[1].scale)) < 1e-6
    model, card = build("custom_densenet169", {"bottleneck_channel": 3, "bq": True})
    assert card.bottleneck.quantizer == "bq8" and card.bottleneck.dtype == "uint8"


def test_registry_describes_every_builtin_architecture() -> None:
    from bottlefit.models import get, names
    from bottlefit.models.small import MINI_INPUT, MINI_TEACHER, TEACHERS

    assert names() == ["custom_densenet169", "custom_densenet201", "custom_resnet152", "mini_resnet"]
    mini = get("mini_resnet")
    assert (mini.teacher, mini.input_shape, mini.resize) == (MINI_TEACHER, MINI_INPUT, 32)
    assert mini.teacher in TEACHERS
    _, card = build("mini_resnet")
    assert card.input_shape == MINI_INPUT and card.num_classes == 10 and card.bottleneck.shape == (4, 5, 5)


def test_architecture_modules_do_not_import_the_registry() -> None:
    # Registration happens on the registry's side only: no import circle between them.
    import ast
    import importlib

    for mod in ("bottlefit.models.small", "bottlefit.models.resnet", "bottlefit.models.densenet"):
        tree = ast.parse(open(importlib.import_module(mod).__file__, encoding="utf-8").read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not any("registry" in (m or "") for m in imported), mod


def test_card_rgb8_inverts_normalize_exactly_on_8_bit_images() -> None:
    """One de/normalisation (ModelCard.normalize / rgb8, float32) for the calibration, the demo and the bench: every
    8-bit image survives the round trip bit for bit; rgb8 rounds half to even and clips what no pixel can hold."""
    import numpy as np

    from bottlefit.models.card import IMAGENET_MEAN, IMAGENET_STD, ModelCard

    card = ModelCard(arch="x", params={}, input_shape=(3, 4, 5), resize=4, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (0, 128, 255)
    x = card.normalize(rgb)
    assert x.shape == (3, 3, 4, 5) and x.dtype == np.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([(v / 255 - m) / s for v, m, s in
                                                     zip((0, 128, 255), IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert np.array_equal(card.rgb8(x), rgb)
    grey = ModelCard(arch="x", params={}, input_shape=(3, 1, 4), resize=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    levels = np.array([-0.2, 2.5 / 255, 3.5 / 255, 1.3], np.float32).reshape(1, 1, 1, 4).repeat(3, axis=1)
    assert card.rgb8(levels).dtype == np.uint8 and grey.rgb8(levels)[0, 0, :, 0].tolist() == [0, 2, 4, 255]
