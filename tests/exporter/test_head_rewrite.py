from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bottlefit.exporter.head_rewrite import bn_as_depthwise, fold_conv_bn, rewrite_head
from tests.targets.rpi import HEADS, head, images, randomize_bn, rewritten


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


@pytest.mark.parametrize("key", ["r152v2", "r152v3", "d201"])
def test_bn_after_maxpool_becomes_depthwise_conv(key: str) -> None:
    rw = rewritten(key)
    child = next(k for k, v in rw.origin.items() if v == [f"{head(key)[1].bottleneck.module}.4"])
    conv = rw.module.get_submodule(child)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == conv.in_channels == 64
    assert isinstance(rw.module.get_submodule(str(int(child) - 1)), nn.MaxPool2d)


def test_ver1_has_nothing_standalone() -> None:
    rw = rewritten("r152v1")
    assert [type(m).__name__ for m in rw.module] == ["Conv2d", "ReLU", "MaxPool2d"]
    assert rw.origin["0"] == ["bottleneck.encoder.0", "bottleneck.encoder.1"]


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


def test_origin_of_converter_tensor_names() -> None:
    rw = rewritten("r152v2")
    name = ("torch.nn.modules.container.Sequential/torch.nn.modules.activation.ReLU_4;;"
            "torch.nn.modules.container.Sequential/torch.nn.modules.conv.Conv2d_3;1")
    assert rw.origin_of_tensor(name) == ["bottleneck.encoder.5", "bottleneck.encoder.4"]
    assert rw.origin_of_tensor("serving_default_args_0") == []


def test_rewrite_refuses_non_sequential() -> None:
    with pytest.raises(TypeError):
        rewrite_head(copy.deepcopy(nn.Conv2d(3, 3, 1)), "x")


def test_rewrite_on_images_matches_torch_head() -> None:
    h, _ = head("d201")
    x = torch.from_numpy(images("calibration", 12)[:3])
    with torch.no_grad():
        ref, got = h(x.clone()).numpy(), rewritten("d201").module(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
