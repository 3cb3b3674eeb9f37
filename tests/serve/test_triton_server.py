"""A real NVIDIA Triton Inference Server (the ``nvidia-pytriton`` wheel's ``tritonserver`` 2.51, python backend) on
loopback, loading the split repository written from a mini export: the board client, ``run-head`` and tritonclient
get from the ensemble the same logits as from ``bottlefit serve`` on the same frames; bad frames get a Triton error
and the server keeps answering; the tail's dynamic batcher joins concurrent requests.

Skipped with its reason where the wheel or the models' Python environment cannot be had (no package index)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bottlefit.serve import codecs

WIRES = ("raw", "zstd", "entropy", "context")


@pytest.fixture(scope="module")
def split_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mini_resnet export for onnx (the tail, an int8 ONNX head) and rpi (the board bundle) in one OUT."""
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    out = tmp_path_factory.mktemp("triton") / "out"
    for target, opts in (("onnx", OnnxOptions(int8=True)), ("rpi", None)):
        export(ExportRequest(ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4), target, out,
                             opts, parity=ParityOptions(emulate=Emulate.parse("none"))), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def triton(split_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from bottlefit.serve.triton import RepositoryOptions, TailBackend, write_triton_repository
    from bottlefit.serve.triton_server import TritonServer, TritonUnavailable, ensure_server

    try:
        install = ensure_server()
    except TritonUnavailable as e:
        pytest.skip(f"no Triton server here: {e}")
    root = tmp_path_factory.mktemp("triton-repo")
    write_triton_repository(split_export, root / "repo", options=RepositoryOptions(
        max_batch_size=16, max_queue_delay_us=20000, tail_backend=TailBackend.PYTHON))
    server = TritonServer(install, root / "repo", root / "tritonserver.log").start()
    yield server
    alive = server.alive()
    server.stop()
    assert alive, server.log_tail()  # no request took it down


@pytest.fixture(scope="module")
def serve(split_export: Path) -> Iterator[object]:
    from bottlefit.serve.server import ServeOptions, Server

    s = Server(split_export, ServeOptions(http_port=0, grpc_port=0)).start()
    yield s
    s.stop()


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _frames(split_export: Path, wire: str, n: int = 3) -> tuple[object, list[bytes]]:
    """The int8 ONNX head's contract and ``n`` frames of the built-in held-out photos' codes."""
    from bottlefit.calibration.builtin import builtin_arrays
    from bottlefit.serve.client import pick_head
    from bottlefit.serve.head import HeadCodes, load_tables

    target, contract = pick_head(split_export / "onnx")
    images, _ = builtin_arrays(target.card, "heldout")
    codes = HeadCodes(target, contract, reference=True)(np.asarray(images[:n], dtype=np.float32))
    tables = load_tables(target, contract) if wire in ("entropy", "context") else None
    return contract, [codecs.encode_frame(contract, c, wire, tables) for c in codes]


@pytest.mark.slow
def test_board_client_gets_the_same_logits_through_triton(split_export: Path, triton, serve) -> None:
    """The rpi bundle's own client, unchanged but for --server: context frames to the ensemble, the FP32 bottleneck
    to the FP32 tail; the same top-1 and logits as `bottlefit serve` gives for the same requests."""
    board = split_export / "rpi" / "board"
    args = [sys.executable, str(board / "client.py"), "--golden", "--runtime", "litert", "--threads", "1", "--json",
            "--retries", "0"]
    runs = {}
    for name, url, extra in (("serve", serve.http_url, ["--wire", "context"]),
                             ("triton", triton.http_url, ["--wire", "context"]),
                             ("serve-fp32", serve.http_url, ["--wire", "fp32"]),
                             ("triton-fp32", triton.http_url, ["--wire", "fp32", "--model-name",
                                                               "mini_resnet_tail_fp32"])):
        cp = subprocess.run([*args, "--server", url, *extra], capture_output=True, text=True, timeout=180)
        assert cp.returncode == 0, (name, cp.stdout, cp.stderr)
        runs[name] = _records(cp.stdout)
        assert len(runs[name]) == 4
    for a, b in (("serve", "triton"), ("serve-fp32", "triton-fp32"), ("serve", "serve-fp32")):
        assert [r["topk"][0]["class"] for r in runs[a]] == [r["topk"][0]["class"] for r in runs[b]]
        np.testing.assert_array_equal(np.array([r["logits"] for r in runs[a]]),
                                      np.array([r["logits"] for r in runs[b]]))
    # a context frame is far smaller than the FP32 bottleneck Triton took before (4 x 5 x 5 floats)
    assert all(r["payload_bytes"] < 400 for r in runs["triton"]) and runs["triton-fp32"][0]["payload_bytes"] == 400


@pytest.mark.slow
def test_run_head_every_codec_through_triton(split_export: Path, triton, serve, tmp_path: Path) -> None:
    """`run-head`'s client, unchanged but for the server URL: every codec, the same logits as `bottlefit serve`."""
    from PIL import Image

    from bottlefit.serve.client import Client

    rng = np.random.default_rng(3)
    images = []
    for i in range(2):
        images.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    for wire in WIRES:
        got = {}
        for name, url in (("serve", serve.http_url), ("triton", triton.http_url)):
            results = list(Client(split_export / "onnx", url, wire=wire, reference=True, retries=0).run(images))
            assert all(r.ok for r in results), (wire, name, [r.error for r in results])
            got[name] = np.stack([r.logits for r in results])
        np.testing.assert_array_equal(got["triton"], got["serve"], err_msg=wire)


@pytest.mark.slow
def test_tritonclient_rest_and_grpc(split_export: Path, triton, serve) -> None:
    """tritonclient over REST (binary data) and gRPC: three frames in one BYTES tensor -> three rows of logits, the
    same as `bottlefit serve` gives; server metadata says it is Triton."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    want = None
    for wire in WIRES:
        _, frames = _frames(split_export, wire)
        data = np.array(frames, dtype=np.object_)
        outs = {}
        for name, mod, url in (("rest", httpclient, triton.http_url.removeprefix("http://")),
                               ("grpc", grpcclient, triton.grpc_url),
                               ("serve", httpclient, serve.http_url.removeprefix("http://"))):
            client = mod.InferenceServerClient(url)
            inp = mod.InferInput("bottleneck", [len(frames)], "BYTES")
            if mod is httpclient:
                inp.set_data_from_numpy(data, binary_data=True)
                res = client.infer("mini_resnet_tail", [inp], outputs=[mod.InferRequestedOutput("logits",
                                                                                                binary_data=True)])
            else:
                inp.set_data_from_numpy(data)
                res = client.infer("mini_resnet_tail", [inp])
            outs[name] = res.as_numpy("logits")
            client.close()
        assert outs["rest"].shape == (3, 10)
        np.testing.assert_array_equal(outs["rest"], outs["serve"], err_msg=wire)
        np.testing.assert_array_equal(outs["grpc"], outs["serve"], err_msg=wire)
        want = outs["serve"] if want is None else want
        np.testing.assert_array_equal(outs["rest"], want)  # every codec is lossless: the same logits
    meta = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://")).get_server_metadata()
    assert meta["name"] == "triton" and meta["version"].startswith("2.")


@pytest.mark.slow
def test_bad_frames_get_a_triton_error_and_the_server_stays_up(split_export: Path, triton) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    contract, (good,) = _frames(split_export, "context", 1)
    _, (raw,) = _frames(split_export, "raw", 1)
    other = bytearray(good)
    other[4:10] = bytes.fromhex("0123456789ab")  # the contract id of another export
    table = bytearray(good)
    table[10] ^= 0xFF  # another fitted model
    damaged = bytearray(good)
    damaged[-4:] = bytes(4)
    cases = {"garbage": (b"not a frame at all, just bytes", "not a bottlefit wire frame"),
             "truncated": (good[:20], "shorter than its"),
             "other export": (bytes(other), "does not serve"),
             "other tables": (bytes(table), "model table"),
             "damaged stream": (bytes(damaged), "invalid context stream"),
             "raw, short": (raw[:-5], "raw payload has"),
             "empty": (b"", "shorter than its")}
    http = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    for name, (frame, msg) in cases.items():
        for mod, client in ((httpclient, http), (grpcclient, grpc)):
            inp = mod.InferInput("bottleneck", [1], "BYTES")
            inp.set_data_from_numpy(np.array([frame], dtype=np.object_))
            with pytest.raises(InferenceServerException) as e:
                client.infer("mini_resnet_tail", [inp])
            assert msg in e.value.message(), (name, e.value.message())
            if mod is httpclient:
                assert e.value.status() == "400", (name, e.value.status())
    # the wrong datatype and the wrong shape: Triton itself refuses them
    fp32 = httpclient.InferInput("bottleneck", [1, 4, 5, 5], "FP32")
    fp32.set_data_from_numpy(np.zeros((1, 4, 5, 5), dtype=np.float32))
    rank2 = httpclient.InferInput("bottleneck", [1, 1], "BYTES")
    rank2.set_data_from_numpy(np.array([[good]], dtype=np.object_))
    for inp, msg in ((fp32, "expects 'BYTES'"), (rank2, "unexpected shape")):
        with pytest.raises(InferenceServerException) as e:
            http.infer("mini_resnet_tail", [inp])
        assert msg in e.value.message(), e.value.message()
    inp = httpclient.InferInput("bottleneck", [1], "BYTES")
    inp.set_data_from_numpy(np.array([good], dtype=np.object_))
    assert http.infer("mini_resnet_tail", [inp]).as_numpy("logits").shape == (1, 10)  # still answering
    assert http.is_server_live() and http.is_model_ready("mini_resnet_tail") and triton.alive()
    assert contract.contract_id != "0123456789ab"


@pytest.mark.slow
def test_dynamic_batching_joins_concurrent_requests(split_export: Path, triton, capsys) -> None:
    """64 requests from 16 concurrent clients: every one answered with the logits its frame gets alone (batch 1);
    the batch sizes the tail's dynamic batcher formed come from Triton's statistics endpoint."""
    import tritonclient.http as httpclient

    _, frames = _frames(split_export, "context", 8)
    url = triton.http_url.removeprefix("http://")

    def infer(client: httpclient.InferenceServerClient, frame: bytes) -> np.ndarray:
        inp = httpclient.InferInput("bottleneck", [1], "BYTES")
        inp.set_data_from_numpy(np.array([frame], dtype=np.object_), binary_data=True)
        return client.infer("mini_resnet_tail", [inp], timeout=60).as_numpy("logits")[0]

    solo_client = httpclient.InferenceServerClient(url)
    alone = [infer(solo_client, f) for f in frames]  # one at a time: batch 1

    def stats() -> dict[int, int]:
        s = solo_client.get_inference_statistics("mini_resnet_tail_fp32")["model_stats"][0]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in s["batch_stats"]}

    before = stats()

    def worker(k: int) -> list[tuple[int, np.ndarray]]:
        client = httpclient.InferenceServerClient(url)
        out = [(i, infer(client, frames[i % len(frames)])) for i in range(k, 64, 16)]
        client.close()
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(worker, range(16)) for r in rs]
    assert sorted(i for i, _ in results) == list(range(64))
    for i, logits in results:
        np.testing.assert_array_equal(logits, alone[i % len(frames)])
    after = stats()
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) != before.get(b, 0)}
    assert sum(b * n for b, n in formed.items()) == 64  # every request ran in exactly one batch
    with capsys.disabled():
        print(f"\nTriton's dynamic batcher formed (batch size: executions) {dict(sorted(formed.items()))}")
