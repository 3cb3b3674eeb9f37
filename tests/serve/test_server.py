from __future__ import annotations

import json
import struct
import threading
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from bottlefit.runtimes.head import run_tail
from bottlefit.serve import codecs
from bottlefit.serve.client import build_request, logits_of
from bottlefit.serve.head import load_tables

H = "Inference-Header-Content-Length"


def _post(server: Any, body: bytes, header_len: int | None = None, model: str | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], bytes]:
    h = dict(headers or {})
    if header_len is not None:
        h[H] = str(header_len)
    url = f"{server.http_url}/v2/models/{model or server.model.name}/infer"
    req = urllib.request.Request(url, data=body, method="POST", headers=h)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            data, n = r.read(), r.headers.get(H)
            hl = int(n) if n else len(data)
            return r.status, json.loads(data[:hl]), data[hl:]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), b""


def _tail(mini_export, contract, codes) -> np.ndarray:
    from bottlefit.serve.contract import find_targets

    t = find_targets(mini_export)[0]
    return run_tail(t.tail(), t.path, contract.dequantize(codes))


def _valid(served, heldout_codes) -> None:
    _, contract, codes = heldout_codes
    body, hl, _ = build_request(contract, codes[0], "int8", "bottleneck", None)
    status, resp, binary = _post(served, body, hl)
    assert status == 200, resp
    assert np.array_equal(logits_of(resp, binary), _tail(served.model.tail_target.path.parent, contract, codes[:1]))


@pytest.mark.parametrize("wire", ["fp32", "int8", *codecs.CODECS])
def test_rest_logits_equal_in_process_tail(served, mini_export, heldout_codes, wire: str) -> None:
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    want = _tail(mini_export, contract, codes)
    for i, c in enumerate(codes):
        body, hl, coded = build_request(contract, c, wire, "bottleneck", tables)
        status, resp, binary = _post(served, body, hl)
        assert status == 200, resp
        assert np.array_equal(logits_of(resp, binary)[0], want[i])


