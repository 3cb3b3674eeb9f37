"""The offloading baseline's whole-model service on loopback: JPEG in as a BYTES tensor, logits out in the binary
extension, the refusals with their status codes. The model is a two-node ONNX graph (per-channel mean over the
image), so the expected logits are computed here from the decoded JPEG."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from bottlefit.bench.service import (
    INPUT,
    FullModel,
    FullModelServer,
    decode_jpeg,
    full_model_name,
    request_body,
)
from bottlefit.models.card import BottleneckSpec, ModelCard
from bottlefit.serve.client import RequestFailed, logits_of, post
from bottlefit.serve.model import InferError

H, W = 16, 12
CARD = ModelCard(arch="tiny net", params={}, input_shape=(3, H, W), num_classes=3,
                 bottleneck=BottleneckSpec("enc", (2, 4, 3)))


def channel_means_onnx(path: Path) -> Path:
    """(1, 3, H, W) float -> (1, 3) per-channel means, opset 13."""
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["logits"], axes=[2, 3], keepdims=0)], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H, W])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def jpeg_of(rgb: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=95) if fmt == "JPEG" else Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def photo() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 20, y * 15, np.full_like(x, 128)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullModelServer]:
    model = FullModel(channel_means_onnx(tmp_path_factory.mktemp("full") / "full.onnx"), CARD)
    srv = FullModelServer(model).start()
    yield srv
    srv.stop()


def url(srv: FullModelServer, name: str | None = None) -> str:
    return f"http://127.0.0.1:{srv.port}/v2/models/{name or full_model_name(CARD)}/infer"


def test_name_follows_the_tail_name() -> None:
    # the tail's protocol name with _full: Triton's alphabet, the space replaced
    assert full_model_name(CARD) == "tiny_net_full"


def test_normalize_uses_the_card_and_goes_nchw() -> None:
    rgb = np.zeros((2, H, W, 3), np.uint8)
    rgb[1, 0, 0] = (255, 0, 51)
    x = CARD.normalize(rgb)
    assert x.shape == (2, 3, H, W) and x.dtype == np.float32 and x.flags.c_contiguous
    mean, std = np.array(CARD.mean, np.float32), np.array(CARD.std, np.float32)
    np.testing.assert_allclose(x[0, :, 5, 5], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0], (np.array([1.0, 0.0, 0.2], np.float32) - mean) / std, rtol=1e-6)


def test_request_body_is_the_binary_extension_with_one_bytes_element() -> None:
    jpeg = b"\xff\xd8 not really a jpeg \xff\xd9"
    body, hl = request_body(jpeg)
    header = json.loads(body[:hl])
    assert header["inputs"] == [{"name": INPUT, "shape": [1], "datatype": "BYTES",
                                 "parameters": {"binary_data_size": 4 + len(jpeg)}}]
    assert body[hl:] == struct.pack("<I", len(jpeg)) + jpeg and len(body) == hl + 4 + len(jpeg)


def test_decode_jpeg_refuses_other_images_and_sizes() -> None:
    rgb = photo()
    assert decode_jpeg(jpeg_of(rgb), CARD).shape == (H, W, 3)
    for data, status_text in ((jpeg_of(rgb, "PNG"), "a PNG image, expected JPEG"),
                              (b"garbage", "not a decodable JPEG"),
                              (jpeg_of(np.zeros((H, W + 1, 3), np.uint8)), f"a {W + 1}x{H} image; the model takes "
                                                                             f"the {W}x{H} crop")):
        with pytest.raises(InferError) as e:
            decode_jpeg(data, CARD)
        assert e.value.status == 400 and status_text in str(e.value)


def test_serves_the_whole_model_on_a_jpeg(server: FullModelServer) -> None:
    rgb = photo()
    jpeg = jpeg_of(rgb)
    resp, binary = post(url(server), *request_body(jpeg), timeout_s=30)
    got = logits_of(resp, binary)
    # what the service must compute: the decoded JPEG (lossy), normalized by the card, through the graph
    want = CARD.normalize(decode_jpeg(jpeg, CARD)[None]).mean(axis=(2, 3))
    assert got.shape == (1, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert resp["model_name"] == "tiny_net_full" and resp["outputs"][0]["parameters"]["binary_data_size"] == 12
    assert resp["parameters"]["server_ms"] > 0


@pytest.mark.parametrize(("case", "status", "text"), [
    ("name", 404, "unknown model 'other'"),
    ("png", 400, "expected JPEG"),
    ("two", 400, "expected one BYTES input 'image' of shape [1]"),
])
def test_refusals_carry_their_status(server: FullModelServer, case: str, status: int, text: str) -> None:
    rgb = photo()
    body, hl = request_body(jpeg_of(rgb, "PNG" if case == "png" else "JPEG"))
    if case == "two":  # a request whose shape says two JPEGs
        header = json.loads(body[:hl])
        header["inputs"][0]["shape"] = [2]
        blob = body[hl:] * 2
        header["inputs"][0]["parameters"]["binary_data_size"] = len(blob)
        hj = json.dumps(header).encode()
        body, hl = hj + blob, len(hj)
    with pytest.raises(RequestFailed) as e:
        post(url(server, "other" if case == "name" else None), body, hl, timeout_s=30)
    assert str(e.value).startswith(f"HTTP {status}: ") and text in str(e.value)
    assert e.value.retryable is False


def test_refuses_a_request_over_the_limit(server: FullModelServer) -> None:
    big = b"\xff\xd8" + b"\0" * (16 << 20)  # the default limit is 16 MiB: refused before it is decoded
    with pytest.raises(RequestFailed) as e:
        post(url(server), *request_body(big), timeout_s=60)
    assert str(e.value) == "HTTP 413: request exceeds the limit of 16777216 bytes" and not e.value.retryable
