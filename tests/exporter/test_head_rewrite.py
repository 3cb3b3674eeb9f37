from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bottlefit.exporter.head_rewrite import (
    SpaceToDepthConv,
    bn_as_depthwise,
    fold_conv_bn,
    rewrite_head,
    space_to_depth_applies,
)
from tests.targets.rpi import HEADS, head, images, randomize_bn, rewritten


@pytest.mark.slow
@pytest.mark.parametrize("key", list(HEADS))
def test_rewrite_is_exact_and_bn_free(key: str) -> None:
    h, card = head(key)
    rw = rewritten(key)
    # float32 rounding only: the proof on held-out photos records ~1e-6
    assert rw.max_abs_error is not None and rw.max_abs_error < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rw.module.modules())
    # every original child is named exactly once in the origin map, in order
    flat = [p for k in sorted(rw.origin, key=int) for p in rw.origin[k]]
    assert flat == [f"{card.bottleneck.module}.{n}" for n, _ in h.named_children()]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["r152v2", "r152v3", "d201"])
def test_bn_after_maxpool_becomes_depthwise_conv(key: str) -> None:
    rw = rewritten(key)
    child = next(k for k, v in rw.origin.items() if v == [f"{head(key)[1].bottleneck.module}.4"])
    conv = rw.module.get_submodule(child)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == conv.in_channels == 64
    assert isinstance(rw.module.get_submodule(str(int(child) - 1)), nn.MaxPool2d)


@pytest.mark.slow
def test_ver1_has_nothing_standalone() -> None:
    rw = rewritten("r152v1")
    assert [type(m).__name__ for m in rw.module] == ["Conv2d", "ReLU", "MaxPool2d"]
    assert rw.origin["0"] == ["bottleneck.encoder.0", "bottleneck.encoder.1"]


@pytest.mark.slow
def test_original_head_is_untouched() -> None:
    h, card = head("r152v2")
    before = {k: v.clone() for k, v in h.state_dict().items()}
    rewrite_head(h, card.bottleneck.module)
    assert all(torch.equal(before[k], v) for k, v in h.state_dict().items())


def test_fold_and_depthwise_match_batchnorm_numerically() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=True)
    seq = nn.Sequential(conv, nn.BatchNorm2d(16), nn.BatchNorm2d(16)).eval()
    randomize_bn(seq, seed=3)
    x = torch.randn(2, 8, 17, 17)
    with torch.no_grad():
        ref = seq(x)
        got = bn_as_depthwise(seq[2])(fold_conv_bn(conv, seq[1])(x))
    assert float((ref - got).abs().max()) < 1e-5


@pytest.mark.slow
def test_origin_of_converter_tensor_names() -> None:
    rw = rewritten("r152v2")
    name = ("torch.nn.modules.container.Sequential/torch.nn.modules.activation.ReLU_4;;"
            "torch.nn.modules.container.Sequential/torch.nn.modules.conv.Conv2d_3;1")
    assert rw.origin_of_tensor(name) == ["bottleneck.encoder.5", "bottleneck.encoder.4"]
    assert rw.origin_of_tensor("serving_default_args_0") == []


def test_rewrite_refuses_non_sequential() -> None:
    with pytest.raises(TypeError):
        rewrite_head(copy.deepcopy(nn.Conv2d(3, 3, 1)), "x")