def test_tritonclient_http_and_grpc(served, mini_export, heldout_codes) -> None:
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    want = _tail(mini_export, contract, codes)
    name = served.model.name
    http = thttp.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(name)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(name)
    assert http.get_model_metadata(name)["inputs"][0]["shape"] == [-1, 4, 5, 5]
    assert list(g.get_model_metadata(name).outputs[0].shape) == [-1, 10]
    assert http.get_server_metadata()["name"] == g.get_server_metadata().name == "bottlefit"

    # FP32 (what Triton also takes), a batch of all the images
    x = contract.dequantize(codes)
    i = thttp.InferInput("bottleneck", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    r = http.infer(name, [i], outputs=[thttp.InferRequestedOutput("logits", binary_data=True)])
    assert np.array_equal(r.as_numpy("logits"), want)
    gi = tgrpc.InferInput("bottleneck", list(x.shape), "FP32")
    gi.set_data_from_numpy(x)
    assert np.array_equal(g.infer(name, [gi]).as_numpy("logits"), want)

    # UINT8 codes with scale / zero point / contract id as parameters
    for client, mod in ((http, thttp), (g, tgrpc)):
        q = mod.InferInput("bottleneck", list(codes.shape), "UINT8")
        q.set_data_from_numpy(codes, **({"binary_data": True} if mod is thttp else {}))
        params = {"scale": contract.scale, "zero_point": contract.zero_point, "contract_id": contract.contract_id}
        assert np.array_equal(client.infer(name, [q], parameters=params).as_numpy("logits"), want)
        # BYTES frames, one per image, the codec as a parameter
        frames = np.array([codecs.encode_frame(contract, c, "context", tables) for c in codes], dtype=np.object_)
        b = mod.InferInput("bottleneck", [len(frames)], "BYTES")
        b.set_data_from_numpy(frames, **({"binary_data": True} if mod is thttp else {}))
        assert np.array_equal(client.infer(name, [b], parameters={"codec": "context"}).as_numpy("logits"), want)

    stats = http.get_inference_statistics(name)["model_stats"][0]
    assert stats["inference_count"] >= 5 * len(codes) and stats["inference_stats"]["success"]["count"] >= 5
    gs = g.get_inference_statistics(name).model_stats[0]
    assert gs.execution_count >= 1 and gs.inference_stats.success.count >= 5


def test_served_logits_agree_with_pytorch_fp32_within_tolerances(served, mini_export, heldout_codes) -> None:
    """Parity end to end: the int8 head's codes of the held-out images, sent over REST (context-coded frames) and
    gRPC (UINT8 codes), against the fp32 PyTorch model on the same images, judged by the artifact's tolerances
    (bottlefit.parity.tolerances, as the manifest records them) and matching the export's own parity figures."""
    import torch

    from bottlefit.calibration.builtin import builtin_arrays
    from bottlefit.exporter.split import split
    from bottlefit.parity import metrics
    from bottlefit.parity.tolerances import tolerances_for
    from bottlefit.pipeline import source
    from bottlefit.pipeline.options import ModelSource

    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    lm = source.load(ModelSource(**{k: v for k, v in target.manifest["options"]["model"].items()
                                    if k != "checkpoint"}))
    images, _ = builtin_arrays(target.card, "heldout")
    sm = split(lm.model, lm.card)
    with torch.no_grad():
        x = torch.from_numpy(np.array(images, dtype=np.float32))
        ref_z, ref_logits = sm.head(x).numpy(), lm.model(x).numpy()
    rest = []
    for c in codes:
        body, hl, _ = build_request(contract, c, "context", "bottleneck", tables)
        status, resp, binary = _post(served, body, hl)
        assert status == 200, resp
        rest.append(logits_of(resp, binary)[0])
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    q = tgrpc.InferInput("bottleneck", list(codes.shape), "UINT8")
    q.set_data_from_numpy(codes)
    params = {"scale": contract.scale, "zero_point": contract.zero_point, "contract_id": contract.contract_id}
    grpc_logits = g.infer(served.model.name, [q], parameters=params).as_numpy("logits")
    np.testing.assert_array_equal(np.stack(rest), grpc_logits)

    z = contract.dequantize(codes)
    got = {"bottleneck.cosine": metrics.cosine(ref_z, z), "bottleneck.sqnr_db": metrics.sqnr_db(ref_z, z),
           "logits.top1_agreement": metrics.top1_agreement(ref_logits, grpc_logits),
           "logits.max_abs_error": metrics.max_abs_error(ref_logits, grpc_logits)}
    recorded = {c["metric"]: c for c in target.manifest["parity"]["checks"] if c["artifact"] == contract.head}
    tols = tolerances_for(contract.head, "int8", {})
    for metric, tol in tols.items():  # top-1 included: the export does not gate it for untrained weights
        assert tol.ok(got[metric]), (metric, got[metric], tol)
        if recorded[metric]["tolerance"] is not None:
            assert recorded[metric]["tolerance"] == tol.value
    for metric, value in got.items():  # the served path is the path parity measured
        assert value == pytest.approx(recorded[metric]["value"], rel=1e-4, abs=1e-5), metric


def _json_body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def test_malformed_rest_requests_answer_4xx_and_server_stays_up(served, heldout_codes) -> None:
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    good_raw = codes[0].tobytes()
    p = {"scale": contract.scale, "zero_point": contract.zero_point}

    def binary(dtype: str, shape: list[int], blob: bytes, params: dict[str, Any], size: int | None = None,
               hl_delta: int = 0) -> tuple[bytes, int]:
        hdr = json.dumps({"inputs": [{"name": "bottleneck", "datatype": dtype, "shape": shape,
                                      "parameters": {**params, "binary_data_size": len(blob) if size is None
                                                     else size}}]}).encode()
        return hdr + blob, len(hdr) + hl_delta

    frame = codecs.encode_frame(contract, codes[0], "entropy", tables)
    bad_frame = frame[:-4] + bytes(b ^ 0xFF for b in frame[-4:])
    other = frame[:4] + bytes(6) + frame[10:]
    cases: dict[str, tuple[bytes, int | None, int]] = {
        "wrong shape": (*binary("UINT8", [1, 4, 5, 4], good_raw[:80], p), 400),
        "wrong dtype": (*binary("FP16", [1, 4, 5, 5], good_raw * 2, p), 400),
        "int8 vs uint8 contract": (*binary("INT8", [1, 4, 5, 5], good_raw, {"contract_id": contract.contract_id}),
                                   400),
        "unknown contract id": (*binary("UINT8", [1, 4, 5, 5], good_raw, {"contract_id": "0123456789ab"}), 400),
        "scale differs from contract": (*binary("UINT8", [1, 4, 5, 5], good_raw,
                                                {"contract_id": contract.contract_id, "scale": 1.0}), 400),
        "no scale": (*binary("UINT8", [1, 4, 5, 5], good_raw, {}), 400),
        "truncated binary": (*binary("UINT8", [1, 4, 5, 5], good_raw[:50], p, size=100), 400),
        "binary shorter than shape": (*binary("UINT8", [1, 4, 5, 5], good_raw[:50], p), 400),
        "oversized binary": (binary("UINT8", [1, 4, 5, 5], good_raw, p)[0] + b"\0" * 64,
                             binary("UINT8", [1, 4, 5, 5], good_raw, p)[1], 400),
        "header length past body": (binary("UINT8", [1, 4, 5, 5], good_raw, p)[0], 10**6, 400),
        "header length not a number": (binary("UINT8", [1, 4, 5, 5], good_raw, p)[0], None, 400),
        "header length cuts json": (*binary("UINT8", [1, 4, 5, 5], good_raw, p, hl_delta=-7), 400),
        "invalid codec stream": (*binary("BYTES", [1], struct.pack("<I", len(bad_frame)) + bad_frame, {}), 400),
        "frame for another export": (*binary("BYTES", [1], struct.pack("<I", len(other)) + other, {}), 400),
        "codec parameter disagrees": (*binary("BYTES", [1], struct.pack("<I", len(frame)) + frame,
                                              {"codec": "zstd"}), 400),
        "bytes element length overruns": (*binary("BYTES", [1], struct.pack("<I", 999) + frame, {}), 400),
        "not json": (b"{not json", None, 400),
        "no inputs": (_json_body([]), None, 400),
        "unknown input": (_json_body([{"name": "x", "datatype": "FP32", "shape": [1, 4, 5, 5],
                                       "data": [0.0] * 100}]), None, 400),
        "json data wrong count": (_json_body([{"name": "bottleneck", "datatype": "FP32", "shape": [1, 4, 5, 5],
                                               "data": [0.0] * 99}]), None, 400),
        "json nan": (b'{"inputs":[{"name":"bottleneck","datatype":"FP32","shape":[1,4,5,5],"data":[NaN'
                     + b",0" * 99 + b"]}]}", None, 400),
        "unknown output": (_json_body([{"name": "bottleneck", "datatype": "FP32", "shape": [1, 4, 5, 5],
                                        "data": [0.0] * 100}], outputs=[{"name": "prob"}]), None, 400),
        "request too large": (b"{" + b" " * (300 << 10) + b"}", None, 413),
    }
    for what, (body, hl, status) in cases.items():
        got, resp, _ = _post(served, body, hl if what != "header length not a number" else None,
                             headers={H: "abc"} if what == "header length not a number" else None)
        assert got == status, (what, got, resp)
        assert isinstance(resp.get("error"), str) and resp["error"], what
        _valid(served, heldout_codes)  # and the next valid request still succeeds
    got, resp, _ = _post(served, _json_body([]), model="no_such_model")
    assert got == 404 and "unknown model" in resp["error"]
    with urllib.request.urlopen(f"{served.http_url}/v2/health/live", timeout=5) as r:
        assert r.status == 200


def test_malformed_grpc_requests(served, heldout_codes) -> None:
    target, contract, codes = heldout_codes
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    name = served.model.name

    def infer(dtype: str, arr: np.ndarray, model: str = name, **params: Any) -> None:
        i = tgrpc.InferInput("bottleneck", list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        g.infer(model, [i], parameters=params or None)

    cases = [
        ("UINT8", codes[:1, :, :, :4], {"scale": contract.scale, "zero_point": contract.zero_point}, "INVALID"),
        ("UINT8", codes[:1], {"contract_id": "0123456789ab"}, "INVALID"),
        ("BYTES", np.array([b"garbage"], dtype=np.object_), {}, "INVALID"),
        ("FP32", np.zeros((1, 4, 5, 5), np.float32), {}, "NOT_FOUND"),
    ]
    for dtype, arr, params, code in cases:
        with pytest.raises(InferenceServerException) as e:
            infer(dtype, arr, model="nope" if code == "NOT_FOUND" else name, **params)
        assert code in str(e.value.status()), (dtype, e.value)
    big = np.zeros((64, 4, 32, 32), np.float32)  # 1 MiB > the 256 KiB limit
    with pytest.raises(InferenceServerException) as e:
        infer("FP32", big)
    assert "RESOURCE_EXHAUSTED" in str(e.value.status())
    infer("UINT8", codes[:1], contract_id=contract.contract_id)


def test_bounded_concurrent_load(served, heldout_codes) -> None:
    """4 REST + 2 gRPC clients x 25 requests each, concurrently: every one succeeds, with the right logits."""
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    want = _tail(served.model.tail_target.path.parent, contract, codes)
    errors: list[str] = []

    def rest_client(k: int) -> None:
        for n in range(25):
            i = (k + n) % len(codes)
            body, hl, _ = build_request(contract, codes[i], ("int8", "zstd", "entropy", "context")[k % 4],
                                        "bottleneck", tables)
            status, resp, binary = _post(served, body, hl)
            if status != 200 or not np.array_equal(logits_of(resp, binary)[0], want[i]):
                errors.append(f"rest {k}/{n}: {status} {resp}")

    def grpc_client(k: int) -> None:
        g = tgrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
        for n in range(25):
            i = (k + n) % len(codes)
            q = tgrpc.InferInput("bottleneck", [1, 4, 5, 5], "UINT8")
            q.set_data_from_numpy(codes[i : i + 1])
            try:
                y = g.infer(served.model.name, [q], parameters={"contract_id": contract.contract_id}).as_numpy(
                    "logits")[0]
                if not np.array_equal(y, want[i]):
                    errors.append(f"grpc {k}/{n}: logits differ")
            except (InferenceServerException, grpc.RpcError) as e:
                errors.append(f"grpc {k}/{n}: {e}")

    threads = [threading.Thread(target=rest_client, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=grpc_client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
