"""The Triton model repository as written (the server itself loads it in test_triton_server.py): every config.pbtxt
parses as Triton's own ModelConfig, the ensemble's steps connect, the shipped decoder decodes every codec to the
bottleneck `bottlefit serve` gets, bit for bit, and refuses frames made for another export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bottlefit.runtimes.head import run_tail
from bottlefit.serve import codecs
from bottlefit.serve.contract import find_targets
from bottlefit.serve.triton import RepositoryOptions, TailBackend, write_triton_repository

PKG = Path(codecs.__file__).parent


def _cfg(path: Path) -> model_config_pb2.ModelConfig:
    # Triton's ModelConfig message (model_config.proto, as tritonclient ships it): unknown fields, wrong types or
    # enum names fail to parse
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _io(tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def test_repository_is_the_split_tail(mini_export: Path, tmp_path: Path) -> None:
    files = write_triton_repository(mini_export / "onnx" / "manifest.json", tmp_path / "repo",
                                    options=RepositoryOptions(max_batch_size=8))
    repo = tmp_path / "repo"
    assert sorted(p.name for p in repo.iterdir()) == ["inferenceservice.yaml", "mini_resnet_tail",
                                                      "mini_resnet_tail_decode", "mini_resnet_tail_fp32"]
    assert all(f.is_file() for f in files) and len(files) == 9
    _check_split(mini_export, repo, 8)


def _check_split(mini_export: Path, repo: Path, max_batch: int) -> None:
    ens = _cfg(repo / "mini_resnet_tail" / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert _io(ens.input) == [("bottleneck", "TYPE_STRING", [-1])]  # what the clients send: [n] wire frames
    assert _io(ens.output) == [("logits", "TYPE_FP32", [-1, 10])]
    steps = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in ens.ensemble_scheduling.step]
    assert steps == [("mini_resnet_tail_decode", {"bottleneck": "bottleneck"}, {"bottleneck_fp32": "decoded"}),
                     ("mini_resnet_tail_fp32", {"bottleneck": "decoded"}, {"logits": "logits"})]
    dec = _cfg(repo / "mini_resnet_tail_decode" / "config.pbtxt")
    assert dec.backend == "python" and dec.max_batch_size == 0 and dec.instance_group[0].count == 2
    assert _io(dec.input) == [("bottleneck", "TYPE_STRING", [-1])]
    assert _io(dec.output) == [("bottleneck_fp32", "TYPE_FP32", [-1, 4, 5, 5])]
    version = repo / "mini_resnet_tail_decode" / "1"
    for shipped, src in (("model.py", "triton_decode.py"), ("boardcodec.py", "boardcodec.py")):
        assert (version / shipped).read_bytes() == (PKG / src).read_bytes()  # one source, copied verbatim
    meta = json.loads((version / "contracts.json").read_text())
    target = find_targets(mini_export / "onnx")[0]
    (int8,) = [c for c in target.contracts if c.quantized]
    assert meta["tail_shape"] == [4, 5, 5] and meta["max_frames"] == 4 * max_batch
    assert [c["contract_id"] for c in meta["contracts"]] == [int8.contract_id]
    assert (version / meta["contracts"][0]["tables"]).read_bytes() == \
        (target.path / "codec" / f"{int8.contract_id}.npz").read_bytes()

    tail = _cfg(repo / "mini_resnet_tail_fp32" / "config.pbtxt")
    assert tail.platform == "onnxruntime_onnx" and tail.max_batch_size == max_batch
    assert _io(tail.input) == [("bottleneck", "TYPE_FP32", [4, 5, 5])]  # dims without the batch dimension
    assert _io(tail.output) == [("logits", "TYPE_FP32", [10])]
    assert tail.HasField("dynamic_batching") and tail.dynamic_batching.max_queue_delay_microseconds > 0
    assert max(tail.dynamic_batching.preferred_batch_size) <= tail.max_batch_size

    sess = ort.InferenceSession(str(repo / "mini_resnet_tail_fp32" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "bottleneck" and not isinstance(sess.get_inputs()[0].shape[0], int)
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"bottleneck": x})[0], run_tail(target.tail(), target.path, x),
                               rtol=0, atol=1e-5)


def test_python_tail_twin(mini_export: Path, tmp_path: Path) -> None:
    """--tail-backend python: the same model.onnx, run by ONNX Runtime inside a python-backend model."""
    write_triton_repository(mini_export / "onnx", tmp_path / "repo",
                            options=RepositoryOptions(tail_backend=TailBackend.PYTHON, tail_threads=2))
    d = tmp_path / "repo" / "mini_resnet_tail_fp32"
    cfg = _cfg(d / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 16
    assert cfg.parameters["threads"].string_value == "2" and cfg.HasField("dynamic_batching")
    assert (d / "1" / "model.py").read_bytes() == (PKG / "triton_tail.py").read_bytes()
    assert (d / "1" / "model.onnx").is_file()


def test_export_writes_the_repository(mini_export: Path) -> None:
    """`bottlefit export --target onnx` writes triton/ itself, hashed in the manifest like any artifact."""
    target = find_targets(mini_export)[0]
    files = {a.file: a for a in target.artifacts}
    for f in ("triton/mini_resnet_tail/config.pbtxt", "triton/mini_resnet_tail_fp32/config.pbtxt",
              "triton/mini_resnet_tail_fp32/1/model.onnx", "triton/mini_resnet_tail_decode/config.pbtxt",
              "triton/mini_resnet_tail_decode/1/model.py", "triton/mini_resnet_tail_decode/1/contracts.json"):
        assert f in files and files[f].role == "aux" and len(files[f].sha256) == 64, f
    _check_split(mini_export, mini_export / "onnx" / "triton", 16)


def test_shipped_decoder_is_the_servers(mini_export: Path, heldout_codes, tmp_path: Path) -> None:
    """The decode step's FrameDecoder (what runs inside Triton) on frames of every codec: the bottleneck
    `bottlefit serve` decodes, bit for bit; frames for another export or damaged ones are refused (ValueError, which
    the model answers as a Triton INVALID_ARG error)."""
    from bottlefit.serve.head import load_tables
    from bottlefit.serve.triton_decode import FrameDecoder

    target, contract, codes = heldout_codes
    write_triton_repository(mini_export / "onnx", tmp_path / "repo")
    decoder = FrameDecoder(str(tmp_path / "repo" / "mini_resnet_tail_decode" / "1"))
    tables = load_tables(target, contract)
    want = contract.dequantize(codes[:4])
    for wire in codecs.CODECS:
        frames = [codecs.encode_frame(contract, c, wire, tables) for c in codes[:4]]
        got = decoder.decode_all(np.array(frames, dtype=np.object_))
        assert got.dtype == np.float32 and got.shape == (4, 4, 5, 5)
        assert np.array_equal(got, want), wire
    good = codecs.encode_frame(contract, codes[0], "context", tables)
    other = bytearray(good)
    other[4:10] = bytes(6)
    for frame, msg in ((bytes(other), "does not serve"), (good[:-4] + bytes(4), "invalid context stream"),
                       (b"BF", "shorter than"), (good[:25], "truncated")):
        with pytest.raises(ValueError, match=msg):
            decoder.decode_all([frame])
    with pytest.raises(ValueError, match="1..64"):
        decoder.decode_all([good] * 65)


def test_triton_command_writes_the_repository(mini_export: Path, tmp_path: Path, capsys) -> None:
    from bottlefit.cli import main

    assert main(["triton", str(mini_export), "--out", str(tmp_path / "repo"), "--max-batch-size", "4",
                 "--tail-backend", "python"]) == 0
    out = capsys.readouterr().out
    for f in ("mini_resnet_tail/config.pbtxt", "mini_resnet_tail_fp32/1/model.py",
              "mini_resnet_tail_decode/1/model.py"):
        assert f"wrote {tmp_path / 'repo' / f}" in out
    assert _cfg(tmp_path / "repo" / "mini_resnet_tail_fp32" / "config.pbtxt").max_batch_size == 4
    assert main(["triton", str(tmp_path), "--out", str(tmp_path / "r2")]) == 2  # no export there: one line
    assert main(["triton", str(mini_export), "--out", str(tmp_path / "r3"), "--max-batch-size", "-1"]) == 2


_KSERVE_CHECK = """
import json, sys
import kserve
import kubernetes.client.models as k8s
import yaml

