"""Weight rounding (bottlefit.exporter.rounding): weights on the converters' int8 grid, GPTQ's gain over
round-to-nearest measured on held-out photos, bias correction's mean, and the same integers in every converter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bottlefit.errors import UserError
from bottlefit.exporter.rounding import round_head
from bottlefit.exporter.split import fold_head, split
from bottlefit.models.checkpoint import untrained
from tests.targets.rpi import images


@pytest.fixture(scope="module")
def r152v2(r152):
    """The session's ResNet-152 ver2 (12 ch, seed 0), its head folded (a new module: the session's stays as is)."""
    return fold_head(split(r152.model, r152.card))[0]


def _ints(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().double().flatten(1)
    scale = w.abs().amax(1, keepdim=True) / 127
    return w / scale, scale


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    r, e = ref.flatten(1).double(), (got - ref).flatten(1).double()
    return float((10 * torch.log10((r**2).sum(1) / (e**2).sum(1))).mean())


@pytest.mark.slow
def test_gptq_weights_sit_on_the_grid_and_beat_nearest(r152v2) -> None:
    calib, held = images("calibration", 24), torch.from_numpy(images("heldout", 8))
    near, rec_n = round_head(r152v2.head, calib, "nearest")
    gptq, rec_g = round_head(r152v2.head, calib, "gptq")
    for h in (near, gptq):
        for name in ("0", "6"):
            q, _ = _ints(h.encoder.get_submodule(name).weight)
            assert (q - q.round()).abs().max() < 1e-3  # integers, to float32 precision
            assert q.abs().max() <= 127 + 1e-3 and bool((q.abs().amax(1) > 126.999).all())  # the scale survives
    with torch.no_grad():
        ref = r152v2.head(held)
        s_near, s_gptq = _sqnr(ref, near(held)), _sqnr(ref, gptq(held))
    # weights-only error of the head on held-out photos; measured 40.9 dB nearest, 53.9 dB GPTQ (24 images)
    assert s_near > 38 and s_gptq > s_near + 8, (s_near, s_gptq)
    assert rec_g.layers["encoder.0"]["sqnr_db"] > rec_g.layers["encoder.0"]["sqnr_db_nearest"] + 10
    assert rec_n.layers["encoder.0"]["sqnr_db"] == rec_n.layers["encoder.0"]["sqnr_db_nearest"]
    # the original head is untouched, and the same inputs give the same weights, bit for bit
    again, _ = round_head(r152v2.head, calib, "gptq")
    assert all(torch.equal(a, b) for a, b in zip(gptq.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    assert not torch.equal(r152v2.head.encoder.get_submodule("0").weight, gptq.encoder.get_submodule("0").weight)


@pytest.mark.slow
def test_bias_correction_removes_the_mean_error(r152v2) -> None:
    calib = images("calibration", 16)
    x = torch.from_numpy(calib)
    conv = r152v2.head.encoder.get_submodule("0")
    for method in ("nearest", "gptq"):
        plain, _ = round_head(r152v2.head, calib, method)
        corr, rec = round_head(r152v2.head, calib, method, bias_correction=True)
        with torch.no_grad():
            ref = conv(x).double().mean((0, 2, 3))
            before = (plain.encoder.get_submodule("0")(x).double().mean((0, 2, 3)) - ref).abs().max()
            after = (corr.encoder.get_submodule("0")(x).double().mean((0, 2, 3)) - ref).abs().max()
        assert after < 1e-5 < before, (method, float(before), float(after))
        assert rec.layers["encoder.6"]["bias_shift_max"] > 0
    # the last conv had no bias: bias correction gives it one
    assert corr.encoder.get_submodule("6").bias is not None and r152v2.head.encoder.get_submodule("6").bias is None


@pytest.mark.slow
def test_onnx_runtime_writes_the_rounded_integers(r152v2, tmp_path) -> None:
    from bottlefit.exporter.onnx import export_onnx
    from bottlefit.exporter.qdq import quantize_head

    calib = images("calibration", 8)
    head, _ = round_head(r152v2.head, calib, "gptq")
    fp32 = export_onnx(head, torch.from_numpy(calib[:1]), tmp_path / "h.onnx", 13, "input", "bottleneck")
    q = quantize_head(fp32.path, tmp_path / "q.onnx", calib, head, "minmax", symmetric=True)
    model = onnx.load(str(q.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    want = {tuple(m.weight.shape): _ints(m.weight)[0].round().to(torch.int8).numpy()
            for m in head.modules() if isinstance(m, nn.Conv2d)}
    got = {a.shape: a for a in inits.values() if a.dtype == np.int8 and a.ndim == 4}
    assert set(got) == set(want)
    for shape, q8 in want.items():
        assert np.array_equal(got[shape].reshape(q8.shape[0], -1), q8.reshape(q8.shape[0], -1)), shape


@pytest.mark.slow
def test_tflite_writes_the_rounded_integers(r152v2) -> None:
    pytest.importorskip("litert_torch")
    from ai_edge_litert import interpreter as li

    from bottlefit.exporter.head_rewrite import rewrite_head
    from bottlefit.targets.rpi.tflite import convert_bytes

    calib = images("calibration", 8)
    head, _ = round_head(r152v2.head, calib, "gptq")
    data = convert_bytes(rewrite_head(head.encoder, "encoder"), calib, int8=True, layout="NHWC", observer="minmax")
    it = li.Interpreter(model_content=data)
    filters = {tuple(t["shape"]): t for t in it.get_tensor_details()
               if t["dtype"] == np.int8 and len(t["shape"]) == 4}
    for m in (head.encoder.get_submodule("0"), head.encoder.get_submodule("6")):
        # (O, I, kh, kw); TFLite keeps (O, kh, kw, I)
        q8 = _ints(m.weight)[0].round().to(torch.int8).view(m.weight.shape).numpy()
        t = filters[(q8.shape[0], q8.shape[2], q8.shape[3], q8.shape[1])]
        assert np.array_equal(it.get_tensor(t["index"]), q8.transpose(0, 2, 3, 1))


def test_refuses_unknown_method_and_no_images() -> None:
    lm = untrained("mini_resnet", {"bottleneck_channel": 4}, seed=0)  # the refusals do not depend on the head
    mini = fold_head(split(lm.model, lm.card))[0]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with pytest.raises(UserError, match="--weight-rounding 'adaround': choose one of nearest, gptq"):
        round_head(mini.head, x, "adaround")
    with pytest.raises(UserError, match="needs calibration images"):
        round_head(mini.head, x[:0], "gptq")
    q, _ = round_head(mini.head, x, "gptq")  # and what it takes it rounds: every conv on its int8 grid
    convs = [m for m in q.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        w, _ = _ints(conv.weight)
        assert (w - w.round()).abs().max() < 1e-3 and w.abs().max() <= 127 + 1e-3


@pytest.mark.slow
def test_conv_followed_by_batchnorm_lands_on_the_grid_after_the_fold(tmp_path) -> None:
    """R152 v1's stem keeps Conv -> BN (no BN after its max-pool to fold): the conv is rounded with the BN's scale
    in, so the integers ONNX Runtime writes after its own Conv+BN fold are the rounded ones."""
    from bottlefit.exporter.onnx import export_onnx
    from bottlefit.exporter.qdq import quantize_head
    from bottlefit.exporter.split import Head
    from tests.targets.rpi import head as rpi_head

    enc, _ = rpi_head("r152v1")  # random BN statistics, as a trained checkpoint has
    calib = images("calibration", 8)
    rounded, rec = round_head(Head(enc), calib, "gptq", bias_correction=True)
    assert rec.layers["encoder.0"]["folded_batchnorm"] == "encoder.1"
    conv, bn = rounded.encoder.get_submodule("0"), rounded.encoder.get_submodule("1")
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    q, _ = _ints(conv.weight.detach().double() * a.view(-1, 1, 1, 1))
    assert (q - q.round()).abs().max() < 1e-3
    fp32 = export_onnx(rounded, torch.from_numpy(calib[:1]), tmp_path / "h.onnx", 13, "input", "bottleneck")
    qd = quantize_head(fp32.path, tmp_path / "q.onnx", calib, rounded, "minmax", symmetric=True)
    w8 = [numpy_helper.to_array(i) for i in onnx.load(str(qd.path)).graph.initializer]
    (got,) = [w for w in w8 if w.dtype == np.int8 and w.ndim == 4]
    assert np.array_equal(got.reshape(len(got), -1), q.round().to(torch.int8).numpy())
    # bias correction: the folded conv's mean output on the calibration images matches the original's
    x = torch.from_numpy(calib)
    with torch.no_grad():
        ref = enc[1](enc[0](x)).double().mean((0, 2, 3))
        got_mean = bn(conv(x)).double().mean((0, 2, 3))
    assert (got_mean - ref).abs().max() < 1e-4
