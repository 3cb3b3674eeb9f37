"""bottlefit.exporter.ncnn and the ncnn runner's reference semantics (bottlefit.runtimes.ncnn) on a small head
with the R152 v2 head's layer pattern: the exact param text and weight bytes, fp32 equal to PyTorch in both the
reference and the ncnn library (bottlefit[rpi] pins its x86-64 wheel), int8 reference against the library and
PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bottlefit.errors import UserError
from bottlefit.exporter.ncnn import write_ncnn
from bottlefit.runtimes import get_runner


def _head(cout: int = 8) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, cout, 7, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1),
                               torch.nn.Conv2d(cout, 4, 2, 2, 1, bias=False)).eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    d = tmp_path_factory.mktemp("ncnn")
    images = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    head = _head()
    fp32 = write_ncnn(head, images[:4], d / "head.fp32.ncnn.param", int8=False)
    int8 = write_ncnn(head, images[:4], d / "head.int8.ncnn.param", int8=True)
    assert fp32.weights == d / "head.fp32.ncnn.bin" and int8.input_scales.keys() == {"conv0", "conv3"}
    with torch.no_grad():
        ref = head(torch.from_numpy(images)).numpy()
    return fp32.param, int8.param, images, ref


def _run(path: Path, images: np.ndarray, **options: object) -> np.ndarray:
    r = get_runner("ncnn", path, **options)
    assert list(r.input_specs()) == ["in0"] and list(r.output_specs()) == ["out0"]
    assert r.output_specs()["out0"].shape == (1, 4, 5, 5)
    return np.concatenate([r.infer({"in0": images[i:i + 1]})["out0"] for i in range(len(images))])


def test_param_text_and_weight_bytes(written: tuple) -> None:
    fp32, int8, _, _ = written
    import hashlib

    digest = hashlib.sha256(int8.with_suffix(".bin").read_bytes()).hexdigest()[:16]
    assert int8.read_text() == (
        f"7767517\n4 4\nInput weights_{digest} 0 1 in0 0=32 1=32 2=3\n"
        "Convolution conv0 1 1 in0 b0 0=8 1=7 3=2 13=2 4=3 14=3 5=1 6=1176 9=1 8=1\n"
        "Pooling pool2 1 1 b0 b2 0=0 1=3 2=2 3=1 5=1\n"
        "Convolution conv3 1 1 b2 out0 0=4 1=2 3=2 13=2 4=1 14=1 5=0 6=128 8=1\n")
    fp32_digest = hashlib.sha256(fp32.with_suffix(".bin").read_bytes()).hexdigest()[:16]
    assert fp32.read_text() == int8.read_text().replace(" 8=1", "").replace(digest, fp32_digest)
    # per conv: a 4-byte tag, float32 weights (+ bias); int8 adds per-channel weight scales and one input scale
    floats = 1176 + 8 + 128
    assert fp32.with_suffix(".bin").stat().st_size == 2 * 4 + floats * 4
    blob = int8.with_suffix(".bin").read_bytes()
    assert len(blob) == 2 * 4 + (floats + 8 + 1 + 4 + 1) * 4
    w0 = _head()[0].weight.detach().numpy()
    scales = np.frombuffer(blob, "<f4", 8, 4 + 1176 * 4 + 8 * 4)
    np.testing.assert_allclose(scales, 127 / np.abs(w0.reshape(8, -1)).max(1), rtol=1e-6)


def test_fp32_is_the_pytorch_head_in_the_reference_and_in_ncnn(written: tuple) -> None:
    fp32, _, images, ref = written
    tol = 1e-5 * float(np.abs(ref).max())
    np.testing.assert_allclose(_run(fp32, images, reference=True), ref, atol=tol)
    pytest.importorskip("ncnn", reason="ncnn (bottlefit[rpi]) is not installed here")
    np.testing.assert_allclose(_run(fp32, images), ref, atol=10 * tol)


def test_int8_reference_is_ncnns_scheme_and_the_library_agrees(written: tuple) -> None:
    _, int8, images, ref = written
    got = _run(int8, images, reference=True)
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert 0.99 < cos < 0.99999, cos  # 8-bit grids: close to PyTorch, not equal
    # the reference by hand for the first conv: quantize, integer conv, dequantize, ReLU
    head = _head()
    s_in = np.float32(127 / np.abs(images[:4]).max())
    w = head[0].weight.detach().numpy().astype(np.float64)
    s_w = np.float32(127) / np.abs(w.reshape(8, -1)).max(1).astype(np.float32)
    xq = np.clip(np.sign(images * s_in) * np.floor(np.abs(images * s_in) + 0.5), -127, 127)
    wq = np.clip(np.round(w * s_w[:, None, None, None]), -127, 127)
    acc = torch.nn.functional.conv2d(torch.from_numpy(xq.astype(np.float64)), torch.from_numpy(wq), stride=2,
                                     padding=3).numpy()
    scale = np.float32(1) / (s_in * s_w)  # float32, as ncnn dequantizes
    y0 = np.maximum(acc.astype(np.float32) * scale[None, :, None, None]
                    + head[0].bias.detach().numpy()[None, :, None, None], 0)
    from bottlefit.runtimes.ncnn import evaluate, parse_param, read_weights

    layers = parse_param(int8)
    read_weights(layers, int8.with_suffix(".bin"))
    np.testing.assert_array_equal(evaluate(layers, {"in0": images}, int8)["b0"], y0)
    ncnn = pytest.importorskip("ncnn", reason="ncnn (bottlefit[rpi]) is not installed here")
    assert ncnn is not None
    # the host's ncnn kernels compute the same float32 arithmetic: equal (measured), allowing one float32 ulp
    lib = _run(int8, images)
    np.testing.assert_allclose(lib, got, rtol=2 ** -23, atol=1e-12)


def test_batchnorm_folds_into_its_conv_or_runs_as_a_scale_layer(tmp_path: Path) -> None:
    """The other BottleFit encoder form: conv -> BN -> ReLU -> max-pool -> BN -> ReLU -> conv."""
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 2, 1))
    for bn in (head[1], head[4]):  # trained-looking statistics, some shifts > 0 (no exact pool fold)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    head.eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    model = write_ncnn(head, x, tmp_path / "bn.param", int8=False)
    assert model.layers == ["Input", "Convolution", "Pooling", "Scale", "ReLU", "Convolution"]
    with torch.no_grad():
        ref = head(torch.from_numpy(x)).numpy()
    r = get_runner("ncnn", model.param, reference=True)
    got = np.concatenate([r.infer({"in0": x[i:i + 1]})["out0"] for i in range(2)])
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()))
    pytest.importorskip("ncnn", reason="ncnn (bottlefit[rpi]) is not installed here")
    lib = get_runner("ncnn", model.param)
    got = np.concatenate([lib.infer({"in0": x[i:i + 1]})["out0"] for i in range(2)])
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()))


def test_unsupported_layers_and_files_are_one_line_errors(tmp_path: Path) -> None:
    x = np.zeros((1, 3, 16, 16), np.float32)
    for head in (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, groups=1, dilation=2)),
                 torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, groups=3)),
                 torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(2, ceil_mode=True)),
                 torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sigmoid())):
        with pytest.raises(UserError) as e:
            write_ncnn(head, x, tmp_path / "h.param", int8=False)
        assert "\n" not in str(e.value) and str(e.value).startswith("ncnn: the head's layers")
    assert not (tmp_path / "h.param").exists()
    bad = tmp_path / "bad.param"
    bad.write_text("not ncnn\n")
    with pytest.raises(UserError, match="not an ncnn param file"):
        get_runner("ncnn", bad, reference=True)
    good = write_ncnn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), x, tmp_path / "g.param", int8=False)
    good.weights.write_bytes(good.weights.read_bytes()[:-4])
    with pytest.raises(UserError, match="before the weights its .param announces"):
        get_runner("ncnn", good.param, reference=True)
    good.weights.unlink()
    with pytest.raises(UserError, match="weights file is missing"):
        get_runner("ncnn", good.param, reference=True)


def test_the_exports_observer_sets_each_convs_input_threshold(tmp_path: Path) -> None:
    """minmax is ncnn2int8's max|x|; mse clips the post-ReLU input of the second conv below its max (a larger
    scale), never above; an unknown observer is the calibration's one-line error."""
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = {o: write_ncnn(_head(), x, tmp_path / f"{o}.param", int8=True, observer=o).input_scales
           for o in ("minmax", "mse")}
    with torch.no_grad():
        pooled = _head()[:3](torch.from_numpy(x))
    assert got["minmax"]["conv3"] == pytest.approx(127 / float(pooled.abs().max()), rel=1e-6)
    assert got["minmax"]["conv0"] == pytest.approx(127 / float(np.abs(x).max()), rel=1e-6)
    assert got["mse"]["conv3"] > got["minmax"]["conv3"]
    with pytest.raises(UserError, match="unknown calibration method 'nope'"):
        write_ncnn(_head(), x, tmp_path / "n.param", int8=True, observer="nope")