# kserve's deserializer looks every class up in kserve.models, the Kubernetes ones (V1ObjectMeta,
# V1ResourceRequirements) included, which live in the kubernetes package it depends on
for n in dir(k8s):
    if n.startswith("V1") and not hasattr(kserve.models, n):
        setattr(kserve.models, n, getattr(k8s, n))
doc = yaml.safe_load(open(sys.argv[1]).read())


class Response:  # what ApiClient.deserialize reads: a body of JSON
    data = json.dumps(doc)


api = kserve.ApiClient()
isvc = api.deserialize(Response(), "V1beta1InferenceService")
assert isinstance(isvc, kserve.V1beta1InferenceService)
m = isvc.spec.predictor.model
assert isinstance(m, kserve.V1beta1ModelSpec)
print(json.dumps({"same": api.sanitize_for_serialization(isvc) == doc, "name": isvc.metadata.name,
                  "format": m.model_format.name, "runtime": m.runtime, "protocol": m.protocol_version,
                  "storage": m.storage_uri}))
"""


def test_kserve_manifest_is_a_valid_inference_service(mini_export: Path, tmp_path: Path) -> None:
    """The InferenceService beside the repository, read by the kserve SDK's own v1beta1 model classes: every field
    known to them (their deserializer drops a misspelt key, so the round trip would differ). In a subprocess:
    kserve's and tritonclient's gRPC protos both define package ``inference`` and cannot share one process."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve is not installed: pip install 'bottlefit[triton]' to check the manifest")
    write_triton_repository(mini_export / "onnx", tmp_path / "repo",
                            options=RepositoryOptions(storage_uri="s3://models/bottlefit/triton"))
    manifest = tmp_path / "repo" / "inferenceservice.yaml"
    cp = subprocess.run([sys.executable, "-c", _KSERVE_CHECK, str(manifest)], capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout.strip().splitlines()[-1])
    assert got == {"same": True, "name": "mini-resnet-tail", "format": "triton", "runtime": "kserve-tritonserver",
                   "protocol": "v2", "storage": "s3://models/bottlefit/triton"}
    text = manifest.read_text()
    assert "constriction==" in text and "tritonserver:24.10-py3" in text