@pytest.mark.slow
def test_rewrite_on_images_matches_torch_head() -> None:
    h, _ = head("d201")
    x = torch.from_numpy(images("calibration", 12)[:3])
    with torch.no_grad():
        ref, got = h(x.clone()).numpy(), rewritten("d201").module(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- space-to-depth stem (switchable)


@pytest.mark.parametrize(("cin", "k", "pad", "h", "w"), [(3, 7, 3, 224, 224), (3, 3, 1, 32, 30), (2, 4, 1, 18, 22),
                                                         (3, 5, 2, 16, 16), (1, 7, 0, 30, 30), (4, 2, 1, 10, 12)])
def test_space_to_depth_conv_is_exact_for_any_geometry(cin: int, k: int, pad: int, h: int, w: int) -> None:
    torch.manual_seed(k * 10 + pad)
    conv = nn.Conv2d(cin, 6, k, stride=2, padding=pad, bias=True).eval()
    s2d = SpaceToDepthConv(conv)
    x = torch.randn(2, cin, h, w)
    with torch.no_grad():
        ref, got = conv(x), s2d(x)
    assert got.shape == ref.shape
    assert float((ref - got).abs().max()) < 1e-5 * max(1.0, float(ref.abs().max()))
    a = (k + pad % 2 + 1) // 2
    assert s2d.conv.in_channels == 4 * cin and s2d.conv.kernel_size == (a, a) and s2d.conv.stride == (1, 1)


def test_space_to_depth_conv_refuses_what_it_cannot_take() -> None:
    assert not space_to_depth_applies(nn.Conv2d(3, 8, 3, stride=1))
    assert not space_to_depth_applies(nn.Conv2d(64, 8, 3, stride=2))  # many channels: no lanes to win
    assert not space_to_depth_applies(nn.Conv2d(4, 8, 3, stride=2, groups=2))
    with pytest.raises(ValueError, match="stride-2"):
        SpaceToDepthConv(nn.Conv2d(3, 8, 3, stride=1))
    with pytest.raises(ValueError, match="even input"):
        SpaceToDepthConv(nn.Conv2d(3, 8, 3, stride=2, padding=1))(torch.zeros(1, 3, 9, 10))


@pytest.mark.slow
def test_rewrite_with_space_to_depth_is_exact_on_the_r152_head_and_off_by_default() -> None:
    h, card = head("r152v2")
    x = torch.from_numpy(images("heldout", 2))
    rw = rewrite_head(h, card.bottleneck.module, x, space_to_depth=True)
    assert rw.max_abs_error is not None and rw.max_abs_error < 1e-5
    stem = rw.module.get_submodule("0")
    assert isinstance(stem, SpaceToDepthConv) and stem.conv.weight.shape == (64, 12, 4, 4)
    assert rw.origin["0"] == ["bottleneck.encoder.0", "bottleneck.encoder.1"]  # origins are unchanged
    assert any("7x7 stride-2 conv over 3 channels -> 2x2 space-to-depth" in c for c in rw.changes)
    assert not any(isinstance(m, SpaceToDepthConv) for m in rewritten("r152v2").module.modules())
    # only the stem: the 2x2 stride-2 conv over 64 channels further down stays as it is
    assert sum(isinstance(m, SpaceToDepthConv) for m in rw.module.modules()) == 1
    nested = "torch.nn.modules.container.Sequential/bottlefit.SpaceToDepthConv_0/torch.nn.modules.conv.Conv2d_conv;"
    assert rw.origin_of_tensor(nested) == ["bottleneck.encoder.0", "bottleneck.encoder.1"]


@pytest.mark.slow
def test_space_to_depth_int8_tflite_head_is_fully_int8() -> None:
    """The rewritten stem converts and quantizes: no float island (litert-torch lowers pixel_unshuffle to
    reshapes and transposes, which it keeps int8)."""
    from bottlefit.targets.rpi.tflite import export_tflite
    from tests.targets.rpi import CALIB_COUNT, scratch

    h, card = head("r152v2")
    rw = rewrite_head(h, card.bottleneck.module, space_to_depth=True)
    path = scratch("s2d") / "head.int8.tflite"
    info = export_tflite(rw, images("calibration", CALIB_COUNT), path, int8=True)
    assert info.float_ops == [] and path.stat().st_size > 0
    assert info.inputs[0].dtype == "int8" and info.inputs[0].shape == (1, 224, 224, 3)
    assert info.outputs[0].shape == (1, 29, 29, 12) and info.ops.count("CONV_2D") == 2


def _stem(seed: int, shift_sign: float) -> nn.Sequential:
    """conv -> BN -> ReLU -> max-pool -> BN -> ReLU -> conv, random BN statistics; the second BN's shifts all
    take ``shift_sign`` (-1: <= 0, the fold applies; +1: > 0, it must not)."""
    torch.manual_seed(seed)
    seq = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.MaxPool2d(3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.Conv2d(8, 4, 2, 2, 1, bias=False)).eval()
    randomize_bn(seq, seed=seed)
    bn = seq[4]
    with torch.no_grad():  # shift = beta - mean * scale: choose beta so every shift has the asked sign
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bn.bias.copy_(bn.running_mean * scale + shift_sign * (0.05 + torch.rand(8)))
    return seq


def test_pool_batchnorm_fold_is_exact_and_keeps_names() -> None:
    from bottlefit.exporter.head_rewrite import fold_pool_batchnorm

    seq = _stem(0, -1.0)
    folded, changes = fold_pool_batchnorm(seq, "bottleneck.encoder")
    assert [n for n, _ in folded.named_children()] == ["0", "2", "3", "6"]
    assert changes == ["folded bottleneck.encoder.1, bottleneck.encoder.4, bottleneck.encoder.5 into "
                       "bottleneck.encoder.0 (ahead of the max-pool bottleneck.encoder.3: exact, the BN's scales "
                       "> 0 and shifts <= 0)"]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref, got = seq(x.clone()), folded(x.clone())
    assert (ref - got).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))


def test_pool_batchnorm_fold_refuses_what_is_not_exact() -> None:
    from bottlefit.exporter.head_rewrite import fold_pool_batchnorm

    assert fold_pool_batchnorm(_stem(1, +1.0)) is None  # a positive shift survives the ReLU: not a ReLU(conv)
    neg = _stem(2, -1.0)
    with torch.no_grad():
        neg[4].weight[3] = -neg[4].weight[3]  # a negative scale turns max-pooling into min-pooling
    assert fold_pool_batchnorm(neg) is None
    assert fold_pool_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) is None


@pytest.mark.slow
@pytest.mark.parametrize("key", ["r152v2", "d201"])
def test_fold_head_keeps_the_split_exact(key: str) -> None:
    from bottlefit.exporter.split import check_split, fold_head, split
    from bottlefit.models.checkpoint import untrained
    from tests.targets.rpi import HEADS

    arch, params = HEADS[key]
    lm = untrained(arch, params)  # identity BNs: scale 1/sqrt(1 + eps) > 0, shift 0 -> the fold applies
    sm = split(lm.model, lm.card)
    folded, changes = fold_head(sm)
    assert len(changes) == 1 and folded.tail is sm.tail
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.head.modules())
    x = torch.from_numpy(images("heldout", 2))
    assert check_split(folded, x) < 1e-3
